//! The built-in jail (`--jail DIR`): the VMM process moves into new mount, PID, IPC and UTS
//! namespaces and `pivot_root`s into DIR, where only what it needs is mounted, each at its own
//! absolute path (so nothing in the VMM needs to know it is jailed): /dev/kvm, the guest
//! kernel and assets, the shared directories, the state directory, the resolver's files. Resource
//! limits cap its descriptors and the size of any file it writes. Like Firecracker's jailer,
//! but in-process: the seccomp filters then confine each thread inside it.
//!
//! Needs root (namespaces and mounts). The calling process forks: the child, PID 1 of the new
//! PID namespace, returns from [`enter`] and runs the sandbox; the parent waits for it,
//! forwarding termination signals, and exits with its status.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors entering the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail needs root (it makes namespaces and mounts): run as root or leave out --jail")]
    NotRoot,
    #[error("--jail {0}: the jail directory must be empty (or not exist yet)")]
    NotEmpty(PathBuf),
    #[error("--jail: {what} {path}: {source}")]
    Path {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("--jail: {what}: {source}")]
    Sys {
        what: &'static str,
        source: io::Error,
    },
}

/// A host path the jailed VMM needs, mounted at the same path inside.
#[derive(Debug, Clone)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// What goes into a jail.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The (empty or new) directory that becomes the VMM's root.
    pub dir: PathBuf,
    pub binds: Vec<Bind>,
    /// RLIMIT_NOFILE (soft and hard).
    pub nofile: u64,
    /// RLIMIT_FSIZE in bytes (soft and hard): the largest file the VMM may write; None: the
    /// inherited limit.
    pub fsize: Option<u64>,
}

/// Default RLIMIT_NOFILE in the jail: the netstack's 1024 flows, the VMM's own descriptors and
/// the shares' inodes and open files (an fd each, up to 65 536 + 4 096 per share: a lower
/// limit would make a guest's `find /` fail part-way), within the kernel's `fs.nr_open`.
pub fn default_nofile() -> u64 {
    msb_devices::fs::passthrough::nofile_ceiling()
}

/// Files name resolution reads (the netstack's resolver threads use the host's).
const RESOLVER_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
];

impl JailSpec {
    /// A jail in `dir` with the device nodes and resolver files every VMM needs; add the
    /// sandbox's own paths with [`JailSpec::bind`].
    pub fn new(dir: impl Into<PathBuf>) -> JailSpec {
        let mut spec = JailSpec {
            dir: dir.into(),
            binds: Vec::new(),
            nofile: default_nofile(),
            fsize: None,
        };
        spec.bind("/dev/kvm", true);
        spec.bind("/dev/null", true);
        spec.bind("/dev/urandom", false);
        // The PVM check (`crate::host::is_pvm`) must see what the host has.
        if Path::new("/sys/module/kvm_pvm").exists() {
            spec.bind("/sys/module/kvm_pvm", false);
        }
        for f in RESOLVER_FILES {
            if Path::new(f).exists() {
                spec.bind(f, false);
            }
        }
        spec
    }

    /// Mounts host `path` (resolved through symlinks) at the same path in the jail.
    pub fn bind(&mut self, path: impl AsRef<Path>, writable: bool) -> &mut JailSpec {
        let path = std::fs::canonicalize(path.as_ref()).unwrap_or(path.as_ref().to_path_buf());
        match self.binds.iter_mut().find(|b| b.path == path) {
            Some(b) => b.writable |= writable,
            None => self.binds.push(Bind { path, writable }),
        }
        self
    }
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Sys { what, source }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr);
    let target = cstr(target);
    let fstype = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&src),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

/// Which side of the fork [`enter`] returned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The jailed child: go on and run the sandbox.
    Jailed,
    /// The parent, after the jailed child exited with this code (128 + signal if killed).
    Parent { exit_code: i32 },
}

/// Enters the jail. The jailed child gets `Side::Jailed`; the parent waits for it (forwarding
/// SIGTERM, SIGHUP and SIGQUIT) and gets its exit code.
pub fn enter(spec: &JailSpec) -> Result<Side, JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    match std::fs::read_dir(&spec.dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(JailError::NotEmpty(spec.dir.clone()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&spec.dir).map_err(|source| JailError::Path {
                what: "creating",
                path: spec.dir.clone(),
                source,
            })?;
        }
        Err(source) => {
            return Err(JailError::Path {
                what: "reading",
                path: spec.dir.clone(),
                source,
            })
        }
    }
    let dir = std::fs::canonicalize(&spec.dir).map_err(|source| JailError::Path {
        what: "resolving",
        path: spec.dir.clone(),
        source,
    })?;
    for b in &spec.binds {
        if !b.path.exists() {
            return Err(JailError::Path {
                what: "binding",
                path: b.path.clone(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
    }
    let cwd = std::env::current_dir().ok();
    // SAFETY: unshare with namespace flags only.
    check(unsafe {
        libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        )
    })
    .map_err(sys("creating namespaces (unshare)"))?;
    // SAFETY: fork in a process with only this thread (the jail is entered before the sandbox
    // starts any); the child continues with a copy of our state.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::Sys {
            what: "fork",
            source: io::Error::last_os_error(),
        });
    }
    if pid > 0 {
        return Ok(Side::Parent {
            exit_code: wait(pid),
        });
    }
    // The child: PID 1 of the new namespace. It dies with its parent.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    build_root(spec, &dir)?;
    let old = dir.join(".old-root");
    std::fs::create_dir(&old).map_err(sys("creating .old-root"))?;
    // SAFETY: pivot_root with two NUL-terminated paths that outlive the call.
    let pivoted = unsafe {
        libc::syscall(
            libc::SYS_pivot_root,
            cstr(&dir).as_ptr(),
            cstr(&old).as_ptr(),
        )
    } == 0;
    if pivoted {
        std::env::set_current_dir("/").map_err(sys("chdir /"))?;
        // SAFETY: umount2 of a NUL-terminated path.
        check(unsafe { libc::umount2(c"/.old-root".as_ptr(), libc::MNT_DETACH) })
            .map_err(sys("detaching the old root"))?;
        let _ = std::fs::remove_dir("/.old-root");
    } else {
        // pivot_root refuses a root that is not a mount point (a chroot, an initramfs): fall
        // back to chroot, which our threads cannot undo (no capabilities, no chroot call).
        tracing::warn!(
            "--jail: pivot_root failed ({}); using chroot",
            io::Error::last_os_error()
        );
        let _ = std::fs::remove_dir(&old);
        // SAFETY: chroot of a NUL-terminated path.
        check(unsafe { libc::chroot(cstr(&dir).as_ptr()) }).map_err(sys("chroot"))?;
        std::env::set_current_dir("/").map_err(sys("chdir /"))?;
    }
    // Nothing else may be created at the top.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        None,
    )
    .map_err(sys("making the jail's root read-only"))?;
    if let Some(cwd) = cwd {
        let _ = std::env::set_current_dir(cwd);
    }
    let host = c"msb-jail";
    // SAFETY: sethostname of a buffer of the given length.
    let _ = unsafe { libc::sethostname(host.as_ptr(), host.to_bytes().len()) };
    set_nofile(spec.nofile).map_err(sys("setting RLIMIT_NOFILE"))?;
    if let Some(max) = spec.fsize {
        // A write past the limit fails with EFBIG instead of killing the VMM.
        // SAFETY: ignoring a signal installs no handler code.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        set_limit(libc::RLIMIT_FSIZE, max).map_err(sys("setting RLIMIT_FSIZE"))?;
    }
    tracing::info!(dir = %dir.display(), "jailed");
    Ok(Side::Jailed)
}

/// setrlimit's resource type: glibc's own enum type, musl's int.
#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

/// RLIMIT_NOFILE to `value`, or to the hard limit we have where raising it past that is not
/// ours to do (no CAP_SYS_RESOURCE: a root without it, as in some containers).
fn set_nofile(value: u64) -> io::Result<()> {
    match set_limit(libc::RLIMIT_NOFILE, value) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            // SAFETY: rlimit is plain old data; all-zero is valid.
            let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
            // SAFETY: a valid out-pointer.
            check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
            if rl.rlim_max >= value {
                return Err(e);
            }
            set_limit(libc::RLIMIT_NOFILE, rl.rlim_max)
        }
        r => r,
    }
}

fn set_limit(resource: Resource, value: u64) -> io::Result<()> {
    let rl = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct we pass.
    check(unsafe { libc::setrlimit(resource, &rl) })
}

/// Mounts a small tmpfs at `dir` and everything the VMM needs inside it.
fn build_root(spec: &JailSpec, dir: &Path) -> Result<(), JailError> {
    // Our mounts must not propagate back to the host's namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(sys("making mounts private"))?;
    mount(
        Some(Path::new("tmpfs")),
        dir,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .map_err(sys("mounting the jail's tmpfs"))?;
    // Parents before children; a path inside a bind at least as permissive needs no mount of
    // its own (and must not get one: its mount point would be made on the host's file).
    let mut binds = spec.binds.clone();
    binds.sort_by(|a, b| a.path.cmp(&b.path));
    let mut mounted: Vec<Bind> = Vec::new();
    for b in binds {
        let covered = mounted
            .iter()
            .any(|m| b.path.starts_with(&m.path) && (m.writable || !b.writable));
        if covered {
            continue;
        }
        let rel = b.path.strip_prefix("/").unwrap_or(&b.path);
        let target = dir.join(rel);
        // Never truncate or replace: inside an earlier bind the target is a host file.
        let made = if b.path.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&target)
                        .map(drop)
                })
        };
        made.map_err(|source| JailError::Path {
            what: "making the mount point for",
            path: b.path.clone(),
            source,
        })?;
        mount(
            Some(&b.path),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )
        .map_err(|source| JailError::Path {
            what: "bind-mounting",
            path: b.path.clone(),
            source,
        })?;
        mounted.push(b);
    }
    // Then the restrictions, once every mount point exists (some lie inside read-only binds).
    for b in &mounted {
        let target = dir.join(b.path.strip_prefix("/").unwrap_or(&b.path));
        // Device nodes keep working only where they are bound on purpose (/dev/kvm).
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
        if !b.path.starts_with("/dev") {
            flags |= libc::MS_NODEV;
        }
        if !b.writable {
            flags |= libc::MS_RDONLY;
        }
        mount(None, &target, None, flags, None).map_err(|source| JailError::Path {
            what: "restricting the mount of",
            path: b.path.clone(),
            source,
        })?;
    }
    // The VMM's own /proc (the file server reaches its descriptors through /proc/self/fd).
    let proc = dir.join("proc");
    std::fs::create_dir_all(&proc).map_err(sys("creating /proc"))?;
    mount(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(sys("mounting /proc"))?;
    // The working directory, empty, so relative paths fail cleanly rather than escape.
    if let Ok(cwd) = std::env::current_dir() {
        let _ = std::fs::create_dir_all(dir.join(cwd.strip_prefix("/").unwrap_or(&cwd)));
    }
    Ok(())
}

/// The parent's life after the fork: forward SIGTERM, SIGHUP and SIGQUIT to the jailed child
/// (SIGINT and SIGWINCH from a terminal reach it directly) until it exits; its exit code.
fn wait(child: libc::pid_t) -> i32 {
    // SAFETY: an all-zero sigset_t is a valid (empty) set.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    for s in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGINT] {
        // SAFETY: adds a valid signal number to our local set.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: blocks them for this thread (the only one) so sigtimedwait can collect them.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let tick = libc::timespec {
        tv_sec: 0,
        tv_nsec: 50_000_000,
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        if unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } == child {
            // SAFETY: restores the mask we changed (collected signals are already consumed).
            unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
            return if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
        }
        // SAFETY: sigtimedwait with a valid set and timeout; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &tick) };
        if sig > 0 && sig != libc::SIGINT {
            // SAFETY: kill of our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}
