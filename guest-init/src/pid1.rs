//! The PID 1 implementation. Every failure is reported on the console and ends in a power-off:
//! PID 1 must never exit, or the kernel panics.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use msb_init::agent::AGENT_PORT;
use msb_init::{cmdline, BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC};

use crate::agent_server::{self, Agent, OnShutdown, DEFAULT_PATH};
use crate::sys;

pub fn main() {
    let started = std::time::Instant::now();
    std::panic::set_hook(Box::new(|info| {
        eprintln!("msb-init: internal error: {info}");
        power_off();
    }));
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("msb-init: must run as PID 1 inside an msb-vmm guest (or: msb-init agent --listen PATH)");
        std::process::exit(2);
    }
    let cmdline = read_cmdline();
    let specs = cmdline::MountSpec::all(&cmdline);
    // A virtiofs mount at `/` is the root file system: move into it first, staying PID 1.
    if let Some(Ok(cmdline::MountSpec::Virtiofs { tag, access, .. })) = specs
        .iter()
        .find(|s| matches!(s, Ok(cmdline::MountSpec::Virtiofs { path, .. }) if path == b"/"))
    {
        if let Err(e) = switch_root(tag, *access) {
            eprintln!("msb-init: cannot use the root file system {tag:?}: {e}");
            power_off();
        }
    }
    if let Err(e) = mount_basics() {
        eprintln!("msb-init: {e}");
    }
    for spec in specs {
        let spec = match spec {
            Ok(cmdline::MountSpec::Virtiofs { ref path, .. }) if path == b"/" => continue,
            other => other,
        };
        if let Err(e) = spec.map_err(io::Error::other).and_then(|s| mount_spec(&s)) {
            eprintln!("msb-init: {e}");
        }
    }
    tune_readahead();
    let hostname = match cmdline::value(&cmdline, cmdline::HOSTNAME) {
        Some(h) if cmdline::valid_hostname(h) => h,
        Some(h) => {
            eprintln!("msb-init: ignoring invalid hostname {h:?}");
            "msb"
        }
        None => "msb",
    };
    set_hostname(hostname);
    if let Err(e) = loopback_up() {
        eprintln!("msb-init: cannot bring up lo: {e}");
    }
    if let Some(v) = cmdline::value(&cmdline, cmdline::NET) {
        match cmdline::NetConfig::parse(v) {
            Some(cfg) => {
                if let Err(e) = crate::net::configure(&cfg) {
                    eprintln!("msb-init: network: {e}");
                }
            }
            None => eprintln!("msb-init: ignoring malformed {}{v}", cmdline::NET),
        }
    }
    // Listen before signalling boot: the boot timer tells the host the agent is reachable.
    let listener = sys::vsock_listen(AGENT_PORT)
        .map_err(|e| eprintln!("msb-init: agent cannot listen on vsock port {AGENT_PORT}: {e}"))
        .ok();
    let agent = Agent::new(OnShutdown::PowerOff);
    if let Err(e) = signal_boot_timer() {
        eprintln!("msb-init: boot timer: {e}");
    }
    if cmdline::has(&cmdline, cmdline::DEBUG) {
        eprintln!("msb-init: set-up took {} us", started.elapsed().as_micros());
    }
    if cmdline::has(&cmdline, cmdline::EXIT_AFTER_BOOT) {
        power_off();
    }
    if cmdline::has(&cmdline, cmdline::SHELL) || listener.is_none() {
        std::thread::spawn(|| {
            interactive_shell();
            power_off();
        });
    }
    match listener {
        Some(l) => agent_server::serve_vsock(l, agent),
        None => loop {
            // The console shell (if any) powers off when it exits.
            std::thread::park();
        },
    }
}

/// The kernel command line, read through a /proc mounted just for that (the real /proc is
/// mounted in whichever root we end up in).
fn read_cmdline() -> String {
    let _ = mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    );
    let c = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let p = cstr("/proc");
    // SAFETY: NUL-terminated path.
    unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    c
}

/// Mounts the virtio-fs share `tag` and makes it `/` (as switch_root does: the initramfs
/// stays underneath, unreachable; we keep running from memory).
fn switch_root(tag: &str, access: cmdline::Access) -> io::Result<()> {
    mount_share(tag, "/newroot", access, 0)?;
    std::env::set_current_dir("/newroot")?;
    let (dot, root) = (cstr("."), cstr("/"));
    // SAFETY: NUL-terminated paths; MS_MOVE takes no fstype or data.
    if unsafe {
        libc::mount(
            dot.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

/// Mounts share `tag` at `target` (which exists). For [`cmdline::Access::Overlay`] the share
/// goes read-only under `/.msb/TAG/lower` of the initramfs (out of reach once we have switched
/// root) with a tmpfs for the upper layer, and an overlay of the two goes at `target`.
fn mount_share(
    tag: &str,
    target: &str,
    access: cmdline::Access,
    flags: libc::c_ulong,
) -> io::Result<()> {
    use cmdline::Access;
    let ro = if access == Access::ReadWrite {
        0
    } else {
        libc::MS_RDONLY
    };
    if access != Access::Overlay {
        return mount(tag, target, "virtiofs", flags | ro, "");
    }
    // The layers live in the initramfs, which only PID 1 set-up touches.
    let base = format!("/.msb/{tag}");
    let (lower, rw) = (format!("{base}/lower"), format!("{base}/rw"));
    mount(tag, &lower, "virtiofs", flags | ro, "")?;
    mount("overlay-rw", &rw, "tmpfs", flags, "mode=0755")?;
    let (upper, work) = (format!("{rw}/upper"), format!("{rw}/work"));
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    // The upper root takes the lower root's mode (a tmpfs root is 0755 root:root).
    if let Ok(m) = std::fs::metadata(&lower) {
        use std::os::unix::fs::MetadataExt;
        let _ = std::fs::set_permissions(
            &upper,
            std::os::unix::fs::PermissionsExt::from_mode(m.mode() & 0o7777),
        );
        let _ = std::os::unix::fs::chown(&upper, Some(m.uid()), Some(m.gid()));
    }
    mount(
        "overlay",
        target,
        "overlay",
        flags,
        &format!("lowerdir={lower},upperdir={upper},workdir={work}"),
    )
}

/// Mounts a volume or tmpfs the VMM asked for.
fn mount_spec(spec: &cmdline::MountSpec) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let (src, fstype, path, flags, data) = match spec {
        cmdline::MountSpec::Virtiofs {
            tag,
            path,
            access: cmdline::Access::Overlay,
        } => {
            let shown = String::from_utf8_lossy(path).into_owned();
            let target = std::str::from_utf8(path)
                .map_err(|_| io::Error::other(format!("overlay volume {shown:?}: not UTF-8")))?;
            return mount_share(
                tag,
                target,
                cmdline::Access::Overlay,
                libc::MS_NOSUID | libc::MS_NODEV,
            )
            .map_err(|e| io::Error::new(e.kind(), format!("volume {shown:?}: {e}")));
        }
        cmdline::MountSpec::Virtiofs { tag, path, access } => {
            let ro = if *access == cmdline::Access::ReadOnly {
                libc::MS_RDONLY
            } else {
                0
            };
            (tag.clone(), "virtiofs", path, ro, String::new())
        }
        cmdline::MountSpec::Tmpfs { size, path } => {
            let data = if *size > 0 {
                format!("size={size},mode=1777")
            } else {
                "mode=1777".into()
            };
            ("tmpfs".into(), "tmpfs", path, 0, data)
        }
    };
    let shown = String::from_utf8_lossy(path).into_owned();
    std::fs::create_dir_all(std::ffi::OsStr::from_bytes(path))
        .map_err(|e| io::Error::new(e.kind(), format!("creating mount point {shown:?}: {e}")))?;
    let target = CString::new(path.as_slice()).map_err(|_| io::Error::other("NUL in path"))?;
    let (src, fstype, data) = (cstr(&src), cstr(fstype), cstr(&data));
    sys_mount(
        &src,
        &target,
        &fstype,
        flags | libc::MS_NOSUID | libc::MS_NODEV,
        &data,
    )
    .map_err(|e| io::Error::new(e.kind(), format!("mount {shown:?}: {e}")))
}

/// mount(2), noting virtio-fs shares for [`tune_readahead`]; the bare OS error.
fn sys_mount(
    src: &CString,
    target: &CString,
    fstype: &CString,
    flags: libc::c_ulong,
    data: &CString,
) -> io::Result<()> {
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
        return Err(io::Error::last_os_error());
    }
    if fstype.as_bytes() == b"virtiofs" {
        note_share(target);
    }
    Ok(())
}

/// Devices of the virtio-fs mounts made so far, for [`tune_readahead`].
static SHARES: std::sync::Mutex<Vec<libc::dev_t>> = std::sync::Mutex::new(Vec::new());

fn note_share(target: &CString) {
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path and a valid out-pointer.
    if unsafe { libc::stat(target.as_ptr(), &mut st) } == 0 {
        SHARES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(st.st_dev);
    }
}

/// Read ahead 1 MiB (one FUSE request at the size we negotiate) on every virtio-fs mount,
/// rather than the kernel's 128 KiB: each request costs a round trip to the VMM, and a
/// sequential read then takes an eighth of them. Needs /sys (after [`mount_basics`]).
fn tune_readahead() {
    for dev in SHARES.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let path = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(*dev),
            libc::minor(*dev)
        );
        if let Err(e) = std::fs::write(&path, "1024") {
            eprintln!("msb-init: {path}: {e}");
        }
    }
}

fn cstr(s: &str) -> CString {
    // Only called with literals and paths we built: no interior NUL.
    CString::new(s).unwrap_or_default()
}

/// mount(2) at `target` (created if missing), the error naming what; mounted already (EBUSY)
/// counts as done.
pub(crate) fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (src, target, fstype, data) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    match sys_mount(&src, &target, &fstype, flags, &data) {
        Err(e) if e.raw_os_error() != Some(libc::EBUSY) => Err(io::Error::new(
            e.kind(),
            format!("mount {fstype:?} on {target:?}: {e}"),
        )),
        _ => Ok(()),
    }
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
    crate::net::link_up(b"lo")
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

/// A shell on the console (`msb.shell`, or when the agent cannot listen), for debugging with
/// `msb-vmm boot --console`.
fn interactive_shell() {
    if !std::path::Path::new("/bin/sh").exists() {
        eprintln!("msb-init: no /bin/sh for a console shell");
        return;
    }
    eprintln!("msb-init: starting /bin/sh on the console");
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
pub fn power_off() -> ! {
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
