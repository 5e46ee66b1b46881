//! The containerd task service (task API v2) over msb-vmm sandboxes: `create` boots a
//! sandbox on the bundle's root, `start` runs the container's process through the agent,
//! `exec` adds processes, and exits are reported to containerd as events and to `wait`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::protos::api;
use containerd_shim::protos::cgroups::metrics;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use msb_devices::fs::passthrough::CachePolicy;
use msb_init::agent::{ErrorKind, ExecRequest, TermSize};
use msb_init::client::{ClientError, ExecController, ExecEvent, ExecHandle};
use msb_vmm::sandbox::{Network, Sandbox, SandboxError, Volume};

use crate::rootfs;
use crate::spec::{self, Plan};

/// What containerd sees of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Stopped,
}

/// containerd's FIFOs for one process (empty: not wired).
#[derive(Debug, Clone, Default)]
struct Stdio {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

/// Where a process's exit is published, once.
#[derive(Debug, Default)]
struct Exit {
    done: Mutex<Option<(u32, Timestamp)>>,
    cv: Condvar,
}

impl Exit {
    /// Records the exit (the first one counts) and returns what was recorded.
    fn set(&self, code: u32) -> (u32, Timestamp) {
        let mut g = lock(&self.done);
        let rec = g.get_or_insert_with(|| (code, now())).clone();
        self.cv.notify_all();
        rec
    }

    fn get(&self) -> Option<(u32, Timestamp)> {
        lock(&self.done).clone()
    }

    fn wait(&self) -> (u32, Timestamp) {
        let mut g = lock(&self.done);
        loop {
            if let Some(d) = g.clone() {
                return d;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[derive(Debug)]
struct Process {
    req: ExecRequest,
    stdio: Stdio,
    pid: u32,
    controller: Option<ExecController>,
    exit: Arc<Exit>,
}

impl Process {
    fn status(&self) -> Status {
        if self.exit.get().is_some() {
            Status::Stopped
        } else if self.controller.is_some() {
            Status::Running
        } else {
            Status::Created
        }
    }
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    /// The pod (sandbox) this container runs in: the CRI sandbox id, else its own id.
    pod: String,
    /// The root we mounted from containerd's snapshot mounts, when this container joined a
    /// pod (unmounted on delete; the root a pod booted on belongs to the pod).
    mounted_root: Option<PathBuf>,
    /// Where this container's root is bind-mounted in the pod's share (it joined a pod).
    bind: Option<PathBuf>,
    sandbox: Arc<Sandbox>,
    init: Process,
    execs: HashMap<String, Process>,
}

/// One sandbox and the containers in it.
#[derive(Debug)]
struct Pod {
    sandbox: Arc<Sandbox>,
    /// For a CRI pod: the host directory shared at [`POD_GUEST_DIR`]; each container that
    /// joins later has its root bind-mounted at `<share>/<id>` and runs chrooted there.
    share: Option<PathBuf>,
    members: usize,
    /// The root the sandbox booted on, when we mounted it (unmounted when the pod ends).
    base_mount: Option<PathBuf>,
}

/// Where a pod sandbox sees the roots of the containers that joined it.
const POD_GUEST_DIR: &str = "/run/msb-pod";

/// Where pod shares are made: `$MSB_SHIM_RUN_DIR`, else `/run/msb-vmm-shim`.
fn run_dir() -> PathBuf {
    std::env::var_os("MSB_SHIM_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/msb-vmm-shim"))
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("process {exec_id} not found")))
    }

    fn process_mut(&mut self, exec_id: &str) -> TtrpcResult<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("process {exec_id} not found")))
    }
}

/// The task service; cloned into the ttrpc server.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    exit: Arc<ExitSignal>,
    publisher: Mutex<RemotePublisher>,
    containers: Mutex<HashMap<String, Container>>,
    /// Taken after `containers` when both are held.
    pods: Mutex<HashMap<String, Pod>>,
    /// One create at a time: the second container of a pod must find the first's sandbox.
    creating: Mutex<()>,
}

impl Service {
    pub fn new(namespace: &str, exit: Arc<ExitSignal>, publisher: RemotePublisher) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                exit,
                publisher: Mutex::new(publisher),
                containers: Mutex::new(HashMap::new()),
                pods: Mutex::new(HashMap::new()),
                creating: Mutex::new(()),
            }),
        }
    }
}

impl Inner {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let p = lock(&self.publisher);
        if let Err(e) = p.publish(
            containerd_shim::Context::default(),
            topic,
            &self.namespace,
            event,
        ) {
            tracing::warn!("publishing {topic}: {e}");
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        lock(&self.containers)
    }
}

fn container<'a>(all: &'a HashMap<String, Container>, id: &str) -> TtrpcResult<&'a Container> {
    all.get(id)
        .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
}

fn container_mut<'a>(
    all: &'a mut HashMap<String, Container>,
    id: &str,
) -> TtrpcResult<&'a mut Container> {
    all.get_mut(id)
        .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn unimplemented(what: &str) -> ttrpc::Error {
    status(
        Code::UNIMPLEMENTED,
        format!("{what} is not implemented by the msb-vmm shim"),
    )
}

/// The directory for audit logs: `$MSB_SHIM_LOG_DIR`, else `/var/log/msb-vmm`, per namespace.
fn log_dir(namespace: &str) -> PathBuf {
    std::env::var_os("MSB_SHIM_LOG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/log/msb-vmm"))
        .join(namespace)
}

/// Boots the sandbox a plan describes.
fn boot(
    plan: &Plan,
    root: &Path,
    stable_root: bool,
    share: Option<&Path>,
    id: &str,
    namespace: &str,
) -> Result<Sandbox, String> {
    // A read-only root keeps the host tree unchanged: the guest writes to a layer in memory.
    let mut b = if plan.root_readonly {
        Sandbox::builder().rootfs_overlay(root)
    } else {
        Sandbox::builder().rootfs(root)
    };
    // As `msb-vmm run` does: continue a snapshot of a freshly booted sandbox of this
    // configuration (same root, size, mounts) when there is one. Only for a root that
    // stays put (`root.path`): a snapshot root is a new directory per container, whose
    // template would be saved each time and never used; a pod's share is new per pod.
    b = b.warm(stable_root && share.is_none());
    if let Some(n) = plan.cpus {
        b = b.cpus(n);
    }
    if let Some(m) = plan.memory_mib {
        b = b.memory_mib(m);
    }
    if let Some(h) = &plan.hostname {
        b = b.hostname(h.clone());
    }
    for bind in &plan.binds {
        b = b.volume(Volume {
            host: bind.host.clone(),
            guest: bind.guest.clone(),
            read_only: bind.read_only,
            cache: CachePolicy::Auto,
        });
    }
    for (path, size) in &plan.tmpfs {
        b = b.tmpfs(path.clone(), *size);
    }
    if let Some(share) = share {
        b = b.volume(Volume {
            host: share.to_path_buf(),
            guest: POD_GUEST_DIR.into(),
            read_only: false,
            // Roots appear and go as containers join and leave.
            cache: CachePolicy::None,
        });
    }
    let policy = msb_vmm::netconf::policy_from(&plan.policy).map_err(|e| e.to_string())?;
    if !msb_vmm::netconf::airgapped(&policy) {
        let mut net = Network::new(policy);
        let dir = log_dir(namespace);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = dir.join(format!("{id}.net.log"));
        net.log = Some(msb_vmm::netconf::audit_log(&log).map_err(|e| e.to_string())?);
        b = b.network(net);
    }
    b.start().map_err(|e| e.to_string())
}

/// Opens a FIFO containerd made, for writing; `None` when not wired.
fn open_out(path: &str) -> Option<File> {
    if path.is_empty() {
        return None;
    }
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("opening {path}: {e}");
            None
        }
    }
}

/// Runs `req` in `sandbox`, wires its standard streams to containerd's FIFOs and reports its
/// The gRPC code for an exec that failed to start, from the agent's error class (its wording
/// is for people and may change).
fn exec_code(e: &SandboxError) -> Code {
    match e {
        SandboxError::Agent(ClientError::Agent(a)) => match a.kind {
            ErrorKind::NotFound => Code::NOT_FOUND,
            ErrorKind::PermissionDenied => Code::PERMISSION_DENIED,
            ErrorKind::InvalidRequest => Code::INVALID_ARGUMENT,
            ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
            ErrorKind::Spawn | ErrorKind::Io => Code::INTERNAL,
        },
        SandboxError::Paused => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
    }
}

/// exit: returns the guest pid and a controller for signals, stdin and resizes.
fn spawn(
    inner: &Arc<Inner>,
    sandbox: &Sandbox,
    container_id: &str,
    exec_id: &str,
    mut req: ExecRequest,
    stdio: &Stdio,
    exit: Arc<Exit>,
) -> TtrpcResult<(u32, ExecController)> {
    if stdio.terminal && req.pty.is_none() {
        req.pty = Some(TermSize { rows: 24, cols: 80 });
    }
    // A terminal is always the process's input; otherwise only a wired stdin FIFO is.
    req.stdin = req.pty.is_some() || !stdio.stdin.is_empty();
    let mut handle: ExecHandle = sandbox
        .exec(req)
        .map_err(|e| status(exec_code(&e), e.to_string()))?;
    let pid = loop {
        match handle.next_event() {
            Ok(Some(ExecEvent::Started { pid })) => break pid,
            Ok(Some(other)) => tracing::debug!("before start: {other:?}"),
            Ok(None) => {
                return Err(status(
                    Code::INTERNAL,
                    "the process ended before it started",
                ))
            }
            Err(e) => return Err(status(Code::INTERNAL, e.to_string())),
        }
    };
    let controller = handle.controller();
    if !stdio.stdin.is_empty() {
        let path = stdio.stdin.clone();
        let c = handle.controller();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || pump_stdin(&path, c))
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
    } else {
        let _ = handle.close_stdin();
    }
    let (inner, cid, eid) = (inner.clone(), container_id.to_string(), exec_id.to_string());
    let stdio = stdio.clone();
    std::thread::Builder::new()
        .name("output".into())
        .spawn(move || {
            let mut out = open_out(&stdio.stdout);
            let mut err = open_out(&stdio.stderr);
            let mut code = 255u32;
            loop {
                match handle.next_event() {
                    Ok(Some(ExecEvent::Stdout(d))) => write_all(&mut out, &d),
                    Ok(Some(ExecEvent::Stderr(d))) => write_all(&mut err, &d),
                    Ok(Some(ExecEvent::Exited {
                        status, oom_killed, ..
                    })) => {
                        code = status.shell_code() as u32;
                        // Before the exit, as runc's cgroup watcher reports it: the CRI then
                        // gives the container the reason `OOMKilled`.
                        if oom_killed {
                            tracing::warn!("process {cid}/{eid}: ended by the guest's OOM killer");
                            inner.publish(
                                topics::TASK_OOM_EVENT_TOPIC,
                                Box::new(ev::TaskOOM {
                                    container_id: cid.clone(),
                                    ..Default::default()
                                }),
                            );
                        }
                    }
                    Ok(Some(ExecEvent::Started { .. })) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("process {cid}/{eid}: {e}");
                        break;
                    }
                }
            }
            drop((out, err));
            let (code, at) = exit.set(code);
            inner.publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(ev::TaskExit {
                    container_id: cid.clone(),
                    id: if eid.is_empty() { cid } else { eid },
                    pid,
                    exit_status: code,
                    exited_at: MessageField::some(at),
                    ..Default::default()
                }),
            );
        })
        .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
    Ok((pid, controller))
}

fn write_all(f: &mut Option<File>, d: &[u8]) {
    if let Some(file) = f {
        if file.write_all(d).is_err() {
            // The reader went away (ctr detached): drop output from now on.
            *f = None;
        }
    }
}

fn pump_stdin(path: &str, c: ExecController) {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("opening {path}: {e}");
            let _ = c.close_stdin();
            return;
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_stdin(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = c.close_stdin();
}

fn bad(e: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::INVALID_ARGUMENT, e.to_string())
}

impl Service {
    /// Whether container `id` shares its sandbox with other containers.
    fn shares_sandbox(&self, id: &str) -> bool {
        let pod = match self.inner.containers().get(id) {
            Some(c) => c.pod.clone(),
            None => return false,
        };
        lock(&self.inner.pods)
            .get(&pod)
            .is_some_and(|p| p.members > 1)
    }

    /// The sandbox container `id` runs in.
    fn sandbox_of(&self, id: &str) -> TtrpcResult<Arc<Sandbox>> {
        let all = self.inner.containers();
        Ok(container(&all, id)?.sandbox.clone())
    }
}

impl Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        if self.inner.containers().contains_key(&id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id} exists"),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(unimplemented("creating from a checkpoint"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let oci = spec::load(&bundle).map_err(bad)?;
        let plan = spec::plan(&oci, &bundle).map_err(bad)?;
        let (root, mounted_root) = if req.rootfs.is_empty() {
            (plan.root.clone(), None)
        } else {
            let target = bundle.join("rootfs");
            rootfs::mount_all(&req.rootfs, &target).map_err(bad)?;
            (target.clone(), Some(target))
        };
        let cleanup = |e: String| {
            if let Some(t) = &mounted_root {
                rootfs::unmount(t);
            }
            bad(e)
        };
        if !root.is_dir() {
            return Err(cleanup(format!(
                "root file system {}: no such directory",
                root.display()
            )));
        }
        let _creating = lock(&self.inner.creating);
        let pod_id = plan.pod.clone().unwrap_or_else(|| id.clone());
        let joined = {
            let mut pods = lock(&self.inner.pods);
            match pods.get_mut(&pod_id) {
                Some(pod) => {
                    let Some(share) = pod.share.clone() else {
                        return Err(cleanup(format!(
                            "sandbox {pod_id} takes no more containers"
                        )));
                    };
                    let target = share.join(&id);
                    rootfs::bind(&root, &target).map_err(&cleanup)?;
                    pod.members += 1;
                    Some((pod.sandbox.clone(), target))
                }
                None => None,
            }
        };
        let (sandbox, mounted_root, bind, process) = match joined {
            Some((sandbox, target)) => {
                let mut p = plan.process.clone();
                p.root = Some(format!("{POD_GUEST_DIR}/{id}").into_bytes());
                tracing::info!("container {id}: joins sandbox {pod_id}");
                (sandbox, mounted_root, Some(target), p)
            }
            None => {
                let share = match plan.pod {
                    Some(_) => {
                        let dir = run_dir().join(format!("{}-{pod_id}", self.inner.namespace));
                        let _ = std::fs::remove_dir_all(&dir);
                        std::fs::create_dir_all(&dir)
                            .map_err(|e| cleanup(format!("{}: {e}", dir.display())))?;
                        Some(dir)
                    }
                    None => None,
                };
                let sandbox = boot(
                    &plan,
                    &root,
                    mounted_root.is_none(),
                    share.as_deref(),
                    &id,
                    &self.inner.namespace,
                )
                .map_err(|e| {
                    if let Some(d) = &share {
                        let _ = std::fs::remove_dir_all(d);
                    }
                    cleanup(format!("starting the sandbox: {e}"))
                })?;
                tracing::info!("container {id}: sandbox up on {}", root.display());
                let sandbox = Arc::new(sandbox);
                lock(&self.inner.pods).insert(
                    pod_id.clone(),
                    Pod {
                        sandbox: sandbox.clone(),
                        share,
                        members: 1,
                        base_mount: mounted_root,
                    },
                );
                (sandbox, None, None, plan.process.clone())
            }
        };
        let c = Container {
            bundle: bundle.clone(),
            pod: pod_id,
            mounted_root,
            bind,
            sandbox,
            init: Process {
                req: process,
                stdio: Stdio {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
                pid: 0,
                controller: None,
                exit: Arc::new(Exit::default()),
            },
            execs: HashMap::new(),
        };
        self.inner.containers().insert(id.clone(), c);
        self.inner.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(ev::TaskCreate {
                container_id: id,
                bundle: req.bundle,
                rootfs: req.rootfs,
                io: MessageField::some(ev::TaskIO {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse::default())
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let mut all = self.inner.containers();
        let c = container_mut(&mut all, &req.id)?;
        let sandbox = c.sandbox.clone();
        let p = c.process_mut(&req.exec_id)?;
        if p.status() != Status::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("process {}{} already started", req.id, req.exec_id),
            ));
        }
        let (pid, controller) = spawn(
            &self.inner,
            &sandbox,
            &req.id,
            &req.exec_id,
            p.req.clone(),
            &p.stdio,
            p.exit.clone(),
        )?;
        p.pid = pid;
        p.controller = Some(controller);
        drop(all);
        if req.exec_id.is_empty() {
            self.inner.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(ev::TaskStart {
                    container_id: req.id,
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.inner.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(ev::TaskExecStarted {
                    container_id: req.id,
                    exec_id: req.exec_id,
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let process: oci_spec::runtime::Process = match req.spec.as_ref() {
            Some(any) => serde_json::from_slice(&any.value)
                .map_err(|e| bad(format!("exec {}: process spec: {e}", req.exec_id)))?,
            None => return Err(bad(format!("exec {}: no process spec", req.exec_id))),
        };
        let mut exec = spec::process_request(&process).map_err(bad)?;
        let mut all = self.inner.containers();
        let c = container_mut(&mut all, &req.id)?;
        // In the container's root, as its first process.
        exec.root = c.init.req.root.clone();
        if req.exec_id.is_empty() || c.execs.contains_key(&req.exec_id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("exec id {:?} is taken", req.exec_id),
            ));
        }
        c.execs.insert(
            req.exec_id.clone(),
            Process {
                req: exec,
                stdio: Stdio {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                },
                pid: 0,
                controller: None,
                exit: Arc::new(Exit::default()),
            },
        );
        drop(all);
        self.inner.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(ev::TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let all = self.inner.containers();
        let c = container(&all, &req.id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.exit.get();
        let paused = c.sandbox.is_paused();
        let st = match p.status() {
            Status::Created => api::Status::CREATED,
            Status::Running if paused => api::Status::PAUSED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        Ok(api::StateResponse {
            id: req.id,
            bundle: c.bundle.display().to_string(),
            pid: p.pid,
            status: st.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.0).unwrap_or(0),
            exited_at: exit.map(|e| e.1).into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = {
            let all = self.inner.containers();
            let c = container(&all, &req.id)?;
            c.process(&req.exec_id)?.exit.clone()
        };
        let (code, at) = exit.wait();
        Ok(api::WaitResponse {
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let all = self.inner.containers();
        let c = container(&all, &req.id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| bad(format!("signal {}: out of range", req.signal)))?;
        let p = c.process(&req.exec_id)?;
        let mut targets = vec![p];
        if req.all && req.exec_id.is_empty() {
            targets.extend(c.execs.values());
        }
        let mut sent = false;
        for p in targets {
            if p.exit.get().is_some() {
                continue;
            }
            match &p.controller {
                Some(ctl) => {
                    ctl.signal(signal)
                        .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
                    sent = true;
                }
                // Killing a created, never started process ends it (as runc does).
                None => {
                    p.exit.set(128 + signal as u32);
                    sent = true;
                }
            }
        }
        if !sent {
            return Err(status(Code::NOT_FOUND, "process already finished"));
        }
        Ok(api::Empty::default())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut all = self.inner.containers();
        let c = container_mut(&mut all, &req.id)?;
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if p.status() == Status::Running {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is running: kill it first", req.exec_id),
                ));
            }
            let p = c.execs.remove(&req.exec_id).expect("looked up above");
            let (code, at) = p.exit.get().unwrap_or((0, now()));
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            });
        }
        if c.init.status() == Status::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is running: kill it first", req.id),
            ));
        }
        let c = all.remove(&req.id).expect("looked up above");
        drop(all);
        let (code, at) = c.init.exit.get().unwrap_or((0, now()));
        let pid = c.init.pid;
        self.leave(c);
        self.inner.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(ev::TaskDelete {
                container_id: req.id.clone(),
                id: req.id,
                pid,
                exit_status: code,
                exited_at: MessageField::some(at.clone()),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid,
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let all = self.inner.containers();
        let c = container(&all, &req.id)?;
        let processes = std::iter::once(&c.init)
            .chain(c.execs.values())
            .filter(|p| p.status() == Status::Running)
            .map(|p| api::ProcessInfo {
                pid: p.pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let all = self.inner.containers();
        let c = container(&all, &req.id)?;
        let p = c.process(&req.exec_id)?;
        let size = TermSize {
            rows: req.height.min(u16::MAX as u32) as u16,
            cols: req.width.min(u16::MAX as u32) as u16,
        };
        if let Some(ctl) = &p.controller {
            ctl.resize(size)
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        }
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let all = self.inner.containers();
        let c = container(&all, &req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            if let Some(ctl) = &p.controller {
                let _ = ctl.close_stdin();
            }
        }
        Ok(api::Empty::default())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let all = self.inner.containers();
        let task_pid = all.get(&req.id).map(|c| c.init.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: format!("msb-vmm {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let mut all = self.inner.containers();
        if !req.now && !all.is_empty() {
            return Ok(api::Empty::default());
        }
        let left: Vec<Container> = all.drain().map(|(_, c)| c).collect();
        drop(all);
        for c in left {
            self.leave(c);
        }
        self.inner.exit.signal();
        Ok(api::Empty::default())
    }

    /// The sandbox's figures in cgroup v1 form (what `ctr task metrics` and the CRI read):
    /// the guest's processes, its memory in use of its total, and the vCPUs' CPU time.
    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let sandbox = self.sandbox_of(&req.id)?;
        let st = sandbox.stats();
        let guest = st.guest.unwrap_or_default();
        let m = metrics::Metrics {
            pids: MessageField::some(metrics::PidsStat {
                current: guest.processes,
                ..Default::default()
            }),
            cpu: MessageField::some(metrics::CPUStat {
                usage: MessageField::some(metrics::CPUUsage {
                    total: (st.vcpu_time_s * 1e9) as u64,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(metrics::MemoryStat {
                usage: MessageField::some(metrics::MemoryEntry {
                    usage: guest.memory_used_bytes,
                    limit: if guest.memory_total_bytes > 0 {
                        guest.memory_total_bytes
                    } else {
                        st.memory.guest_bytes
                    },
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(m))
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    /// Pauses the container's sandbox: its vCPUs stop, every process in it stands still.
    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let sandbox = self.sandbox_of(&req.id)?;
        if self.shares_sandbox(&req.id) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "pausing one container of a pod that shares a sandbox is not supported",
            ));
        }
        sandbox
            .pause()
            .map_err(|e| status(Code::FAILED_PRECONDITION, e.to_string()))?;
        self.inner.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(ev::TaskPaused {
                container_id: req.id,
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let sandbox = self.sandbox_of(&req.id)?;
        if self.shares_sandbox(&req.id) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "resuming one container of a pod that shares a sandbox is not supported",
            ));
        }
        sandbox.resume();
        self.inner.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(ev::TaskResumed {
                container_id: req.id,
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("checkpoint"))
    }

    fn update(&self, _ctx: &TtrpcContext, _req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("update"))
    }
}

impl Service {
    /// Takes a deleted container out of its pod: its processes count as killed, its root
    /// goes from the pod's share and is unmounted; the last container out powers the
    /// sandbox off and unmounts the root it booted on.
    fn leave(&self, c: Container) {
        // (An exit already recorded stands.)
        for p in std::iter::once(&c.init).chain(c.execs.values()) {
            p.exit.set(137);
        }
        let Container {
            pod: pod_id,
            mounted_root,
            bind,
            sandbox,
            ..
        } = c;
        drop(sandbox);
        if let Some(b) = &bind {
            rootfs::unmount(b);
            let _ = std::fs::remove_dir(b);
        }
        if let Some(t) = &mounted_root {
            rootfs::unmount(t);
        }
        let pod = {
            let mut pods = lock(&self.inner.pods);
            match pods.get_mut(&pod_id) {
                Some(p) if p.members > 1 => {
                    p.members -= 1;
                    None
                }
                Some(_) => pods.remove(&pod_id),
                None => None,
            }
        };
        let Some(pod) = pod else { return };
        match Arc::try_unwrap(pod.sandbox) {
            Ok(sb) => {
                if let Err(e) = sb.shutdown() {
                    tracing::warn!("sandbox {pod_id} shutdown: {e}");
                }
            }
            // A call in flight (stats, start) still holds it: its drop, the last, powers it
            // off (`Sandbox`'s `Drop`).
            Err(sb) => drop(sb),
        }
        if let Some(t) = &pod.base_mount {
            rootfs::unmount(t);
        }
        if let Some(d) = &pod.share {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msb_init::agent::AgentError;

    fn refused(kind: ErrorKind, message: &str) -> SandboxError {
        SandboxError::Agent(ClientError::Agent(AgentError {
            kind,
            message: message.into(),
        }))
    }

    #[test]
    fn exec_failures_map_by_their_class_not_their_wording() {
        let cases = [
            (ErrorKind::NotFound, "nosuch: no such file", Code::NOT_FOUND),
            (
                ErrorKind::PermissionDenied,
                "/x: denied",
                Code::PERMISSION_DENIED,
            ),
            (
                ErrorKind::InvalidRequest,
                "empty argv",
                Code::INVALID_ARGUMENT,
            ),
            (ErrorKind::AlreadyExists, "exists", Code::ALREADY_EXISTS),
            // The guest's wording says "not found", its class says the start failed.
            (ErrorKind::Spawn, "libc.so.6: not found", Code::INTERNAL),
            (ErrorKind::Io, "read: not found", Code::INTERNAL),
        ];
        for (kind, message, code) in cases {
            assert_eq!(exec_code(&refused(kind, message)), code, "{kind:?}");
        }
        assert_eq!(exec_code(&SandboxError::Paused), Code::FAILED_PRECONDITION);
        assert_eq!(
            exec_code(&SandboxError::Agent(ClientError::Closed)),
            Code::INTERNAL
        );
    }
}
