//! The CLI's commands (Linux x86_64 hosts).

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use msb_vmm::sandbox::{
    AgentClient, ClientError, ExecEvent, ExecRequest, ExitStatus, Sandbox, SandboxError, TermSize,
};
use msb_vmm::vm::{Console, GuestExit, Initrd, VmBuilder};

use super::{BootArgs, ExecOpts, RunArgs, EXIT_FAILURE, EXIT_TIMEOUT};

pub mod ca;
pub mod control;
pub mod daemon;
pub mod images;

/// Exit code when the command could not be executed.
const EXIT_CANNOT_EXEC: u8 = 126;
/// Exit code when the command was not found.
const EXIT_NOT_FOUND: u8 = 127;

fn print_tail(tail: &[String]) {
    if tail.is_empty() {
        return;
    }
    eprintln!("msb-vmm: last guest console lines:");
    for l in tail {
        eprintln!("  | {l}");
    }
}

fn write_report(path: &Option<PathBuf>, fields: serde_json::Value) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let mut report = fields;
    report["vmm_start_to_report_us"] =
        serde_json::json!(msb_vmm::process_start().elapsed().as_micros() as u64);
    std::fs::write(path, format!("{report}\n"))
        .with_context(|| format!("writing --report {}", path.display()))
}

/// `msb-vmm boot`.
pub fn boot(a: BootArgs) -> anyhow::Result<u8> {
    let mut b = VmBuilder::new(&a.kernel)
        .defer_teardown_to_exit(true)
        .seccomp(a.vm.seccomp())
        .cpus(a.vm.cpus)
        .memory_mib(a.vm.memory)
        .timeout(a.timeout)
        .vsock(!a.no_vsock)
        .console(if a.vm.console {
            Console::Stdout
        } else {
            Console::Off
        })
        .console_input(a.vm.console);
    if let Some(i) = a.initrd.clone() {
        b = b.initrd(Initrd::Path(i));
    }
    if let Some(c) = a.cmdline {
        b = b.cmdline(c);
    }
    let jailed = jail(&a.vm, |spec| {
        spec.bind(&a.kernel, false);
        if let Some(i) = &a.initrd {
            spec.bind(i, false);
        }
        Ok(())
    })?;
    if let Some(code) = jailed {
        return Ok(code);
    }
    let out = b.run()?;
    let code = match &out.exit {
        GuestExit::PowerOff if !out.kernel_panicked => 0,
        GuestExit::Timeout(_) => EXIT_TIMEOUT,
        _ => EXIT_FAILURE,
    };
    write_report(
        &a.vm.report,
        serde_json::json!({ "exit": out.exit.to_string(), "exit_code": code, "boot_time_us": out.boot_time.map(|d| d.as_micros() as u64) }),
    )?;
    if code != 0 {
        let what = if out.kernel_panicked && out.exit.is_power_off() {
            "the guest kernel panicked".to_string()
        } else {
            out.exit.to_string()
        };
        eprintln!("msb-vmm: {what}");
        if !a.vm.console {
            print_tail(&out.console_tail);
        }
    }
    Ok(code)
}

/// `msb-vmm run`: a fresh sandbox, one command through the agent, power-off.
pub fn run(mut a: RunArgs) -> anyhow::Result<u8> {
    // `run IMAGE -- CMD`: the one word before `--` names the root (an image, or a directory
    // written as a path).
    if a.command.len() >= 2 && a.command[1] == "--" {
        let word = a.command[0].to_string_lossy().into_owned();
        if a.mounts.image.is_some() || a.mounts.rootfs.is_some() {
            bail!("{word} -- ...: the root is already given by --image or --rootfs");
        }
        if msb_vmm::image::looks_like_path(&word) {
            a.mounts.rootfs = Some(word.into());
        } else {
            a.mounts.image = Some(word);
        }
        a.command.drain(..2);
    }
    let req = exec_request(&a.exec, &a.command)?;
    let mut b = Sandbox::builder()
        .defer_teardown_to_exit(true)
        .seccomp(a.vm.seccomp())
        .confine_caller(true)
        .cpus(a.vm.cpus)
        .memory_mib(a.vm.memory)
        .console(a.vm.console)
        .hostname(a.hostname.clone())
        .warm(!a.cold);
    if let Some(k) = &a.kernel {
        b = b.kernel(k);
    }
    b = with_mounts(b, &a.mounts)?;
    b = with_network(b, &a.net, &a.limits)?;
    b = with_limits(b, &a.limits)?;
    if let Some(f) = &a.net.suggest_to {
        if a.net.rules.net.as_deref() != Some("learn") {
            bail!(
                "--suggest-to {}: learn mode records what to suggest: add --net learn",
                f.display()
            );
        }
    }
    if let Some(code) = jail(&a.vm, |spec| Ok(b.jail_binds(spec)?))? {
        return Ok(code);
    }
    // Blocked before any thread starts, so every thread inherits the mask and only the
    // forwarding thread receives them.
    let signals = Signals::block();
    let sb = match b.start() {
        Ok(sb) => sb,
        Err(e) => return Ok(sandbox_error(&e, &a.vm.report)),
    };
    let ready = sb.ready_time();
    let boot = sb.boot_time();
    let warm = sb.warm_start();
    let req = match sb.image_request(req, true) {
        Ok(r) => r,
        Err(e) => {
            let _ = sb.shutdown();
            return Ok(sandbox_error(&e, &a.vm.report));
        }
    };
    let result = interact(sb.agent(), req, &a.exec, signals);
    let suggested = sb.suggested_policy();
    let _ = sb.shutdown();
    if let (Some(f), Some(text)) = (&a.net.suggest_to, suggested) {
        std::fs::write(f, text).with_context(|| format!("--suggest-to {}", f.display()))?;
        eprintln!(
            "msb-vmm: learn mode's suggested policy is in {} (use it with --policy)",
            f.display()
        );
    }
    let oom_fix = match &a.limits.memory_limit {
        Some(l) => format!(" (--memory-limit {l}): raise the limit"),
        None => format!(
            " (it has {} MiB): give it more with --memory MIB",
            a.vm.memory
        ),
    };
    let code = exec_result_code(result, a.exec.timeout, &oom_fix);
    write_report(
        &a.vm.report,
        serde_json::json!({ "exit_code": code, "boot_time_us": boot.map(|d| d.as_micros() as u64), "agent_ready_us": ready.as_micros() as u64, "warm": warm }),
    )?;
    Ok(code)
}

fn sandbox_error(e: &SandboxError, report: &Option<PathBuf>) -> u8 {
    eprintln!("msb-vmm: error: {e}");
    print_tail(e.console_tail());
    let _ = write_report(
        report,
        serde_json::json!({ "exit": e.to_string(), "exit_code": EXIT_FAILURE }),
    );
    EXIT_FAILURE
}

/// How a command through the agent ended.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    pub status: ExitStatus,
    /// The agent killed it for `--timeout`.
    pub timed_out: bool,
    /// The guest's OOM killer ended it.
    pub oom_killed: bool,
}

/// Maps how an exec ended to our exit code, printing one line for failures. `oom_fix`: what
/// the line an OOM kill gets tells the user to do.
fn exec_result_code(
    result: Result<Ended, ClientError>,
    timeout: Option<Duration>,
    oom_fix: &str,
) -> u8 {
    match result {
        Ok(Ended {
            timed_out: true, ..
        }) => {
            eprintln!(
                "msb-vmm: timed out after {} s",
                timeout.unwrap_or_default().as_secs_f64()
            );
            EXIT_TIMEOUT
        }
        Ok(e) => {
            if e.oom_killed {
                eprintln!(
                    "msb-vmm: the sandbox ran out of memory and its OOM killer ended the command{oom_fix}"
                );
            }
            e.status.shell_code() as u8
        }
        Err(ClientError::Agent(e)) => {
            eprintln!("msb-vmm: {e}");
            match e.kind {
                msb_init::agent::ErrorKind::NotFound => EXIT_NOT_FOUND,
                msb_init::agent::ErrorKind::PermissionDenied
                | msb_init::agent::ErrorKind::Spawn => EXIT_CANNOT_EXEC,
                _ => EXIT_FAILURE,
            }
        }
        Err(e) => {
            eprintln!("msb-vmm: error: {e}");
            EXIT_FAILURE
        }
    }
}

/// Builds the agent request from the command-line options.
fn exec_request(o: &ExecOpts, argv: &[std::ffi::OsString]) -> anyhow::Result<ExecRequest> {
    let mut req = msb_vmm::sandbox::request(argv);
    for e in &o.env {
        let bytes = e.as_bytes();
        match bytes.iter().position(|&c| c == b'=') {
            Some(i) => req.env.push((bytes[..i].to_vec(), bytes[i + 1..].to_vec())),
            None => match std::env::var_os(e) {
                Some(v) => req.env.push((bytes.to_vec(), v.as_bytes().to_vec())),
                None => bail!(
                    "--env {}: not set in this environment (use --env KEY=VALUE)",
                    e.to_string_lossy()
                ),
            },
        }
    }
    req.workdir = o.workdir.as_ref().map(|w| w.as_bytes().to_vec());
    req.user = match &o.user {
        None => None,
        Some(u) => {
            Some(msb_vmm::sandbox::parse_user(u).map_err(|e| anyhow::anyhow!("--user {e}"))?)
        }
    };
    req.timeout_ms = o.timeout.map(|t| t.as_millis().max(1) as u64);
    if o.tty {
        req.pty = Some(terminal_size().unwrap_or(TermSize { rows: 24, cols: 80 }));
    }
    req.stdin = o.tty || o.interactive || !io::stdin().is_terminal();
    Ok(req)
}

fn terminal_size() -> Option<TermSize> {
    // SAFETY: winsize is plain old data filled by TIOCGWINSZ.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    for fd in [io::stdin().as_raw_fd(), io::stdout().as_raw_fd()] {
        // SAFETY: TIOCGWINSZ writes a winsize to a valid pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some(TermSize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            });
        }
    }
    None
}

/// The signals we forward to the command, blocked in every thread and taken by one.
pub struct Signals(libc::sigset_t);

impl Signals {
    /// Blocks SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGWINCH in this thread (and the threads it
    /// starts later).
    pub fn block() -> Signals {
        // SAFETY: sigset_t is plain old data initialised by sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for s in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGWINCH,
        ] {
            // SAFETY: as above, with a valid signal number.
            unsafe { libc::sigaddset(&mut set, s) };
        }
        // SAFETY: changes this thread's mask only.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        Signals(set)
    }

    /// Waits for one of the signals.
    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: the set is valid and the signals in it are blocked.
        unsafe { libc::sigwait(&self.0, &mut sig) };
        sig
    }
}

/// Puts the local terminal in raw mode for a PTY session; restores it on drop.
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enter() -> RawMode {
        let fd = io::stdin().as_raw_fd();
        if !io::stdin().is_terminal() {
            return RawMode(None);
        }
        // SAFETY: termios is plain old data filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and t is valid for writes.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return RawMode(None);
        }
        let saved = t;
        // SAFETY: t is a valid termios.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: fd is a terminal; t is valid.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restoring attributes read from the same terminal.
            unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, t) };
        }
    }
}

/// Runs `req` through `agent` with our stdio: output streamed as it comes, stdin forwarded,
/// signals forwarded (Ctrl-C as SIGINT; a third one as SIGKILL), window-size changes forwarded
/// with a terminal. Returns how the command ended.
pub fn interact(
    agent: &AgentClient,
    req: ExecRequest,
    opts: &ExecOpts,
    signals: Signals,
) -> Result<Ended, ClientError> {
    let forward_stdin = req.stdin;
    let tty = req.pty.is_some();
    let mut h = agent.exec(req)?;
    let _raw = tty.then(RawMode::enter);
    let ctl = h.controller();
    if forward_stdin {
        let ctl = ctl.clone();
        let _ = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut stdin = io::stdin().lock();
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) => {
                            let _ = ctl.close_stdin();
                            return;
                        }
                        Ok(n) => {
                            if ctl.write_stdin(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            let _ = ctl.close_stdin();
                            return;
                        }
                    }
                }
            });
    }
    {
        let ctl = ctl.clone();
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut interrupts = 0;
                loop {
                    let sig = signals.wait();
                    let r = match sig {
                        libc::SIGWINCH => match terminal_size() {
                            Some(size) if tty => ctl.resize(size),
                            _ => Ok(()),
                        },
                        libc::SIGINT => {
                            interrupts += 1;
                            ctl.signal(if interrupts >= 3 {
                                libc::SIGKILL
                            } else {
                                libc::SIGINT
                            })
                        }
                        s => ctl.signal(s),
                    };
                    if r.is_err() {
                        return;
                    }
                }
            });
    }
    let _ = opts;
    let (mut out, mut err) = (io::stdout().lock(), io::stderr());
    while let Some(e) = h.next_event()? {
        match e {
            ExecEvent::Stdout(d) => {
                let _ = out.write_all(&d).and_then(|_| out.flush());
            }
            ExecEvent::Stderr(d) => {
                let _ = err.write_all(&d).and_then(|_| err.flush());
            }
            ExecEvent::Exited {
                status,
                timed_out,
                oom_killed,
            } => {
                return Ok(Ended {
                    status,
                    timed_out,
                    oom_killed,
                })
            }
            ExecEvent::Started { .. } => {}
        }
    }
    Err(ClientError::Closed)
}

/// Adds `--volume` and `--tmpfs` to a sandbox; a missing host directory is one clear line.
pub fn with_mounts(
    mut b: msb_vmm::sandbox::SandboxBuilder,
    m: &crate::MountArgs,
) -> anyhow::Result<msb_vmm::sandbox::SandboxBuilder> {
    use msb_vmm::assets::INITRAMFS_ROOT;
    if let Some(name) = &m.image {
        // Silent for a cached image: the store is looked up once, and only a pull speaks.
        b = b.image(name, &images::pull_options(&m.insecure_registries, false))?;
        return with_volumes(b, m);
    }
    match &m.rootfs {
        Some(word) if word.as_os_str() == INITRAMFS_ROOT => {}
        Some(dir) => {
            let abs = std::fs::canonicalize(dir)
                .map_err(|e| anyhow::anyhow!("--rootfs {}: {e}", dir.display()))?;
            if !abs.is_dir() {
                anyhow::bail!("--rootfs {}: not a directory", dir.display());
            }
            b = b.rootfs(abs);
        }
        None => b = b.default_rootfs()?,
    }
    with_volumes(b, m)
}

/// Adds `--volume` and `--tmpfs`.
fn with_volumes(
    mut b: msb_vmm::sandbox::SandboxBuilder,
    m: &crate::MountArgs,
) -> anyhow::Result<msb_vmm::sandbox::SandboxBuilder> {
    for spec in &m.volumes {
        let mut v = msb_vmm::sandbox::Volume::parse(spec)?;
        v.host = std::fs::canonicalize(&v.host)
            .map_err(|e| anyhow::anyhow!("--volume {spec}: {}: {e}", v.host.display()))?;
        if !v.host.is_dir() {
            anyhow::bail!("--volume {spec}: {} is not a directory", v.host.display());
        }
        b = b.volume(v);
    }
    for spec in &m.tmpfs {
        let (path, size) = match spec.split_once(':') {
            Some((p, s)) => (
                p,
                parse_size(s).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--tmpfs {spec}: size {s:?} is not a number of bytes (k, m, g allowed)"
                    )
                })?,
            ),
            None => (spec.as_str(), 0),
        };
        if !path.starts_with('/') {
            anyhow::bail!("--tmpfs {spec}: the guest path must be absolute");
        }
        b = b.tmpfs(path, size);
    }
    Ok(b)
}

/// Adds the network the flags describe; a bad rule, preset or policy file is one clear line.
pub fn with_network(
    b: msb_vmm::sandbox::SandboxBuilder,
    n: &crate::NetArgs,
    limits: &crate::LimitArgs,
) -> anyhow::Result<msb_vmm::sandbox::SandboxBuilder> {
    let (rate_in, rate_out) = match &limits.net_rate {
        Some(r) => msb_netstack::limit::parse_rates(r).map_err(|e| anyhow::anyhow!(e))?,
        None => (None, None),
    };
    let egress_budget = match &limits.egress_budget {
        Some(v) => Some(parse_size(v).filter(|&b| b > 0).ok_or_else(|| {
            anyhow::anyhow!("--egress-budget {v}: use a size in bytes, or with k/m/g")
        })?),
        None => None,
    };
    let policy = policy_from(&n.rules.flags()?)?;
    if !(68..=65520).contains(&n.mtu) {
        anyhow::bail!("--mtu {}: use 68 to 65520", n.mtu);
    }
    let publish = n
        .publish
        .iter()
        .map(|p| msb_vmm::sandbox::Publish::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    // `--net none` with nothing allowed and nothing published: no network card at all.
    let airgapped = msb_vmm::netconf::airgapped(&policy) && publish.is_empty();
    if airgapped {
        return Ok(b);
    }
    let mut net = msb_vmm::sandbox::Network::new(policy);
    net.max_flows = limits.max_flows;
    net.rate_in = rate_in;
    net.rate_out = rate_out;
    net.egress_budget = egress_budget;
    net.mtu = n.mtu;
    net.publish = publish;
    net.intercept = tls_options(n, &net.policy)?
        .map(|o| o.build())
        .transpose()
        .map_err(|e| anyhow::anyhow!("TLS interception: {e}"))?;
    if let Some(path) = &n.net_log {
        net.log = Some(msb_vmm::netconf::audit_log(path)?);
    }
    Ok(b.network(net))
}

/// The limits of `--pids-limit`, `--memory-limit` and `--fs-rate`, checked.
pub fn with_limits(
    mut b: msb_vmm::sandbox::SandboxBuilder,
    l: &crate::LimitArgs,
) -> anyhow::Result<msb_vmm::sandbox::SandboxBuilder> {
    if let Some(n) = l.pids_limit {
        if n < 8 {
            bail!("--pids-limit {n}: use at least 8 (the shell running a command needs a few)");
        }
        b = b.pids_limit(n);
    }
    if let Some(m) = &l.memory_limit {
        let bytes = parse_size(m).filter(|&b| b >= 4 << 20).ok_or_else(|| {
            anyhow::anyhow!("--memory-limit {m}: use a size of at least 4m (bytes, or with k/m/g)")
        })?;
        b = b.memory_limit(bytes);
    }
    if l.max_flows == 0 {
        bail!("--max-flows 0: use at least 1 (--net none for no network)");
    }
    if let Some(r) = &l.fs_rate {
        let (ops, bytes) = msb_devices::fs::rate::parse(r).map_err(|e| anyhow::anyhow!(e))?;
        b = b.fs_rate(ops, bytes);
    }
    Ok(b)
}

pub use msb_vmm::netconf::PolicyFlags;

/// The policy the flags describe ([`msb_vmm::netconf::policy_from`]).
pub fn policy_from(f: &PolicyFlags) -> anyhow::Result<msb_netstack::policy::Policy> {
    Ok(msb_vmm::netconf::policy_from(f)?)
}

/// Secrets and TLS interception from the flags; none when neither is asked for. A secret
/// whose variable or file is missing is one line naming it, before boot.
fn tls_options(
    n: &crate::NetArgs,
    policy: &msb_netstack::policy::Policy,
) -> anyhow::Result<Option<msb_vmm::tls::TlsOptions>> {
    use msb_netstack::secrets::{HostPattern, Secret, Secrets};
    let mut list = Vec::new();
    // The policy file's [[secret]] tables: from the variable of that name, or a file.
    for spec in &policy.secrets {
        list.push(msb_vmm::netconf::policy_secret(spec)?);
    }
    for spec in &n.secret {
        let (name, hosts) = spec.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--secret {spec}: use NAME=HOSTS, e.g. OPENAI_API_KEY=api.openai.com")
        })?;
        let value = msb_vmm::netconf::env_secret(name).ok_or_else(|| {
            anyhow::anyhow!("--secret {name}: the environment variable {name} is not set (export it; values are never taken from the command line)")
        })?;
        list.push(
            Secret::new(name, value, hosts).map_err(|e| anyhow::anyhow!("--secret {spec}: {e}"))?,
        );
    }
    for spec in &n.secret_file {
        let mut parts = spec.splitn(3, '=');
        let (Some(name), Some(path), Some(hosts)) = (parts.next(), parts.next(), parts.next())
        else {
            anyhow::bail!("--secret-file {spec}: use NAME=PATH=HOSTS");
        };
        let value = msb_vmm::netconf::read_secret_file(std::path::Path::new(path))
            .map_err(|e| anyhow::anyhow!("--secret-file {name}: {path}: {e}"))?;
        list.push(
            Secret::new(name, value, hosts)
                .map_err(|e| anyhow::anyhow!("--secret-file {name}: {e}"))?,
        );
    }
    let mode = n
        .on_violation
        .as_deref()
        .or(policy.on_violation.as_deref())
        .unwrap_or("block");
    let log_violations = match mode {
        "block" => false,
        "log" => true,
        other => anyhow::bail!("--on-violation {other}: use block or log"),
    };
    let bypass = n
        .tls_bypass
        .iter()
        .map(|b| {
            HostPattern::parse(b)
                .ok_or_else(|| anyhow::anyhow!("--tls-bypass {b}: use a domain or *.suffix"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let asked = n.tls_intercept || !n.tls_intercept_ports.is_empty() || !bypass.is_empty();
    if list.is_empty() && !asked {
        return Ok(None);
    }
    for p in &n.tls_upstream_ca {
        if !p.is_file() {
            anyhow::bail!("--tls-upstream-ca {}: no such file", p.display());
        }
    }
    Ok(Some(msb_vmm::tls::TlsOptions {
        secrets: Secrets::new(list).map_err(|e| anyhow::anyhow!("--secret: {e}"))?,
        ports: n.tls_intercept_ports.clone(),
        bypass,
        upstream_cas: n.tls_upstream_ca.clone(),
        insecure_upstream: n.tls_insecure_upstream,
        log_violations,
    }))
}

/// Enters `--jail` when asked, after `add` names the paths the VMM needs. `Some(code)` in the
/// parent once the jailed child (which ran the VMM) exited; `None` in the child, or unjailed.
pub fn jail(
    vm: &crate::VmArgs,
    add: impl FnOnce(&mut msb_vmm::jail::JailSpec) -> anyhow::Result<()>,
) -> anyhow::Result<Option<u8>> {
    let Some(dir) = &vm.jail else {
        return Ok(None);
    };
    let mut spec = msb_vmm::jail::JailSpec::new(dir);
    if let Some(s) = &vm.jail_max_file {
        spec.fsize = Some(parse_size(s).ok_or_else(|| {
            anyhow::anyhow!("--jail-max-file {s}: expected bytes, or a number with k, m or g")
        })?);
    }
    if let Some(report) = &vm.report {
        // The jailed VMM writes the report: make the file and let it in.
        std::fs::write(report, b"")
            .with_context(|| format!("writing --report {}", report.display()))?;
        spec.bind(report, true);
    }
    add(&mut spec)?;
    Ok(match msb_vmm::jail::enter(&spec)? {
        msb_vmm::jail::Side::Jailed => None,
        msb_vmm::jail::Side::Parent { exit_code } => Some(exit_code.clamp(0, 255) as u8),
    })
}

/// `64m` → 64 MiB; plain numbers are bytes.
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}
