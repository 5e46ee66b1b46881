//! `msb_vmm._native`: the Python SDK's native layer over the `msb-vmm` crate.
//!
//! It is deliberately thin: sandboxes, processes and files as the Rust library has them, every
//! blocking call made with the interpreter detached (other Python threads run meanwhile) and
//! cut into short waits so Ctrl-C and asyncio cancellation are noticed. The Pythonic surface
//! (context managers, typed events, the async API, `check=True`) lives in `msb_vmm/*.py`, and
//! the exception classes in `msb_vmm/errors.py`, which this module raises by name.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use msb_init::agent::{ErrorKind, FileKind};
use msb_vmm::sandbox::{
    ClientError, ExecController, ExecEvent, ExecHandle, ExecRequest, ExitStatus, FileStat, Network,
    Publish, Sandbox, SandboxError, TermSize, Volume,
};
use msb_vmm::vm::VmError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

/// How long one detached wait lasts before Python gets a chance to see a signal (Ctrl-C) or
/// a cancellation.
const SLICE: Duration = Duration::from_millis(100);

/// A `msb_vmm.errors` exception of class `class` with `args`.
fn raise<'py, A>(py: Python<'py>, class: &str, args: A) -> PyErr
where
    A: pyo3::call::PyCallArgs<'py>,
{
    match py
        .import("msb_vmm.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1(args))
    {
        Ok(e) => PyErr::from_value(e),
        Err(e) => e,
    }
}

/// The exception class for a library error, by what the user can do about it.
fn class_of(e: &SandboxError) -> &'static str {
    match e {
        SandboxError::Vm(VmError::Hypervisor(_) | VmError::Loader(_) | VmError::KernelLoad(_))
        | SandboxError::Initramfs(_)
        | SandboxError::Confine(_) => "SetupError",
        SandboxError::Vm(
            VmError::BadCpus(_)
            | VmError::BadMemory { .. }
            | VmError::BadShare(_)
            | VmError::TooManyShares(_),
        )
        | SandboxError::BadHostname(_)
        | SandboxError::BadVolume(_)
        | SandboxError::Share(_) => "ConfigError",
        SandboxError::Network(_) | SandboxError::Policy(_) => "PolicyError",
        SandboxError::Image(_) => "ImageError",
        _ => "SandboxError",
    }
}

fn sandbox_err(py: Python<'_>, e: SandboxError) -> PyErr {
    if let SandboxError::Agent(c) = e {
        return client_err(py, c);
    }
    let err = raise(py, class_of(&e), (e.to_string(),));
    let tail = e.console_tail();
    if !tail.is_empty() {
        let _ = err.value(py).setattr("console_tail", tail.to_vec());
    }
    err
}

/// Agent errors: files that are missing, forbidden or in the way are Python's own `OSError`
/// kinds (as `open` and `subprocess` raise them); the rest are `SandboxError`s.
fn client_err(py: Python<'_>, e: ClientError) -> PyErr {
    match &e {
        ClientError::Agent(a) => {
            let (class, errno) = match a.kind {
                ErrorKind::NotFound => ("GuestFileNotFoundError", libc::ENOENT),
                ErrorKind::PermissionDenied => ("GuestPermissionError", libc::EACCES),
                ErrorKind::AlreadyExists => ("GuestFileExistsError", libc::EEXIST),
                ErrorKind::InvalidRequest => return raise(py, "ConfigError", (a.message.clone(),)),
                ErrorKind::Io | ErrorKind::Spawn => {
                    return raise(py, "SandboxError", (a.message.clone(),))
                }
            };
            raise(py, class, (errno, a.message.clone()))
        }
        _ => raise(py, "SandboxError", (e.to_string(),)),
    }
}

fn config_err(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    raise(py, "ConfigError", (msg.into(),))
}

fn policy_err(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    raise(py, "PolicyError", (msg.into(),))
}

/// What a native sandbox drives: one this process runs, or a named one another process
/// (`msb-vmm start`) runs, reached through its agent socket.
enum Backend {
    Owned(Box<Sandbox>),
    Named(msb_vmm::sandbox::AgentClient),
}

impl Backend {
    fn agent(&self) -> Result<&msb_vmm::sandbox::AgentClient, SandboxError> {
        match self {
            Backend::Owned(sb) => sb.live_agent(),
            Backend::Named(a) => Ok(a),
        }
    }

    fn exec(&self, req: ExecRequest) -> Result<ExecHandle, SandboxError> {
        match self {
            Backend::Owned(sb) => sb.exec(sb.image_request(req, false)?),
            Backend::Named(a) => Ok(a.exec(req)?),
        }
    }
}

/// A sandbox: `Sandbox.create(...)` boots one in this process, `Sandbox.connect(name)`
/// reaches a named one.
#[pyclass(frozen, module = "msb_vmm._native", name = "Sandbox")]
struct PySandbox {
    backend: RwLock<Option<Backend>>,
    name: Option<String>,
}

/// The network arguments `msb_vmm.Network` passes down.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct NetArgs {
    preset: Option<String>,
    allow: Vec<String>,
    deny: Vec<String>,
    policy_file: Option<PathBuf>,
    publish: Vec<String>,
    audit_log: Option<PathBuf>,
    mtu: u16,
    max_flows: usize,
    /// (name, hosts, value); no value: the environment variable of that name.
    secrets: Vec<(String, String, Option<Vec<u8>>)>,
}

fn network(py: Python<'_>, n: NetArgs) -> PyResult<Option<Network>> {
    use msb_vmm::netconf;
    let file = match &n.policy_file {
        Some(p) => Some((
            p.display().to_string(),
            std::fs::read_to_string(p)
                .map_err(|e| policy_err(py, format!("policy file {}: {e}", p.display())))?,
        )),
        None => None,
    };
    let flags = netconf::PolicyFlags {
        net: n.preset,
        allow: n.allow,
        deny: n.deny,
        file,
    };
    let policy = netconf::policy_from(&flags).map_err(|e| policy_err(py, e.0))?;
    if !(68..=65520).contains(&n.mtu) {
        return Err(config_err(py, format!("mtu {}: use 68 to 65520", n.mtu)));
    }
    if n.max_flows == 0 {
        return Err(config_err(
            py,
            "max_flows 0: use at least 1 (or preset \"none\")",
        ));
    }
    let publish = n
        .publish
        .iter()
        .map(|p| Publish::parse(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_err(py, e.to_string()))?;
    if netconf::airgapped(&policy) && publish.is_empty() && n.secrets.is_empty() {
        return Ok(None);
    }
    let mut secrets = Vec::new();
    for spec in &policy.secrets {
        secrets.push(netconf::policy_secret(spec).map_err(|e| policy_err(py, e.0))?);
    }
    for (name, hosts, value) in n.secrets {
        let value = match value {
            Some(v) => v,
            None => netconf::env_secret(&name).ok_or_else(|| {
                policy_err(
                    py,
                    format!("secret {name}: the environment variable {name} is not set (set it, or pass the value)"),
                )
            })?,
        };
        secrets.push(
            msb_netstack::secrets::Secret::new(&name, value, &hosts)
                .map_err(|e| policy_err(py, format!("secret {name}: {e}")))?,
        );
    }
    let mut net = Network::new(policy);
    net.mtu = n.mtu;
    net.max_flows = n.max_flows;
    net.publish = publish;
    if !secrets.is_empty() {
        let opts = msb_vmm::tls::TlsOptions {
            secrets: msb_netstack::secrets::Secrets::new(secrets)
                .map_err(|e| policy_err(py, format!("secrets: {e}")))?,
            ..Default::default()
        };
        net.intercept = Some(
            opts.build()
                .map_err(|e| raise(py, "SetupError", (format!("TLS interception: {e}"),)))?,
        );
    }
    if let Some(path) = &n.audit_log {
        net.log = Some(netconf::audit_log(path).map_err(|e| config_err(py, e.0))?);
    }
    Ok(Some(net))
}

/// argv, environment and paths arrive as `str` or `bytes`; the guest gets bytes.
fn bytes_of(v: OsString) -> Vec<u8> {
    v.into_vec()
}

/// The request `exec` and `run` send.
#[allow(clippy::too_many_arguments)]
fn request(
    py: Python<'_>,
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<OsString>,
    user: Option<String>,
    stdin: bool,
    tty: Option<(u16, u16)>,
    timeout: Option<f64>,
) -> PyResult<ExecRequest> {
    if argv.is_empty() {
        return Err(config_err(
            py,
            "an empty command: give at least the program",
        ));
    }
    let mut req = msb_vmm::sandbox::request(argv);
    req.env = env
        .into_iter()
        .map(|(k, v)| (bytes_of(k), bytes_of(v)))
        .collect();
    if let Some((k, _)) = req
        .env
        .iter()
        .find(|(k, _)| k.is_empty() || k.contains(&b'='))
    {
        return Err(config_err(
            py,
            format!(
                "env: invalid variable name {:?}",
                String::from_utf8_lossy(k)
            ),
        ));
    }
    req.workdir = cwd.map(bytes_of);
    req.user = match user {
        Some(u) => Some(
            msb_vmm::sandbox::parse_user(&u).map_err(|e| config_err(py, format!("user {e}")))?,
        ),
        None => None,
    };
    req.stdin = stdin;
    req.pty = tty.map(|(rows, cols)| TermSize { rows, cols });
    req.timeout_ms = match timeout {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            return Err(config_err(
                py,
                format!("timeout {t}: use a positive number of seconds"),
            ))
        }
        Some(t) => Some(((t * 1000.0).ceil() as u64).max(1)),
        None => None,
    };
    Ok(req)
}

/// One `bytes` of the chunks, copied once.
fn joined<'py>(py: Python<'py>, chunks: &[Vec<u8>]) -> PyResult<Bound<'py, PyBytes>> {
    let len = chunks.iter().map(Vec::len).sum();
    PyBytes::new_with(py, len, |buf| {
        let mut at = 0;
        for c in chunks {
            buf[at..at + c.len()].copy_from_slice(c);
            at += c.len();
        }
        Ok(())
    })
}

/// `(exit_code, signal)` of a status.
fn status_pair(s: ExitStatus) -> (Option<i32>, Option<i32>) {
    match s {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(s)),
    }
}

fn kind_name(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "symlink",
        FileKind::CharDevice => "char_device",
        FileKind::BlockDevice => "block_device",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
    }
}

type StatTuple = (&'static str, u32, u64, u32, u32, i64);

fn stat_tuple(s: &FileStat) -> StatTuple {
    (kind_name(s.kind), s.mode, s.size, s.uid, s.gid, s.mtime)
}

/// A Python binary file object as `io::Write` (for streaming a guest file out).
struct PyWriter(Py<PyAny>);

impl Write for PyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Python::attach(|py| {
            self.0
                .call_method1(py, "write", (PyBytes::new(py, buf),))
                .map(|_| buf.len())
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A Python binary file object as `io::Read` (for streaming a host file in).
struct PyReader(Py<PyAny>);

impl Read for PyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Python::attach(|py| {
            let chunk = self
                .0
                .call_method1(py, "read", (buf.len(),))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let chunk = chunk.bind(py);
            let data = chunk.cast::<PyBytes>().map_err(|_| {
                std::io::Error::other(
                    "the file object's read() must return bytes (open it in binary mode)",
                )
            })?;
            let data = data.as_bytes();
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            Ok(n)
        })
    }
}

impl PySandbox {
    /// Runs `f` on the live backend with the interpreter detached.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Backend) -> Result<T, SandboxError> + Send,
    ) -> PyResult<T> {
        let r = py.detach(|| {
            let guard = self.backend.read().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some(b) => Ok(f(b)),
                None => Err(()),
            }
        });
        match r {
            Ok(r) => r.map_err(|e| sandbox_err(py, e)),
            Err(()) => Err(raise(py, "SandboxError", ("the sandbox is stopped",))),
        }
    }
}

#[pymethods]
impl PySandbox {
    /// Boots a sandbox in this process; returns once its agent answers.
    #[staticmethod]
    #[pyo3(signature = (*, cpus, memory_mib, kernel, rootfs, image, insecure_registries,
        volumes, tmpfs, hostname, network, boot_timeout, lifetime, console))]
    #[allow(clippy::too_many_arguments)]
    fn create(
        py: Python<'_>,
        cpus: u32,
        memory_mib: u64,
        kernel: Option<PathBuf>,
        rootfs: Option<PathBuf>,
        image: Option<String>,
        insecure_registries: Vec<String>,
        volumes: Vec<String>,
        tmpfs: Vec<(PathBuf, u64)>,
        hostname: Option<String>,
        network: Option<NetArgs>,
        boot_timeout: Option<f64>,
        lifetime: Option<f64>,
        console: bool,
    ) -> PyResult<PySandbox> {
        let mut b = Sandbox::builder()
            .cpus(cpus)
            .memory_mib(memory_mib)
            .console(console);
        if let Some(k) = kernel {
            b = b.kernel(k);
        }
        if let Some(h) = hostname {
            b = b.hostname(h);
        }
        if let Some(t) = boot_timeout {
            if !(t > 0.0 && t.is_finite()) {
                return Err(config_err(
                    py,
                    format!("boot_timeout {t}: use a positive number of seconds"),
                ));
            }
            b = b.boot_timeout(Duration::from_secs_f64(t));
        }
        if let Some(t) = lifetime {
            if !(t > 0.0 && t.is_finite()) {
                return Err(config_err(
                    py,
                    format!("timeout {t}: use a positive number of seconds"),
                ));
            }
            b = b.vm_timeout(Some(Duration::from_secs_f64(t)));
        }
        for v in &volumes {
            b = b.volume(Volume::parse(v).map_err(|e| config_err(py, e.to_string()))?);
        }
        for (guest, size) in tmpfs {
            b = b.tmpfs(guest, size);
        }
        if let Some(n) = network {
            if let Some(net) = self::network(py, n)? {
                b = b.network(net);
            }
        }
        let b = match (image, rootfs) {
            (Some(_), Some(_)) => {
                return Err(config_err(py, "image and rootfs: give one root, not both"))
            }
            (Some(name), None) => {
                let opts = msb_vmm::image::PullOptions {
                    insecure_registries,
                    progress: false,
                    verbose: false,
                };
                py.detach(|| b.image(&name, &opts))
                    .map_err(|e| sandbox_err(py, e))?
            }
            (None, Some(dir)) if dir.as_os_str() == msb_vmm::assets::INITRAMFS_ROOT => b,
            (None, Some(dir)) => {
                let abs = std::fs::canonicalize(&dir)
                    .map_err(|e| config_err(py, format!("rootfs {}: {e}", dir.display())))?;
                if !abs.is_dir() {
                    return Err(config_err(
                        py,
                        format!("rootfs {}: not a directory", dir.display()),
                    ));
                }
                b.rootfs(abs)
            }
            (None, None) => b.default_rootfs().map_err(|e| sandbox_err(py, e))?,
        };
        let sb = py.detach(|| b.start()).map_err(|e| sandbox_err(py, e))?;
        Ok(PySandbox {
            backend: RwLock::new(Some(Backend::Owned(Box::new(sb)))),
            name: None,
        })
    }

    /// Reaches the named sandbox `name` (started by `msb-vmm start` or `Sandbox.start`).
    #[staticmethod]
    fn connect(py: Python<'_>, name: String) -> PyResult<PySandbox> {
        msb_vmm::named::check_name(&name).map_err(|e| config_err(py, e.to_string()))?;
        let dir = msb_vmm::named::state_root().join(&name);
        if !dir.join("ready").exists() {
            return Err(raise(
                py,
                "SandboxError",
                (format!(
                    "no running sandbox named {name} (see `msb-vmm ls`)"
                ),),
            ));
        }
        let agent = py
            .detach(|| msb_vmm::named::connect(&dir))
            .map_err(|e| raise(py, "SandboxError", (format!("sandbox {name}: {e}"),)))?;
        Ok(PySandbox {
            backend: RwLock::new(Some(Backend::Named(agent))),
            name: Some(name),
        })
    }

    /// An agent served on a Unix socket (`msb-init agent --listen PATH`): the host-transport
    /// tier's way to test and benchmark the SDK at full speed without a VM.
    #[staticmethod]
    fn _connect_agent_socket(py: Python<'_>, path: PathBuf) -> PyResult<PySandbox> {
        let agent = py
            .detach(|| -> Result<_, String> {
                let s = std::os::unix::net::UnixStream::connect(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                msb_vmm::sandbox::AgentClient::connect(s, Duration::from_secs(10))
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| raise(py, "SandboxError", (e,)))?;
        Ok(PySandbox {
            backend: RwLock::new(Some(Backend::Named(agent))),
            name: None,
        })
    }

    /// The Rust API's own figures over this sandbox's connection, for the benchmark's
    /// same-run baseline: `n` round trips of `true` (milliseconds each).
    fn _rust_round_trips(&self, py: Python<'_>, n: usize) -> PyResult<Vec<f64>> {
        self.with(py, |b| {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let status = b.exec(msb_vmm::sandbox::request(["true"]))?.wait()?;
                out.push(t.elapsed().as_secs_f64() * 1000.0);
                if !status.success() {
                    return Err(SandboxError::Agent(ClientError::Protocol(format!(
                        "`true` failed: {status:?}"
                    ))));
                }
            }
            Ok(out)
        })
    }

    /// The Rust API's stdout throughput (MB/s) over this connection: `bytes` of
    /// `head -c BYTES /dev/zero` taken event by event, or with `collect` gathered by
    /// `ExecHandle::output` (what `run` does).
    #[pyo3(signature = (bytes, collect=false))]
    fn _rust_throughput(&self, py: Python<'_>, bytes: u64, collect: bool) -> PyResult<f64> {
        self.with(py, |b| {
            let count = bytes.to_string();
            let t = Instant::now();
            let mut h = b.exec(msb_vmm::sandbox::request([
                "head",
                "-c",
                &count,
                "/dev/zero",
            ]))?;
            let got = if collect {
                h.output()?.stdout.len() as u64
            } else {
                let mut got = 0u64;
                while let Some(e) = h.next_event()? {
                    if let ExecEvent::Stdout(d) = e {
                        got += d.len() as u64;
                    }
                }
                got
            };
            if got != bytes {
                return Err(SandboxError::Agent(ClientError::Protocol(format!(
                    "received {got} of {bytes} bytes"
                ))));
            }
            Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e6)
        })
    }

    /// The name of a named sandbox; None for one this process runs.
    #[getter]
    fn name(&self) -> Option<String> {
        self.name.clone()
    }

    /// Whether the sandbox can still run commands here.
    #[getter]
    fn alive(&self) -> bool {
        self.backend
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Seconds from the VMM's start to the agent's first answer (sandboxes this process runs).
    #[getter]
    fn ready_seconds(&self) -> Option<f64> {
        match self
            .backend
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(Backend::Owned(sb)) => Some(sb.ready_time().as_secs_f64()),
            _ => None,
        }
    }

    /// Starts a process; events come from the returned `Process`.
    #[pyo3(signature = (argv, *, env, cwd, user, stdin, tty, timeout))]
    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        py: Python<'_>,
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: Option<OsString>,
        user: Option<String>,
        stdin: bool,
        tty: Option<(u16, u16)>,
        timeout: Option<f64>,
    ) -> PyResult<Process> {
        let req = request(py, argv, env, cwd, user, stdin, tty, timeout)?;
        let h = self.with(py, |b| b.exec(req))?;
        Ok(Process {
            ctl: h.controller(),
            handle: Mutex::new(Some(h)),
        })
    }

    /// Runs a process to its end: `(exit_code, signal, timed_out, oom_killed, stdout,
    /// stderr)`. A
    /// KeyboardInterrupt (or any signal handler's exception) kills the guest process first.
    #[pyo3(signature = (argv, *, env, cwd, user, stdin, tty, timeout))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: Option<OsString>,
        user: Option<String>,
        stdin: Option<Vec<u8>>,
        tty: Option<(u16, u16)>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let req = request(py, argv, env, cwd, user, stdin.is_some(), tty, timeout)?;
        let mut h = self.with(py, |b| b.exec(req))?;
        let ctl = h.controller();
        if let Some(data) = stdin {
            // A feeder thread: a process that writes before it reads must not deadlock
            // against us waiting to write.
            let feeder = ctl.clone();
            std::thread::spawn(move || {
                let _ = feeder.write_stdin(&data);
                let _ = feeder.close_stdin();
            });
        }
        // Chunks as they came, joined once into the result (no regrowing copies).
        let (mut out, mut err) = (Vec::new(), Vec::new());
        // Output is gathered detached; the interpreter is taken back only between slices
        // (to see a signal) and at the end.
        enum Step {
            Done(ExitStatus, bool, bool),
            Tick,
            Failed(ClientError),
        }
        loop {
            let step = py.detach(|| loop {
                h.set_deadline(Some(Instant::now() + SLICE));
                match h.next_event() {
                    Ok(Some(ExecEvent::Stdout(d))) => out.push(d),
                    Ok(Some(ExecEvent::Stderr(d))) => err.push(d),
                    Ok(Some(ExecEvent::Started { .. })) => {}
                    Ok(Some(ExecEvent::Exited {
                        status,
                        timed_out,
                        oom_killed,
                    })) => return Step::Done(status, timed_out, oom_killed),
                    Ok(None) => {
                        return Step::Failed(ClientError::Protocol(
                            "the process ended without an exit status".into(),
                        ))
                    }
                    Err(ClientError::Timeout) => return Step::Tick,
                    Err(e) => return Step::Failed(e),
                }
            });
            match step {
                Step::Done(status, timed_out, oom_killed) => {
                    let (code, sig) = status_pair(status);
                    let (out, err) = (joined(py, &out)?, joined(py, &err)?);
                    return (code, sig, timed_out, oom_killed, out, err).into_pyobject(py);
                }
                Step::Tick => {
                    if let Err(e) = py.check_signals() {
                        let _ = ctl.kill();
                        return Err(e);
                    }
                }
                Step::Failed(e) => return Err(client_err(py, e)),
            }
        }
    }

    /// A guest file's bytes.
    fn read_file<'py>(&self, py: Python<'py>, path: OsString) -> PyResult<Bound<'py, PyBytes>> {
        let path = bytes_of(path);
        let data = self.with(py, |b| {
            let mut out = Vec::new();
            b.agent()?.read_file(&path, &mut out)?;
            Ok(out)
        })?;
        Ok(PyBytes::new(py, &data))
    }

    /// Streams a guest file into a binary file object; returns the bytes copied.
    fn read_file_into(&self, py: Python<'_>, path: OsString, file: Py<PyAny>) -> PyResult<u64> {
        let path = bytes_of(path);
        self.with(py, |b| {
            Ok(b.agent()?.read_file(&path, &mut PyWriter(file))?)
        })
    }

    /// Writes a guest file (parents created) from bytes.
    fn write_file(&self, py: Python<'_>, path: OsString, data: Vec<u8>, mode: u32) -> PyResult<()> {
        let path = bytes_of(path);
        self.with(py, |b| {
            b.agent()?.write_file(&path, mode, true, &mut &data[..])?;
            Ok(())
        })
    }

    /// Writes a guest file (parents created) from a binary file object, streamed.
    fn write_file_from(
        &self,
        py: Python<'_>,
        path: OsString,
        file: Py<PyAny>,
        mode: u32,
    ) -> PyResult<()> {
        let path = bytes_of(path);
        self.with(py, |b| {
            b.agent()?
                .write_file(&path, mode, true, &mut PyReader(file))?;
            Ok(())
        })
    }

    /// `(kind, mode, size, uid, gid, mtime)` of a guest path.
    fn stat(&self, py: Python<'_>, path: OsString) -> PyResult<StatTuple> {
        let path = bytes_of(path);
        let s = self.with(py, |b| Ok(b.agent()?.stat(&path)?))?;
        Ok(stat_tuple(&s))
    }

    /// `[(name, (kind, mode, size, uid, gid, mtime)), ...]` of a guest directory.
    fn list_dir<'py>(
        &self,
        py: Python<'py>,
        path: OsString,
    ) -> PyResult<Vec<(Bound<'py, PyBytes>, StatTuple)>> {
        let path = bytes_of(path);
        let entries = self.with(py, |b| Ok(b.agent()?.list_dir(&path)?))?;
        Ok(entries
            .iter()
            .map(|e| (PyBytes::new(py, &e.name), stat_tuple(&e.stat)))
            .collect())
    }

    /// Removes a guest path (a directory's contents too with `recursive`).
    fn remove(&self, py: Python<'_>, path: OsString, recursive: bool) -> PyResult<()> {
        let path = bytes_of(path);
        self.with(py, |b| Ok(b.agent()?.remove(&path, recursive)?))
    }

    /// Stops the sandbox: a sandbox this process runs powers off (and is killed if it does
    /// not within the library's grace); a named one is only disconnected (`msb-vmm stop` or
    /// `Sandbox.stop()` in Python ends it). Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = py.detach(|| {
            self.backend
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take()
        });
        match taken {
            Some(Backend::Owned(sb)) => py
                .detach(|| sb.shutdown())
                .map(|_| ())
                .map_err(|e| sandbox_err(py, e)),
            Some(Backend::Named(a)) => {
                py.detach(|| drop(a));
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// A process running in a sandbox.
#[pyclass(frozen, module = "msb_vmm._native")]
struct Process {
    handle: Mutex<Option<ExecHandle>>,
    ctl: ExecController,
}

#[pymethods]
impl Process {
    /// The next event, waiting at most `wait` seconds (None: until one comes): `None` when
    /// none came in time, `()` after the last, else `("started", pid)`, `("stdout", bytes)`,
    /// `("stderr", bytes)` or `("exited", exit_code, signal, timed_out, oom_killed)`.
    #[pyo3(signature = (wait=None))]
    fn next_event<'py>(
        &self,
        py: Python<'py>,
        wait: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let until = match wait {
            Some(w) if w.is_finite() && w >= 0.0 => {
                Some(Instant::now() + Duration::from_secs_f64(w))
            }
            Some(w) => return Err(config_err(py, format!("wait {w}: use seconds >= 0"))),
            None => None,
        };
        loop {
            let slice_end = Instant::now() + SLICE;
            let deadline = until.map_or(slice_end, |u| u.min(slice_end));
            let ev = py.detach(|| {
                let mut g = self.handle.lock().unwrap_or_else(|p| p.into_inner());
                match g.as_mut() {
                    Some(h) => {
                        h.set_deadline(Some(deadline));
                        let r = h.next_event();
                        if matches!(r, Ok(None)) {
                            *g = None;
                        }
                        r
                    }
                    None => Ok(None),
                }
            });
            return match ev {
                Ok(None) => Ok(Some(PyTuple::empty(py))),
                Ok(Some(ExecEvent::Started { pid })) => {
                    Ok(Some(("started", pid).into_pyobject(py)?))
                }
                Ok(Some(ExecEvent::Stdout(d))) => {
                    Ok(Some(("stdout", PyBytes::new(py, &d)).into_pyobject(py)?))
                }
                Ok(Some(ExecEvent::Stderr(d))) => {
                    Ok(Some(("stderr", PyBytes::new(py, &d)).into_pyobject(py)?))
                }
                Ok(Some(ExecEvent::Exited {
                    status,
                    timed_out,
                    oom_killed,
                })) => {
                    let (code, sig) = status_pair(status);
                    Ok(Some(
                        ("exited", code, sig, timed_out, oom_killed).into_pyobject(py)?,
                    ))
                }
                Err(ClientError::Timeout) => {
                    py.check_signals()?;
                    if until.is_some_and(|u| Instant::now() >= u) {
                        Ok(None)
                    } else {
                        continue;
                    }
                }
                Err(e) => Err(client_err(py, e)),
            };
        }
    }

    /// Writes to the process's stdin (it must have been started with `stdin=True`).
    fn write_stdin(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<()> {
        py.detach(|| self.ctl.write_stdin(&data))
            .map_err(|e| client_err(py, e))
    }

    /// Closes the process's stdin (it reads end of file).
    fn close_stdin(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.ctl.close_stdin())
            .map_err(|e| client_err(py, e))
    }

    /// Sends a signal to the process group.
    fn signal(&self, py: Python<'_>, signal: i32) -> PyResult<()> {
        if !(1..=64).contains(&signal) {
            return Err(config_err(py, format!("signal {signal}: use 1 to 64")));
        }
        self.ctl.signal(signal).map_err(|e| client_err(py, e))
    }

    /// Kills the process group (SIGKILL in the guest).
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        self.ctl.kill().map_err(|e| client_err(py, e))
    }

    /// Resizes the process's terminal (processes started with `tty`).
    fn resize(&self, py: Python<'_>, rows: u16, cols: u16) -> PyResult<()> {
        self.ctl
            .resize(TermSize { rows, cols })
            .map_err(|e| client_err(py, e))
    }
}

/// The tag of this build, so the Python layer can say which native module it loaded.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySandbox>()?;
    m.add_class::<Process>()?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
