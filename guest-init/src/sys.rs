//! Thin, checked wrappers over the Linux system calls msb-init needs. Each `unsafe` block is a
//! single call whose pointers come from live Rust values.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use msb_init::agent::{ExitStatus, TermSize, User};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: fd is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd (wakes pollers).
pub fn eventfd_signal(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a valid u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd.
pub fn eventfd_drain(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a valid u64.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// kill(2), errors ignored (the target may be gone).
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: plain system call.
    unsafe { libc::kill(pid, sig) };
}

/// sync(2).
pub fn sync() {
    // SAFETY: plain system call.
    unsafe { libc::sync() };
}

/// poll(2) with a millisecond timeout (-1: forever), retrying on EINTR.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i64) -> i32 {
    let t = timeout_ms.clamp(-1, i64::from(i32::MAX)) as i32;
    loop {
        // SAFETY: fds is a valid slice of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, t) };
        if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return n;
        }
    }
}

/// read(2), retrying on EINTR; EIO (a terminal whose other side closed) reads as end of file.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EIO) => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// Bytes waiting to be read from a pipe or terminal (FIONREAD); 0 on error.
pub fn bytes_available(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int to a valid pointer.
    if unsafe { libc::ioctl(fd, libc::FIONREAD as _, &mut n) } == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Moves exactly `len` bytes from pipe `from`, which holds at least that many, into `to` with
/// splice(2): the pages go from the pipe to the socket without a copy through this process.
pub fn splice_exact(from: RawFd, to: RawFd, mut len: usize) -> io::Result<()> {
    while len > 0 {
        // SAFETY: splice between two descriptors with null offsets touches no memory of ours.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => len -= (n as usize).min(len),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Raises a pipe's buffer to 1 MiB (fewer wake-ups for bulk output); best effort.
pub fn grow_pipe(fd: RawFd) {
    // SAFETY: fcntl with an integer argument.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20) };
}

/// The pid of a child that has exited, left unreaped (`waitid` with `WNOWAIT`), waiting for
/// one; `None` when there are no children. The reaper looks first and reaps under the spawn
/// lock, so it never takes a child whose failed `exec` the spawning thread is about to reap.
pub fn exited_child() -> Option<i32> {
    loop {
        // SAFETY: siginfo_t is plain old data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid out-pointer; WNOWAIT leaves the child as it is.
        let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 {
            // SAFETY: waitid filled info for a child state change (si_pid is valid for it).
            let pid = unsafe { info.si_pid() };
            if pid > 0 {
                return Some(pid);
            }
            continue;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// Reaps `pid` if it is still our child and has exited; `None` otherwise (someone else, a
/// failed spawn's own wait, reaped it).
pub fn reap(pid: i32) -> Option<ExitStatus> {
    loop {
        let mut raw = 0;
        // SAFETY: raw is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
        if r == pid {
            return Some(if libc::WIFSIGNALED(raw) {
                ExitStatus::Signal(libc::WTERMSIG(raw))
            } else {
                ExitStatus::Code(libc::WEXITSTATUS(raw))
            });
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
}

fn winsize(size: TermSize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A pseudo-terminal pair (master, slave) of the given size.
pub fn openpty(size: TermSize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let ws = winsize(size);
    // SAFETY: the out-pointers are valid; name and termios are optional (null).
    check(unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    })?;
    // SAFETY: openpty returned a new descriptor we own.
    let m = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: as above.
    let s = unsafe { OwnedFd::from_raw_fd(slave) };
    for fd in [&m, &s] {
        // SAFETY: fcntl on our own descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((m, s))
}

/// Sets a terminal's window size (the kernel sends SIGWINCH to its foreground group).
pub fn set_winsize(fd: RawFd, size: TermSize) {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ as _, &ws) };
}

/// In a forked child: new session, standard input (the terminal) as controlling terminal.
pub fn become_session_leader_with_tty() -> io::Result<()> {
    // SAFETY: async-signal-safe system calls without pointers.
    check(unsafe { libc::setsid() })?;
    // SAFETY: as above.
    check(unsafe { libc::ioctl(0, libc::TIOCSCTTY as _, 0) })?;
    Ok(())
}

/// In a forked child: joins the cgroup whose `cgroup.procs` is open as `procs`.
pub fn join_cgroup(procs: RawFd) -> io::Result<()> {
    // SAFETY: write(2) of a 1-byte static buffer is async-signal-safe.
    check(unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) as libc::c_int }).map(|_| ())
}

/// In a forked child: own process group, so signals can target the whole job.
pub fn setpgid_self() -> io::Result<()> {
    // SAFETY: async-signal-safe system call.
    check(unsafe { libc::setpgid(0, 0) }).map(|_| ())
}

/// The type of setrlimit's resource argument (glibc and musl differ).
#[cfg(target_env = "gnu")]
pub type Resource = libc::__rlimit_resource_t;
/// The type of setrlimit's resource argument (glibc and musl differ).
#[cfg(not(target_env = "gnu"))]
pub type Resource = libc::c_int;

/// setrlimit(2).
pub fn setrlimit(resource: Resource, soft: u64, hard: u64) -> io::Result<()> {
    let l = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: reads a valid rlimit.
    check(unsafe { libc::setrlimit(resource, &l) }).map(|_| ())
}

/// Raises RLIMIT_NOFILE to `want` (soft and hard), or where the hard limit cannot be raised
/// (no CAP_SYS_RESOURCE, as in some containers running the agent on a host) the soft limit to
/// the hard one. Best effort: a default must not make an exec fail.
pub fn raise_nofile(want: u64) {
    if setrlimit(libc::RLIMIT_NOFILE, want, want).is_ok() {
        return;
    }
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } == 0 {
        let _ = setrlimit(libc::RLIMIT_NOFILE, cur.rlim_max.min(want), cur.rlim_max);
    }
}

/// In a forked child: switch to the user (groups first, then gid, then uid).
pub fn drop_to(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // SAFETY: groups is a valid slice of gid_t.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
    // SAFETY: plain system call.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: plain system call.
    check(unsafe { libc::setuid(uid) })?;
    Ok(())
}

/// A user resolved from the guest's /etc/passwd and /etc/group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: Vec<u8>,
}

/// Resolves a user by name or number from the passwd and group files of the tree at `root`
/// (`/`, or a container's root).
pub fn resolve_user_at(root: &std::path::Path, user: &User) -> Result<ResolvedUser, String> {
    let passwd = std::fs::read(root.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read(root.join("etc/group")).unwrap_or_default();
    resolve_user_in(user, &passwd, &group)
}

/// In a forked child: chroot(2) into `root`, then chdir(2) to `dir` inside it.
pub fn chroot_and_chdir(root: &std::ffi::CStr, dir: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: async-signal-safe system calls on valid NUL-terminated strings.
    check(unsafe { libc::chroot(root.as_ptr()) })?;
    // SAFETY: as above.
    check(unsafe { libc::chdir(dir.as_ptr()) }).map(|_| ())
}

/// The lookup over given file contents (unit-tested).
pub fn resolve_user_in(user: &User, passwd: &[u8], group: &[u8]) -> Result<ResolvedUser, String> {
    let entries: Vec<Vec<&[u8]>> = passwd
        .split(|&b| b == b'\n')
        .map(|l| l.split(|&b| b == b':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .collect();
    let num = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
    };
    let (name, uid, gid, home): (Vec<u8>, u32, u32, Vec<u8>) = match user {
        User::Id { uid, gid } => {
            let e = entries.iter().find(|f| num(f[2]) == Some(*uid));
            let home = e.map(|f| f[5].to_vec()).unwrap_or_else(|| b"/".to_vec());
            let name = e.map(|f| f[0].to_vec()).unwrap_or_default();
            (name, *uid, *gid, home)
        }
        User::Name(n) => {
            let e = entries.iter().find(|f| f[0] == n.as_bytes());
            match (e, n.parse::<u32>().ok()) {
                (Some(f), _) => {
                    let uid =
                        num(f[2]).ok_or_else(|| format!("user {n}: bad uid in /etc/passwd"))?;
                    let gid =
                        num(f[3]).ok_or_else(|| format!("user {n}: bad gid in /etc/passwd"))?;
                    (f[0].to_vec(), uid, gid, f[5].to_vec())
                }
                (None, Some(uid)) => (Vec::new(), uid, uid, b"/".to_vec()),
                (None, None) => return Err(format!("user {n}: not in the guest's /etc/passwd")),
            }
        }
    };
    let mut groups = vec![gid];
    if !name.is_empty() {
        for line in group.split(|&b| b == b'\n') {
            let f: Vec<&[u8]> = line.split(|&b| b == b':').collect();
            if f.len() >= 4 && f[3].split(|&b| b == b',').any(|m| m == name.as_slice()) {
                if let Some(g) = num(f[2]) {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        groups,
        home,
    })
}

/// accept4(2) with close-on-exec.
pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: no address is requested (null pointers are allowed).
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a new descriptor we own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// A vsock stream socket listening on `port` of any local CID.
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a new descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    check(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    })?;
    // SAFETY: plain system call on our socket.
    check(unsafe { libc::listen(sock.as_raw_fd(), 128) })?;
    Ok(sock)
}

/// Mixes `seed` into the kernel's entropy pool (credited as entropy: it comes from the host's
/// own generator) and makes the kernel reseed its generator from the pool at once, so two
/// guests restored from one snapshot stop producing the same random numbers.
pub fn reseed_kernel_rng(seed: &[u8]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    if !seed.is_empty() {
        let mut info = Vec::with_capacity(8 + seed.len());
        info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
        info.extend_from_slice(seed);
        // SAFETY: `info` is a rand_pool_info header followed by `buf_size` bytes, alive for
        // the call; the kernel only reads it.
        check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) })?;
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) })?;
    Ok(())
}

/// Whether this process may execute `path` (access(2) with X_OK).
pub fn executable(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\nbad:x:nope:1:::\n";
    const GROUP: &[u8] = b"root:x:0:\nwheel:x:10:alice,bob\nalice:x:1000:\ndocker:x:999:alice\n";

    #[test]
    fn users_by_name_and_id() {
        let a = resolve_user_in(&User::Name("alice".into()), PASSWD, GROUP).unwrap();
        assert_eq!(
            (a.uid, a.gid, a.home.as_slice()),
            (1000, 1000, b"/home/alice".as_slice())
        );
        assert_eq!(a.groups, vec![1000, 10, 999]);
        let n = resolve_user_in(&User::Name("4242".into()), PASSWD, GROUP).unwrap();
        assert_eq!((n.uid, n.gid, n.groups.clone()), (4242, 4242, vec![4242]));
        let id = resolve_user_in(&User::Id { uid: 1000, gid: 5 }, PASSWD, GROUP).unwrap();
        assert_eq!(
            (id.uid, id.gid, id.home.as_slice()),
            (1000, 5, b"/home/alice".as_slice())
        );
        assert!(resolve_user_in(&User::Name("mallory".into()), PASSWD, GROUP).is_err());
        assert!(resolve_user_in(&User::Name("bad".into()), PASSWD, GROUP).is_err());
    }
}
