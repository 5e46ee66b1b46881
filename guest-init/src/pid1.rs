//! The PID 1 implementation. Every failure is reported (console line, control-port frame) and
//! ends in a power-off: PID 1 must never exit, or the kernel panics.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use msb_init::control::{ExitStatus, GuestMessage, MAX_OUTPUT_CHUNK};
use msb_init::frame;
use msb_init::spec::RunSpec;
use msb_init::{BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC, CONTROL_TTY, PROTOCOL_VERSION};

/// How long output is still drained after the workload's main process exited, for descendants
/// that keep its pipes open (a backgrounded `sleep`, or `yes`, must not keep the sandbox alive).
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn main() {
    let started = std::time::Instant::now();
    std::panic::set_hook(Box::new(|info| {
        eprintln!("msb-init: internal error: {info}");
        power_off();
    }));
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("msb-init: must run as PID 1 inside an msb-vmm guest");
        std::process::exit(2);
    }
    if let Err(e) = mount_basics() {
        eprintln!("msb-init: {e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let spec = RunSpec::from_cmdline(&cmdline);
    let hostname = match &spec {
        Ok(Some(s)) => s.hostname.clone(),
        _ => "msb".to_string(),
    };
    set_hostname(&hostname);
    if let Err(e) = loopback_up() {
        eprintln!("msb-init: cannot bring up lo: {e}");
    }
    if let Err(e) = signal_boot_timer() {
        eprintln!("msb-init: boot timer: {e}");
    }
    if cmdline.split_ascii_whitespace().any(|w| w == "msb.debug") {
        eprintln!("msb-init: set-up took {} us", started.elapsed().as_micros());
    }
    match spec {
        Ok(Some(spec)) => run_workload(&spec),
        Ok(None) => interactive_shell(),
        Err(e) => {
            let mut ctl = Control::open();
            ctl.send(&GuestMessage::Error(format!("bad workload spec: {e}")));
            ctl.send(&GuestMessage::Exited(ExitStatus::Code(125)));
            ctl.drain();
        }
    }
    power_off();
}

fn cstr(s: &str) -> CString {
    // Only called with literals and paths we built: no interior NUL.
    CString::new(s).unwrap_or_default()
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (src, target, fstype, data) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io::Error::new(
                e.kind(),
                format!("mount {fstype:?} on {target:?}: {e}"),
            ));
        }
    }
    Ok(())
}

fn mount_basics() -> io::Result<()> {
    use libc::{MS_NODEV, MS_NOEXEC, MS_NOSUID};
    mount(
        "proc",
        "/proc",
        "proc",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        "",
    )?;
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        "",
    )?;
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )?;
    mount(
        "shm",
        "/dev/shm",
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        "mode=1777",
    )?;
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")?;
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")?;
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        "",
    )?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    Ok(())
}

fn set_hostname(name: &str) {
    // SAFETY: the pointer and length describe `name`'s bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        eprintln!("msb-init: sethostname: {}", io::Error::last_os_error());
    }
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we pass, which is valid for writes.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS as libc::Ioctl,
            &mut req,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as libc::Ioctl, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the magic byte to the VMM's boot-timer MMIO page through /dev/mem.
fn signal_boot_timer() -> io::Result<()> {
    let path = cstr("/dev/mem");
    // SAFETY: path is a valid C string; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_SYNC | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    let mem = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: mapping one page of a device file; the result is checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            BOOT_TIMER_ADDR as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ptr maps one writable page; a volatile byte store becomes one MMIO write.
    unsafe { std::ptr::write_volatile(ptr.cast::<u8>(), BOOT_TIMER_MAGIC) };
    // SAFETY: unmapping exactly the mapping made above.
    unsafe { libc::munmap(ptr, 4096) };
    Ok(())
}

/// The guest→host control stream on the second UART, in raw mode so bytes pass unchanged.
struct Control {
    tty: Option<File>,
}

impl Control {
    fn open() -> Control {
        let tty = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(CONTROL_TTY)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("msb-init: cannot open control port {CONTROL_TTY}: {e}");
                return Control { tty: None };
            }
        };
        // SAFETY: termios is plain old data; tcgetattr fills it in.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tty is an open terminal fd and t is valid for writes.
        if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) } == 0 {
            // SAFETY: t was initialised by tcgetattr.
            unsafe { libc::cfmakeraw(&mut t) };
            t.c_cflag |= libc::CLOCAL | libc::CREAD;
            t.c_cflag &= !libc::CRTSCTS;
            // SAFETY: t is a valid termios.
            unsafe { libc::cfsetspeed(&mut t, libc::B115200) };
            // SAFETY: t is a valid termios for this open terminal fd.
            unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t) };
        }
        let mut c = Control { tty: Some(tty) };
        c.send(&GuestMessage::Hello {
            version: PROTOCOL_VERSION,
        });
        c
    }

    fn send(&mut self, msg: &GuestMessage) {
        let Some(tty) = self.tty.as_mut() else { return };
        let bytes = match frame::encode(msg) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("msb-init: cannot encode control frame: {e}");
                return;
            }
        };
        if let Err(e) = tty.write_all(&bytes) {
            eprintln!("msb-init: control port write failed: {e}");
            self.tty = None;
        }
    }

    /// Waits until every byte has left the UART: power-off would otherwise cut the stream.
    fn drain(&mut self) {
        if let Some(tty) = &self.tty {
            // SAFETY: tty is an open terminal fd.
            unsafe { libc::tcdrain(tty.as_raw_fd()) };
        }
    }
}

fn run_workload(spec: &RunSpec) {
    let mut ctl = Control::open();
    let status = match spawn_and_forward(spec, &mut ctl) {
        Ok(status) => status,
        Err((msg, code)) => {
            eprintln!("msb-init: {msg}");
            ctl.send(&GuestMessage::Error(msg));
            ExitStatus::Code(code)
        }
    };
    ctl.send(&GuestMessage::Exited(status));
    ctl.drain();
}

fn block_sigchld() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain old data and is initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: as above; SIGCHLD is a valid signal number.
    unsafe { libc::sigaddset(&mut set, libc::SIGCHLD) };
    // SAFETY: only changes this thread's signal mask; the old mask is not needed.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: creates a new fd for the blocked set; the result is checked.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs the workload; `Err((message, exit code))` when it could not be started.
fn spawn_and_forward(spec: &RunSpec, ctl: &mut Control) -> Result<ExitStatus, (String, i32)> {
    let sigfd = block_sigchld().map_err(|e| (format!("signalfd: {e}"), 125))?;
    let argv0 = OsStr::from_bytes(&spec.argv[0]);
    let mut cmd = Command::new(argv0);
    cmd.args(spec.argv[1..].iter().map(|a| OsStr::from_bytes(a)));
    cmd.env_clear();
    let has = |k: &[u8]| spec.env.iter().any(|(key, _)| key == k);
    if !has(b"PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if !has(b"HOME") {
        cmd.env("HOME", "/root");
    }
    for (k, v) in &spec.env {
        cmd.env(OsStr::from_bytes(k), OsStr::from_bytes(v));
    }
    let workdir = spec.workdir.as_deref().unwrap_or(b"/");
    cmd.current_dir(OsStr::from_bytes(workdir));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Own session and process group: the workload cannot signal PID 1's group by accident.
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        let name = String::from_utf8_lossy(&spec.argv[0]);
        let wd = String::from_utf8_lossy(workdir);
        match e.kind() {
            io::ErrorKind::NotFound
                if std::path::Path::new(OsStr::from_bytes(workdir)).is_dir() =>
            {
                (format!("{name}: command not found"), 127)
            }
            io::ErrorKind::NotFound => (format!("working directory {wd}: no such directory"), 126),
            io::ErrorKind::PermissionDenied => (format!("{name}: permission denied"), 126),
            _ => (format!("{name}: cannot execute: {e}"), 126),
        }
    })?;
    let pid = child.id() as libc::pid_t;
    let stdout: Option<OwnedFd> = child.stdout.take().map(Into::into);
    let stderr: Option<OwnedFd> = child.stderr.take().map(Into::into);
    Ok(forward(pid, [stdout, stderr], &sigfd, ctl))
}

/// Forwards output until the main process exited and its pipes closed (or went quiet for the
/// grace period), reaping every child that exits meanwhile (PID 1 inherits orphans).
fn forward(
    pid: libc::pid_t,
    mut pipes: [Option<OwnedFd>; 2],
    sigfd: &OwnedFd,
    ctl: &mut Control,
) -> ExitStatus {
    let mut status: Option<ExitStatus> = None;
    let mut exited_at: Option<std::time::Instant> = None;
    let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
    loop {
        if status.is_some() && pipes.iter().all(Option::is_none) {
            break;
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        let mut which: Vec<usize> = Vec::with_capacity(3);
        for (i, p) in pipes.iter().enumerate() {
            if let Some(p) = p {
                fds.push(libc::pollfd {
                    fd: p.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                which.push(i);
            }
        }
        fds.push(libc::pollfd {
            fd: sigfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let timeout = match exited_at {
            Some(t) => match DRAIN_GRACE.checked_sub(t.elapsed()) {
                Some(left) => left.as_millis() as i32,
                None => break,
            },
            None => -1,
        };
        // SAFETY: fds points to fds.len() valid pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if n == 0 {
            // Main process gone and the grace period over: stop waiting for descendants.
            break;
        }
        for (k, &i) in which.iter().enumerate() {
            if fds[k].revents == 0 {
                continue;
            }
            let fd = pipes[i].as_ref().map(AsRawFd::as_raw_fd).unwrap_or(-1);
            match read_fd(fd, &mut buf) {
                Ok(0) | Err(_) => pipes[i] = None,
                Ok(len) => {
                    let chunk = buf[..len].to_vec();
                    ctl.send(&if i == 0 {
                        GuestMessage::Stdout(chunk)
                    } else {
                        GuestMessage::Stderr(chunk)
                    });
                }
            }
        }
        if fds[fds.len() - 1].revents != 0 {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            while read_fd(sigfd.as_raw_fd(), &mut info)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
            reap(pid, &mut status);
            if status.is_some() && exited_at.is_none() {
                exited_at = Some(std::time::Instant::now());
            }
        }
    }
    if status.is_none() {
        // Output ended first; the main process is still going or exiting: wait for it.
        status = Some(wait_blocking(pid));
    }
    status.unwrap_or(ExitStatus::Code(125))
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn decode_status(raw: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(raw) {
        ExitStatus::Signal(libc::WTERMSIG(raw))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(raw))
    }
}

/// Reaps every exited child without blocking; records the main process's status.
fn reap(main_pid: libc::pid_t, status: &mut Option<ExitStatus>) {
    loop {
        let mut raw = 0;
        // SAFETY: raw is a valid out-pointer.
        let p = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if p <= 0 {
            return;
        }
        if p == main_pid {
            *status = Some(decode_status(raw));
        }
    }
}

fn wait_blocking(pid: libc::pid_t) -> ExitStatus {
    loop {
        let mut raw = 0;
        // SAFETY: raw is a valid out-pointer.
        let p = unsafe { libc::waitpid(pid, &mut raw, 0) };
        if p == pid {
            return decode_status(raw);
        }
        if p < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return ExitStatus::Code(125);
        }
    }
}

/// No workload on the command line: a shell on the console (`msb-vmm boot --console` with the
/// default initramfs), then power-off when it exits.
fn interactive_shell() {
    if !std::path::Path::new("/bin/sh").exists() {
        eprintln!("msb-init: no msb.run= workload and no /bin/sh; powering off");
        return;
    }
    eprintln!("msb-init: no msb.run= workload; starting /bin/sh on the console");
    let status = Command::new("/bin/sh")
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("TERM", "linux")
        .current_dir("/")
        .status();
    if let Err(e) = status {
        eprintln!("msb-init: /bin/sh: {e}");
    }
}

/// Kills what is left, flushes file systems and resets the VM (reboot=k: the i8042 reset line,
/// which the VMM treats as power-off).
fn power_off() -> ! {
    // SAFETY: kill(-1) signals every process but PID 1 itself; no pointers involved.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    // SAFETY: reboot takes no pointers and only returns on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // reboot(2) failed (it cannot as PID 1 with CAP_SYS_BOOT); never return from PID 1.
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}
