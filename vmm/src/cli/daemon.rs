//! Long-running sandboxes: `start` launches a detached `msb-vmm __serve` process per sandbox
//! and waits for its agent; `exec`, `cp`, `ls` and `stop` reach it through its state directory:
//!
//! ```text
//! $MSB_STATE_DIR (default $XDG_RUNTIME_DIR/msb-vmm, else ~/.local/state/msb-vmm)
//!   NAME/pid         the serving process
//!   NAME/vsock.sock  hybrid vsock (CONNECT <port>\n → OK <port>\n)
//!   NAME/info.json   cpus, memory, start time, boot figures
//!   NAME/ready       written once the agent answered
//!   NAME/log         the serving process's stderr
//! ```
//!
//! A sandbox whose serving process died is noticed by any command that touches it, and its
//! directory removed.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use msb_vmm::named::{state_root, valid_name};
use msb_vmm::sandbox::{AgentClient, FileStat, Sandbox};

use super::{exec_request, exec_result_code, interact, Signals, EXIT_FAILURE};
use crate::{ExecArgs, StartArgs};

/// How long `start` waits for the sandbox's agent.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// [`START_TIMEOUT`], or `$MSB_BOOT_TIMEOUT` where that is longer.
fn start_timeout() -> Duration {
    msb_vmm::sandbox::env_boot_timeout().map_or(START_TIMEOUT, |t| t.max(START_TIMEOUT))
}

/// How long `stop` waits for a clean power-off before killing the VMM.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A new file (or an emptied one) readable and writable by the owner only, whatever the umask.
pub(crate) fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    private_file(path)?.write_all(data)
}

fn check_name(name: &str) -> anyhow::Result<()> {
    Ok(msb_vmm::named::check_name(name)?)
}

fn read_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a live msb-vmm process (not a recycled pid).
fn vmm_alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).any(|a| a == b"__serve"))
        .unwrap_or(false)
}

/// The state of one sandbox directory.
enum Status {
    Running(i32),
    /// Stopped by a limit (`--idle-timeout`, `--max-lifetime`): why.
    Stopped(String),
    /// Being started: no pid yet, or not ready yet (and the starter still runs).
    Starting,
    Dead,
}

fn status(dir: &Path) -> Status {
    if let Ok(why) = std::fs::read_to_string(dir.join("stopped")) {
        return Status::Stopped(why.trim().to_string());
    }
    match read_pid(dir) {
        Some(pid) if vmm_alive(pid) => {
            if dir.join("ready").exists() {
                Status::Running(pid)
            } else {
                Status::Starting
            }
        }
        Some(_) => Status::Dead,
        // A directory just created by `start`: give it a moment before calling it dead.
        None => match std::fs::metadata(dir).and_then(|m| m.modified()) {
            Ok(t) if t.elapsed().unwrap_or_default() < Duration::from_secs(10) => Status::Starting,
            _ => Status::Dead,
        },
    }
}

/// The directory of a running sandbox, cleaning up after a dead one.
fn running(name: &str) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    let dir = state_root().join(name);
    if !dir.exists() {
        bail!("no sandbox named {name} (see `msb-vmm ls`)");
    }
    match status(&dir) {
        Status::Running(_) => Ok(dir),
        Status::Starting => bail!("sandbox {name} is still starting"),
        Status::Stopped(why) => {
            bail!("sandbox {name} was stopped: {why} (`msb-vmm stop {name}` clears it)")
        }
        Status::Dead => {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("sandbox {name} is not running (its VMM exited); removed its leftovers")
        }
    }
}

/// `msb-vmm start`.
pub fn start(a: StartArgs) -> anyhow::Result<u8> {
    check_name(&a.name)?;
    if a.net.suggest_to.is_some() {
        bail!("--suggest-to is for `run`; a named sandbox's suggestion comes from `msb-vmm policy NAME --suggest`");
    }
    // Validate here, so mistakes are one line from `start` rather than a log entry.
    super::with_mounts(msb_vmm::sandbox::Sandbox::builder(), &a.mounts)?;
    super::with_network(msb_vmm::sandbox::Sandbox::builder(), &a.net, &a.limits)?;
    super::with_limits(msb_vmm::sandbox::Sandbox::builder(), &a.limits)?;
    let args = serve_args(&a)?;
    launch(&a.name, args, None)
}

/// `msb-vmm restore DIR --name NAME`: a named sandbox continuing the one saved in `dir`.
pub fn restore(dir: &Path, name: &str) -> anyhow::Result<u8> {
    check_name(name)?;
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("the snapshot directory {}", dir.display()))?;
    msb_vmm::sandbox::SandboxImage::read(&dir)?;
    let path = dir.join(START_ARGS);
    let args: Vec<String> = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| path.display().to_string())?;
    launch(name, args.into_iter().map(Into::into).collect(), Some(&dir))
}

/// The file of a named sandbox's state directory holding what `__serve` was started with
/// (besides its name), copied into its snapshots for `restore`.
const SERVE_ARGS: &str = "serve-args.json";
/// That file in a snapshot directory.
const START_ARGS: &str = "start-args.json";

/// `__serve`'s arguments for `start`'s, paths made absolute (the sandbox process may not
/// share our working directory).
fn serve_args(a: &StartArgs) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let mut cmd: Vec<std::ffi::OsString> = vec![
        "--cpus".into(),
        a.vm.cpus.to_string().into(),
        "--memory".into(),
        a.vm.memory.to_string().into(),
    ];
    let mut arg = |k: &str, v: &dyn AsRef<std::ffi::OsStr>| {
        cmd.push(k.into());
        cmd.push(v.as_ref().to_owned());
    };
    if let Some(j) = &a.vm.jail {
        arg("--jail", &std::env::current_dir()?.join(j));
    }
    if let Some(m) = &a.vm.jail_max_file {
        arg("--jail-max-file", m);
    }
    if let Some(k) = &a.kernel {
        arg("--kernel", k);
    }
    for v in &a.mounts.volumes {
        // Absolute host paths: the sandbox process may not share our working directory.
        let abs = match v.split_once(':') {
            Some((h, rest)) => format!("{}:{rest}", std::fs::canonicalize(h)?.display()),
            None => v.clone(),
        };
        arg("--volume", &abs);
    }
    for t in &a.mounts.tmpfs {
        arg("--tmpfs", t);
    }
    if let Some(i) = &a.mounts.image {
        // As the store names it (local sources with absolute paths): pulled by `start` already.
        arg(
            "--image",
            &msb_image::canonical_name(&msb_vmm::image::store()?, i)?,
        );
    }
    for r in &a.mounts.insecure_registries {
        arg("--insecure-registry", r);
    }
    match &a.mounts.rootfs {
        Some(r) if r.as_os_str() == msb_vmm::assets::INITRAMFS_ROOT => arg("--rootfs", r),
        Some(r) => arg("--rootfs", &std::fs::canonicalize(r)?),
        None => {}
    }
    if let Some(h) = &a.hostname {
        arg("--hostname", h);
    }
    if let Some(p) = &a.net.rules.net {
        arg("--net", p);
    }
    for r in &a.net.rules.allow {
        arg("--allow", r);
    }
    for r in &a.net.rules.deny {
        arg("--deny", r);
    }
    if let Some(f) = &a.net.rules.policy {
        arg("--policy", &std::fs::canonicalize(f)?);
    }
    arg("--mtu", &a.net.mtu.to_string());
    for p in &a.net.publish {
        arg("--publish", p);
    }
    if let Some(m) = &a.metrics_socket {
        arg("--metrics-socket", &std::env::current_dir()?.join(m));
    }
    if let Some(n) = a.limits.pids_limit {
        arg("--pids-limit", &n.to_string());
    }
    if let Some(m) = &a.limits.memory_limit {
        arg("--memory-limit", m);
    }
    arg("--max-flows", &a.limits.max_flows.to_string());
    if let Some(r) = &a.limits.net_rate {
        arg("--net-rate", r);
    }
    if let Some(b) = &a.limits.egress_budget {
        arg("--egress-budget", b);
    }
    if let Some(r) = &a.limits.fs_rate {
        arg("--fs-rate", r);
    }
    if let Some(t) = a.idle_timeout {
        arg("--idle-timeout", &t.as_secs_f64().to_string());
    }
    if let Some(t) = a.max_lifetime {
        arg("--max-lifetime", &t.as_secs_f64().to_string());
    }
    if let Some(f) = &a.net.net_log {
        arg("--net-log", &std::env::current_dir()?.join(f));
    }
    if a.vm.no_seccomp {
        cmd.push("--no-seccomp".into());
    }
    Ok(cmd)
}

/// What a restored copy of a sandbox is started with: its own arguments but for the
/// metrics socket (the original may still hold it) and the jail (a restore is not jailed
/// in the same directory).
fn args_for_copies(args: &[std::ffi::OsString]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--metrics-socket" || a == "--jail" {
            it.next();
            continue;
        }
        out.push(a.to_string_lossy().into_owned());
    }
    out
}

/// Creates the state directory of sandbox `name` and starts its `__serve` process with
/// `args` (continuing snapshot `restore` if given); returns once its agent is ready.
fn launch(name: &str, args: Vec<std::ffi::OsString>, restore: Option<&Path>) -> anyhow::Result<u8> {
    let root = state_root();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .with_context(|| format!("creating {}", root.display()))?;
    let dir = root.join(name);
    if dir.exists() {
        match status(&dir) {
            Status::Dead | Status::Stopped(_) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            _ => bail!(
                "a sandbox named {} already exists (`msb-vmm stop {}` first, or pick another name)",
                name,
                name
            ),
        }
    }
    // mkdir is the lock: two concurrent starts of one name cannot both get here. The owner
    // only, whatever the umask: the socket inside runs commands as root in the guest, and the
    // log holds the guest's console.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                anyhow!("a sandbox named {} already exists", name)
            }
            _ => anyhow!("creating {}: {e}", dir.display()),
        })?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| dir.display().to_string())?;
    // 9p and some network file systems cannot hold Unix sockets: say so, not ENXIO later.
    let probe = dir.join("probe.sock");
    if let Err(e) = std::os::unix::net::UnixListener::bind(&probe) {
        let _ = std::fs::remove_dir_all(&dir);
        bail!(
            "{} cannot hold Unix sockets ({e}): set MSB_STATE_DIR to a local directory (e.g. /dev/shm/msb-vmm)",
            root.display()
        );
    }
    let _ = std::fs::remove_file(&probe);
    let log = private_file(&dir.join("log")).context("creating the sandbox log")?;
    let copies = serde_json::to_vec(&args_for_copies(&args))?;
    write_private(&dir.join(SERVE_ARGS), &copies).context("recording the sandbox's arguments")?;
    let exe = std::env::current_exe().context("finding the msb-vmm executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__serve").arg("--name").arg(name).args(&args);
    if let Some(snapshot) = restore {
        cmd.arg("--restore").arg(snapshot);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Detach the sandbox from our terminal and session so a Ctrl-C there does not reach it.
    let detach = || {
        // SAFETY: setsid takes no arguments and touches no memory of ours.
        unsafe { libc::setsid() };
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and only calls setsid, which is
    // async-signal-safe and allocates nothing.
    unsafe { cmd.pre_exec(detach) };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("starting the sandbox process: {e}");
        }
    };
    let start_timeout = start_timeout();
    let deadline = Instant::now() + start_timeout;
    loop {
        if dir.join("ready").exists() {
            return Ok(0);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            for l in log.lines() {
                eprintln!("{l}");
            }
            if log.trim().is_empty() {
                eprintln!(
                    "msb-vmm: the sandbox process exited ({status}) before its agent was ready"
                );
            }
            return Ok(EXIT_FAILURE);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            bail!(
                "sandbox {} did not become ready within {} s",
                name,
                start_timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `msb-vmm __serve`: runs a sandbox until it powers off, then removes its directory.
pub fn serve(a: StartArgs) -> anyhow::Result<u8> {
    let dir = state_root().join(&a.name);
    write_private(
        &dir.join("pid"),
        format!("{}\n", std::process::id()).as_bytes(),
    )
    .context("writing the pid file")?;
    let _signals = Signals::block();
    let hostname = a.hostname.clone().unwrap_or_else(|| {
        if msb_init::cmdline::valid_hostname(&a.name) {
            a.name.clone()
        } else {
            "msb".into()
        }
    });
    let mut b = Sandbox::builder()
        .seccomp(a.vm.seccomp())
        .confine_caller(true)
        .cpus(a.vm.cpus)
        .memory_mib(a.vm.memory)
        .hostname(hostname)
        .vsock_uds(dir.join("vsock.sock"))
        .boot_timeout(start_timeout());
    if let Some(k) = &a.kernel {
        b = b.kernel(k);
    }
    if let Some(snapshot) = &a.restore {
        b = b.restore_from(snapshot);
    }
    b = super::with_mounts(b, &a.mounts)?;
    b = super::with_network(b, &a.net, &a.limits)?;
    b = super::with_limits(b, &a.limits)?;
    // Bound before the jail (its listeners outlive the pivot into it).
    let control = super::control::bind(&dir.join("control.sock"))?;
    let metrics = match &a.metrics_socket {
        Some(p) => Some(
            super::control::bind(p).with_context(|| format!("--metrics-socket {}", p.display()))?,
        ),
        None => None,
    };
    if let Some(code) = super::jail(&a.vm, |spec| Ok(b.jail_binds(spec)?))? {
        if let Some(p) = &a.metrics_socket {
            let _ = std::fs::remove_file(p);
        }
        // The jailed sandbox process is gone; what it could not remove (its mount point).
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(code);
    }
    let sb = match b.start() {
        Ok(sb) => sb,
        Err(e) => {
            eprintln!("msb-vmm: error: {e}");
            for l in e.console_tail() {
                eprintln!("  | {l}");
            }
            return Ok(EXIT_FAILURE);
        }
    };
    let started = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let info = serde_json::json!({
        "name": a.name,
        "cpus": a.vm.cpus,
        "memory_mib": a.vm.memory,
        "started": started,
        "boot_time_us": sb.boot_time().map(|d| d.as_micros() as u64),
        "agent_ready_us": sb.ready_time().as_micros() as u64,
        "image": sb.image().map(|r| r.name.clone()),
    });
    write_private(&dir.join("info.json"), format!("{info}\n").as_bytes())?;
    if let Some(rec) = sb.image() {
        // `exec` applies the image's Env, WorkingDir and User as `docker exec` does.
        write_private(&dir.join(IMAGE_FILE), &serde_json::to_vec(rec)?)?;
    }
    write_private(&dir.join("ready"), b"")?;
    // Until the guest powers off (a `stop` asks its agent to) or we are told to stop.
    let stop = sb.stop_handle();
    std::thread::spawn(move || {
        // SIGTERM/SIGINT/SIGHUP to the sandbox process: stop the VM.
        let set = Signals::block();
        let _ = set.wait();
        stop.stop();
    });
    let done = std::sync::atomic::AtomicBool::new(false);
    let limit = std::thread::scope(|scope| {
        scope.spawn(|| super::control::serve(&control, &sb, &dir, &done));
        if let Some(m) = &metrics {
            scope.spawn(|| super::control::serve_metrics(m, &sb, &a.name, &done));
        }
        let limit = watch_limits(&sb, a.idle_timeout, a.max_lifetime);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        limit
    });
    if let Some(p) = &a.metrics_socket {
        let _ = std::fs::remove_file(p);
    }
    let Some(reason) = limit else {
        drop(sb);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(0);
    };
    // Stopped by a limit: a clean power-off, and a record `ls` shows until `stop` or a new
    // `start` of the name removes it.
    eprintln!("msb-vmm: stopping sandbox {}: {reason}", a.name);
    let _ = sb.shutdown();
    for f in ["ready", "pid", "vsock.sock", "control.sock"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    write_private(&dir.join("stopped"), format!("{reason}\n").as_bytes())?;
    Ok(0)
}

/// Waits until the VM stops, or until `idle` passes with no exec running or started and no
/// network traffic, or `lifetime` since it started; which limit ended it, if one did.
fn watch_limits(
    sb: &Sandbox,
    idle: Option<Duration>,
    lifetime: Option<Duration>,
) -> Option<String> {
    if idle.is_none() && lifetime.is_none() {
        sb.wait_stopped(None);
        return None;
    }
    let started = Instant::now();
    let mut active = Instant::now();
    let mut seen = None;
    loop {
        if sb.wait_stopped(Some(Duration::from_secs(1))) {
            return None;
        }
        if let Some(max) = lifetime {
            if started.elapsed() >= max {
                return Some(format!("max lifetime ({} s) reached", max.as_secs_f64()));
            }
        }
        if let Some(idle) = idle {
            let st = sb.stats();
            let net = st.net.as_ref().map_or(0, |n| n.bytes_in + n.bytes_out);
            let execs = st
                .guest
                .as_ref()
                .map(|g| (g.execs_started, g.execs_running));
            // A running exec or a change is activity. So is an agent that did not answer in
            // time: a guest too busy to answer (a build, a fork bomb held at its limit) is
            // not idle, and --max-lifetime still bounds one that never answers again. A
            // paused guest cannot answer and is idle: its clock keeps running.
            match execs {
                Some((_, running)) => {
                    let now = (execs, net);
                    if running > 0 || seen != Some(now) {
                        active = Instant::now();
                    }
                    seen = Some(now);
                }
                None if sb.is_paused() => {}
                None => active = Instant::now(),
            }
            if active.elapsed() >= idle {
                return Some(format!(
                    "idle for {} s (no exec and no network traffic)",
                    idle.as_secs_f64()
                ));
            }
        }
    }
}

/// `msb-vmm stats`.
pub fn stats(name: &str, json: bool, watch: Option<Duration>) -> anyhow::Result<u8> {
    let dir = running(name)?;
    loop {
        let v = super::control::request(&dir, &super::control::Request::Stats)?;
        if json {
            println!("{}", v["stats"]);
        } else {
            let st: msb_vmm::stats::SandboxStats = serde_json::from_value(v["stats"].clone())
                .context("the sandbox's stats are not in this msb-vmm's format")?;
            if watch.is_some() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                // Clear the screen and home the cursor: a top-like view.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", st.table(name));
        }
        std::io::stdout().flush()?;
        let Some(every) = watch else {
            return Ok(0);
        };
        std::thread::sleep(every);
        if !dir.join("ready").exists() {
            bail!("sandbox {name} stopped");
        }
    }
}

/// `msb-vmm policy`: shows the policy in force, or replaces it with the one the flags give.
pub fn policy(a: crate::PolicyArgs) -> anyhow::Result<u8> {
    let dir = running(&a.name)?;
    if a.suggest {
        let v = super::control::request(&dir, &super::control::Request::Suggest)?;
        print!("{}", v["policy"].as_str().unwrap_or_default());
        return Ok(0);
    }
    let flags = a.rules.flags()?;
    if flags.net.is_none()
        && flags.allow.is_empty()
        && flags.deny.is_empty()
        && flags.file.is_none()
    {
        let v = super::control::request(&dir, &super::control::Request::Policy)?;
        print!("{}", v["policy"].as_str().unwrap_or_default());
        return Ok(0);
    }
    // Checked here first: a typo is one line from this command, and nothing changes.
    super::policy_from(&flags)?;
    let v = super::control::request(&dir, &super::control::Request::SetPolicy { flags })?;
    eprintln!(
        "msb-vmm: policy of {} replaced; {} open flows it denies were cut, {} kept",
        a.name, v["flows_cut"], v["flows_kept"]
    );
    Ok(0)
}

/// Connects to a sandbox's agent through its hybrid vsock socket.
fn connect(dir: &Path) -> anyhow::Result<AgentClient> {
    Ok(msb_vmm::named::connect(dir)?)
}

/// The directory of a running sandbox that is not paused (its agent can answer).
fn unpaused(name: &str) -> anyhow::Result<PathBuf> {
    let dir = running(name)?;
    if super::control::paused_marker(&dir).exists() {
        bail!("sandbox {name} is paused: `msb-vmm resume {name}` first");
    }
    Ok(dir)
}

/// `msb-vmm pause` and `msb-vmm resume`.
/// `msb-vmm fork SOURCE (--name NEW | --count K --name-prefix P)`. A running sandbox is first
/// saved in its own state directory; that snapshot is removed once the new sandboxes run (their
/// memory mappings outlive the file).
pub fn fork(source: &str, names: &[String]) -> anyhow::Result<u8> {
    for n in names {
        check_name(n)?;
        if state_root().join(n).exists() {
            bail!("a sandbox named {n} already exists (`msb-vmm stop {n}` first, or pick another name)");
        }
    }
    let as_dir = Path::new(source);
    if source.contains('/') || as_dir.join(msb_vmm::sandbox::SANDBOX_FILE).exists() {
        return restore_each(as_dir, names);
    }
    let state = running(source)?;
    let snap = state.join(format!("fork-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&snap);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&snap)
        .with_context(|| format!("creating {}", snap.display()))?;
    let result = save_into(&state, &snap).and_then(|()| restore_each(&snap, names));
    let _ = std::fs::remove_dir_all(&snap);
    result
}

/// [`restore`] of `dir` as each of `names`, stopping at the first that fails.
fn restore_each(dir: &Path, names: &[String]) -> anyhow::Result<u8> {
    for n in names {
        let code = restore(dir, n)?;
        if code != 0 {
            return Ok(code);
        }
    }
    Ok(0)
}

/// Saves the sandbox whose state directory is `state` into `dir` (absolute), with the
/// arguments a restore starts it with.
fn save_into(state: &Path, dir: &Path) -> anyhow::Result<()> {
    super::control::request(
        state,
        &super::control::Request::Snapshot {
            dir: dir.to_path_buf(),
        },
    )?;
    std::fs::copy(state.join(SERVE_ARGS), dir.join(START_ARGS))
        .with_context(|| format!("writing {}", dir.join(START_ARGS).display()))?;
    Ok(())
}

/// `msb-vmm snapshot NAME DIR [--stop]`.
pub fn snapshot(name: &str, dir: &Path, stop_after: bool) -> anyhow::Result<u8> {
    let state = running(name)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let started = Instant::now();
    save_into(&state, &dir)?;
    eprintln!(
        "msb-vmm: saved {name} into {} in {:.0} ms (`msb-vmm restore {} --name NEW` continues it)",
        dir.display(),
        started.elapsed().as_secs_f64() * 1000.0,
        dir.display()
    );
    if stop_after {
        return stop(name);
    }
    Ok(0)
}

pub fn pause(name: &str, pause: bool) -> anyhow::Result<u8> {
    let dir = running(name)?;
    let req = if pause {
        super::control::Request::Pause
    } else {
        super::control::Request::Resume
    };
    super::control::request(&dir, &req)?;
    Ok(0)
}

/// The image record of a sandbox started with `--image`, in its state directory.
const IMAGE_FILE: &str = "image.json";

/// The image sandbox `dir` boots from: none for a sandbox without one.
fn image_of(dir: &Path) -> anyhow::Result<Option<msb_vmm::image::ImageRecord>> {
    match std::fs::read(dir.join(IMAGE_FILE)) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).context("the sandbox's image record")?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context("the sandbox's image record")),
    }
}

/// `msb-vmm exec`.
pub fn exec(a: ExecArgs) -> anyhow::Result<u8> {
    let dir = unpaused(&a.name)?;
    let mut req = exec_request(&a.exec, &a.command)?;
    if let Some(rec) = image_of(&dir)? {
        msb_vmm::image::apply(&rec.name, &rec.config, &mut req, false)?;
    }
    let signals = Signals::block();
    let agent = connect(&dir)?;
    Ok(exec_result_code(
        interact(&agent, req, &a.exec, signals),
        a.exec.timeout,
        ": start the sandbox with more --memory, or a higher --memory-limit",
    ))
}

/// `NAME:/PATH` → (NAME, PATH); anything else is a local path.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (name, path) = spec.split_once(':')?;
    (valid_name(name) && path.starts_with('/')).then_some((name, path))
}

/// `msb-vmm cp`.
pub fn cp(src: &str, dst: &str) -> anyhow::Result<u8> {
    match (remote(src), remote(dst)) {
        (Some(_), Some(_)) => {
            bail!("copy between two sandboxes is not supported: copy to the host first")
        }
        (None, None) => bail!("one side of cp must be NAME:/PATH in a sandbox"),
        (None, Some((name, path))) => {
            let agent = connect(&unpaused(name)?)?;
            let local = Path::new(src);
            let md = std::fs::metadata(local).with_context(|| src.to_string())?;
            if md.is_dir() {
                bail!("{src} is a directory; cp copies files");
            }
            let mut target = path.to_string();
            let is_dir = path.ends_with('/')
                || matches!(
                    agent.stat(path.as_bytes()),
                    Ok(FileStat {
                        kind: msb_init::agent::FileKind::Dir,
                        ..
                    })
                );
            if is_dir {
                let file = local
                    .file_name()
                    .ok_or_else(|| anyhow!("{src} has no file name"))?;
                target = format!("{}/{}", path.trim_end_matches('/'), file.to_string_lossy());
            }
            let mode = std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777;
            let mut f = std::fs::File::open(local).with_context(|| src.to_string())?;
            agent
                .write_file(target.as_bytes(), mode, false, &mut f)
                .map_err(|e| anyhow!("{name}:{target}: {e}"))?;
            Ok(0)
        }
        (Some((name, path)), None) => {
            let agent = connect(&unpaused(name)?)?;
            let mut target = PathBuf::from(dst);
            if target.is_dir() {
                let file = Path::new(path)
                    .file_name()
                    .ok_or_else(|| anyhow!("{path} has no file name"))?;
                target = target.join(file);
            }
            let tmp = target.with_extension(format!("msb-cp-{}", std::process::id()));
            let mut f =
                std::fs::File::create(&tmp).with_context(|| target.display().to_string())?;
            let r = agent.read_file(path.as_bytes(), &mut f);
            drop(f);
            match r {
                Ok(_) => {
                    std::fs::rename(&tmp, &target).with_context(|| target.display().to_string())?
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    bail!("{name}:{path}: {e}");
                }
            }
            Ok(0)
        }
    }
}

/// `msb-vmm ls`.
/// Running named sandboxes booted from image `name` (as the store names it).
pub fn sandboxes_using_image(name: &str) -> Vec<String> {
    let mut users = Vec::new();
    for e in std::fs::read_dir(state_root())
        .into_iter()
        .flatten()
        .flatten()
    {
        let sandbox = e.file_name().to_string_lossy().into_owned();
        if !valid_name(&sandbox) || !matches!(status(&e.path()), Status::Running(_)) {
            continue;
        }
        let uses = image_of(&e.path())
            .ok()
            .flatten()
            .is_some_and(|r| r.name == name);
        if uses {
            users.push(sandbox);
        }
    }
    users
}

pub fn ls() -> anyhow::Result<u8> {
    let root = state_root();
    let mut rows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !valid_name(&name) {
                continue;
            }
            let dir = e.path();
            match status(&dir) {
                Status::Dead => {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Status::Stopped(why) => rows.push((
                    name,
                    format!("stopped: {why}"),
                    String::new(),
                    String::new(),
                    String::new(),
                )),
                Status::Starting => rows.push((
                    name,
                    "starting".to_string(),
                    String::new(),
                    String::new(),
                    String::new(),
                )),
                Status::Running(pid) => {
                    let info: serde_json::Value = std::fs::read(dir.join("info.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    let age = info["started"].as_u64().map(|s| {
                        let now = SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(s);
                        format!("{}s", now.saturating_sub(s))
                    });
                    let state = if super::control::paused_marker(&dir).exists() {
                        "paused"
                    } else {
                        "running"
                    };
                    rows.push((
                        name,
                        format!("{state} (pid {pid})"),
                        info["cpus"].to_string(),
                        format!("{} MiB", info["memory_mib"]),
                        age.unwrap_or_default(),
                    ));
                }
            }
        }
    }
    rows.sort();
    println!(
        "{:<24} {:<22} {:>5} {:>10} {:>8}",
        "NAME", "STATE", "CPUS", "MEMORY", "AGE"
    );
    for (n, s, c, m, a) in rows {
        println!("{n:<24} {s:<22} {c:>5} {m:>10} {a:>8}");
    }
    Ok(0)
}

/// `msb-vmm stop`.
pub fn stop(name: &str) -> anyhow::Result<u8> {
    check_name(name)?;
    let dir = state_root().join(name);
    if !dir.exists() {
        bail!("no sandbox named {name} (see `msb-vmm ls`)");
    }
    let pid = match status(&dir) {
        Status::Stopped(why) => {
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("msb-vmm: sandbox {name} had stopped ({why}); removed its record");
            return Ok(0);
        }
        Status::Dead => {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("sandbox {name} was not running (its VMM had exited); removed its leftovers");
        }
        Status::Starting => read_pid(&dir),
        Status::Running(pid) => Some(pid),
    };
    // Ask the guest to power off cleanly; the serving process then exits and cleans up.
    if let Ok(agent) = connect(&dir) {
        let _ = agent.shutdown();
    } else if let Some(pid) = pid {
        // SAFETY: plain kill(2) on the sandbox's own process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_GRACE;
    while pid.is_some_and(vmm_alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(pid) = pid.filter(|p| vmm_alive(*p)) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_specs() {
        assert_eq!(remote("box:/tmp/x"), Some(("box", "/tmp/x")));
        assert_eq!(remote("box:tmp/x"), None);
        assert_eq!(remote("./a:/b"), None);
        assert_eq!(remote("/abs/path"), None);
    }
}
