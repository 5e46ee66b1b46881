//! The filters, the installation and the `SIGSYS` reporter (Linux).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};

use crate::{ConfineError, Seccomp, ThreadKind, PROBE_ENV};

/// The exit code of a process a filter stopped: 128 + SIGSYS, as if the signal had killed it.
pub const EXIT_CODE: i32 = 128 + libc::SIGSYS;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

thread_local! {
    /// The calling thread's kind, for the `SIGSYS` reporter (const: no lazy set-up in a handler).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

pub(crate) fn enter(kind: ThreadKind, mode: Seccomp) -> Result<(), ConfineError> {
    KIND.with(|k| k.set(Some(kind)));
    drop_capabilities().map_err(|source| ConfineError::Capabilities {
        kind: kind.name(),
        source,
    })?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ConfineError::NoNewPrivs {
            kind: kind.name(),
            source: io::Error::last_os_error(),
        });
    }
    if mode == Seccomp::Off {
        return Ok(());
    }
    install_reporter();
    let programs = filter_for(kind)?;
    for p in &programs {
        seccompiler::apply_filter(p).map_err(|e| ConfineError::Install {
            kind: kind.name(),
            msg: e.to_string(),
        })?;
    }
    tracing::trace!(kind = kind.name(), "seccomp filter installed");
    if std::env::var(PROBE_ENV).ok().as_deref() == Some(kind.name()) {
        probe();
    }
    Ok(())
}

/// Makes a system call no kind allows (`execve` of a null path: `EFAULT` when unconfined).
pub fn probe() {
    // SAFETY: execve with null pointers touches no memory; it fails with EFAULT or is trapped.
    let r = unsafe { libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize) };
    tracing::error!("seccomp probe: execve was not stopped (returned {r})");
}

/// Drops every capability of this thread: the bounding set (where we may), the ambient set,
/// then the effective, permitted and inheritable sets. A no-op for an unprivileged user.
fn drop_capabilities() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only. EINVAL past the last capability, EPERM
        // without CAP_SETPCAP (then nothing is in the sets below to regain it with anyway).
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
        {
            break;
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a header and two data structs of the v3 layout, both live here.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The BPF programs confining `kind`, in installation order: the soft denials first (calls
/// libraries make in passing that fail harmlessly: `openat` where the kind opens no files,
/// `clone3`, which glibc retries as `clone`), then the allowlist, whose mismatch is fatal.
pub fn filter_for(kind: ThreadKind) -> Result<Vec<BpfProgram>, ConfineError> {
    let arch: TargetArch =
        std::env::consts::ARCH
            .try_into()
            .map_err(|e: seccompiler::BackendError| ConfineError::Build {
                kind: kind.name(),
                msg: e.to_string(),
            })?;
    let build = |rules: Rules, mismatch, matched| -> Result<BpfProgram, ConfineError> {
        SeccompFilter::new(rules, mismatch, matched, arch)
            .and_then(|f| f.try_into())
            .map_err(|e: seccompiler::BackendError| ConfineError::Build {
                kind: kind.name(),
                msg: e.to_string(),
            })
    };
    let mut allowed = allowlist(kind).map_err(|e| ConfineError::Build {
        kind: kind.name(),
        msg: e.to_string(),
    })?;
    // The kernel applies the most severe verdict of all filters (a trap beats an errno), so a
    // soft-denied call is "allowed" by the allowlist and refused by its own filter.
    let mut programs = Vec::new();
    let soft = |nr: i64| -> Rules { [(nr, vec![])].into_iter().collect() };
    programs.push(build(
        soft(libc::SYS_clone3),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?);
    allowed.insert(libc::SYS_clone3, Vec::new());
    if let std::collections::btree_map::Entry::Vacant(e) = allowed.entry(libc::SYS_openat) {
        e.insert(Vec::new());
        programs.push(build(
            soft(libc::SYS_openat),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
        )?);
    }
    programs.push(build(allowed, SeccompAction::Trap, SeccompAction::Allow)?);
    Ok(programs)
}

fn eq(arg: u8, value: u64) -> Result<Cond, seccompiler::BackendError> {
    Cond::new(arg, Len::Dword, Op::Eq, value)
}

fn masked_eq(arg: u8, mask: u64, value: u64) -> Result<Cond, seccompiler::BackendError> {
    Cond::new(arg, Len::Dword, Op::MaskedEq(mask), value)
}

/// Allows each of `nrs` whatever its arguments.
fn allow(rules: &mut Rules, nrs: &[i64]) {
    for &nr in nrs {
        rules.insert(nr, Vec::new());
    }
}

/// Allows `nr` when one of `alternatives` (each a set of conditions that must all hold) holds.
fn allow_when(
    rules: &mut Rules,
    nr: i64,
    alternatives: Vec<Vec<Cond>>,
) -> Result<(), seccompiler::BackendError> {
    let mut v = Vec::new();
    for conds in alternatives {
        v.push(SeccompRule::new(conds)?);
    }
    rules.insert(nr, v);
    Ok(())
}

/// `ioctl` requests of KVM (type 0xAE): the only ioctls a vCPU makes.
fn kvm_ioctls() -> Result<Vec<Cond>, seccompiler::BackendError> {
    Ok(vec![masked_eq(1, 0xff00, 0xae00)?])
}

/// Terminal and socket ioctls a thread doing I/O on our stdio or sockets may make.
const TTY_IOCTLS: &[libc::Ioctl] = &[
    libc::TCGETS,
    libc::TCSETS,
    libc::TCSETSW,
    libc::TCSETSF,
    libc::TIOCGWINSZ,
    libc::FIONBIO,
    libc::FIONREAD,
];

/// `libc::Ioctl` is `c_ulong` with glibc and `c_int` with musl; the kernel compares the
/// request's low 32 bits.
fn ioctls(
    rules: &mut Rules,
    kvm: bool,
    list: &[libc::Ioctl],
) -> Result<(), seccompiler::BackendError> {
    let mut alts = Vec::new();
    if kvm {
        alts.push(kvm_ioctls()?);
    }
    for &req in list {
        alts.push(vec![eq(1, u64::from(req as u32))?]);
    }
    allow_when(rules, libc::SYS_ioctl, alts)
}

/// What every thread does: memory (never executable), futexes, time, its own signals, thread
/// start and exit, logging to stderr.
fn base(exec_mappings: bool) -> Result<Rules, seccompiler::BackendError> {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_gettimeofday,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getrandom,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_epoll_wait,
        ],
    );
    if exec_mappings {
        allow(&mut r, &[libc::SYS_mmap, libc::SYS_mprotect]);
    } else {
        let no_exec = || -> Result<Vec<Vec<Cond>>, seccompiler::BackendError> {
            Ok(vec![vec![masked_eq(2, libc::PROT_EXEC as u64, 0)?]])
        };
        allow_when(&mut r, libc::SYS_mmap, no_exec()?)?;
        allow_when(&mut r, libc::SYS_mprotect, no_exec()?)?;
    }
    allow_when(
        &mut r,
        libc::SYS_prctl,
        vec![
            vec![eq(0, libc::PR_SET_NAME as u64)?],
            vec![eq(0, libc::PR_GET_NAME as u64)?],
        ],
    )?;
    // std checks a descriptor is open before closing it in debug builds.
    allow_when(
        &mut r,
        libc::SYS_fcntl,
        vec![vec![eq(1, libc::F_GETFD as u64)?]],
    )?;
    // Signals to threads of this process only (vCPU kicks, abort).
    allow_when(
        &mut r,
        libc::SYS_tgkill,
        vec![vec![eq(0, std::process::id() as u64)?]],
    )?;
    Ok(r)
}

/// New threads, never new processes: `clone` with CLONE_THREAD.
fn threads(r: &mut Rules) -> Result<(), seccompiler::BackendError> {
    allow_when(
        r,
        libc::SYS_clone,
        vec![vec![masked_eq(
            0,
            libc::CLONE_THREAD as u64,
            libc::CLONE_THREAD as u64,
        )?]],
    )
}

/// Reads and writes on descriptors the thread already holds (eventfds, sockets, pipes).
const STREAM_IO: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_ppoll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
];

/// `socket` only in `families`.
fn sockets(r: &mut Rules, families: &[i32]) -> Result<(), seccompiler::BackendError> {
    let mut alts = Vec::new();
    for &f in families {
        alts.push(vec![eq(0, f as u64)?]);
    }
    allow_when(r, libc::SYS_socket, alts)
}

/// Opens that cannot write or create (what name resolution needs from /etc).
fn read_only_opens(r: &mut Rules) -> Result<(), seccompiler::BackendError> {
    let writes =
        (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
    allow_when(r, libc::SYS_openat, vec![vec![masked_eq(2, writes, 0)?]])
}

/// The file-system calls of our FUSE server, on descriptors beneath its share.
const FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_renameat2,
    libc::SYS_unlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_utimensat,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_lgetxattr,
    libc::SYS_lsetxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_copy_file_range,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_renameat,
    // What std's path functions call on x86_64.
    #[cfg(target_arch = "x86_64")]
    libc::SYS_unlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rmdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_mkdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rename,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_stat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lstat,
];

/// The allowlist of `kind`.
fn allowlist(kind: ThreadKind) -> Result<Rules, seccompiler::BackendError> {
    let mut r = base(kind == ThreadKind::Dns)?;
    match kind {
        ThreadKind::Launcher => {
            // The union of the device workers' lists: a call is unconditional if any worker
            // may make it unconditionally, else any worker's conditions admit it.
            for worker in [ThreadKind::Vsock, ThreadKind::Fs, ThreadKind::Net] {
                for (nr, rules) in allowlist(worker)? {
                    match r.get_mut(&nr) {
                        Some(have) if have.is_empty() => {}
                        Some(have) if !rules.is_empty() => {
                            for rule in rules {
                                if !have.contains(&rule) {
                                    have.push(rule);
                                }
                            }
                        }
                        _ => {
                            r.insert(nr, rules);
                        }
                    }
                }
            }
            threads(&mut r)?;
            // Its threads confine themselves first: capabilities, no-new-privs, filters.
            if let Some(prctl) = r.get_mut(&libc::SYS_prctl) {
                for op in [
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAPBSET_DROP,
                    libc::PR_SET_NO_NEW_PRIVS,
                    libc::PR_SET_SECCOMP,
                ] {
                    prctl.push(SeccompRule::new(vec![eq(0, op as u64)?])?);
                }
            }
            allow(&mut r, &[libc::SYS_capset, libc::SYS_seccomp]);
        }
        ThreadKind::Vcpu => {
            // Reads of eventfds; a device's activation (a register write) makes its worker's
            // eventfd.
            allow(&mut r, &[libc::SYS_read, libc::SYS_eventfd2]);
            ioctls(&mut r, true, &[])?;
        }
        ThreadKind::Events => {
            allow(&mut r, STREAM_IO);
            allow(
                &mut r,
                &[
                    libc::SYS_connect,
                    libc::SYS_unlinkat,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_unlink,
                    libc::SYS_timerfd_create,
                    libc::SYS_timerfd_settime,
                ],
            );
            // Waking and removing a named sandbox's vsock socket at teardown.
            sockets(&mut r, &[libc::AF_UNIX])?;
            ioctls(&mut r, true, TTY_IOCTLS)?;
        }
        ThreadKind::Vsock | ThreadKind::Net => {
            allow(&mut r, STREAM_IO);
            if kind == ThreadKind::Vsock {
                // A guest's connection to a host listener gets a fresh socket pair.
                allow(&mut r, &[libc::SYS_socketpair]);
            }
            ioctls(&mut r, false, &[libc::FIONBIO, libc::FIONREAD])?;
        }
        ThreadKind::VsockListener => {
            allow(&mut r, STREAM_IO);
            allow(
                &mut r,
                &[
                    libc::SYS_accept4,
                    libc::SYS_socketpair,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockopt,
                ],
            );
            threads(&mut r)?;
            ioctls(&mut r, false, &[libc::FIONBIO, libc::FIONREAD])?;
        }
        ThreadKind::Fs => {
            allow(&mut r, FILES);
            ioctls(&mut r, false, &[libc::FIONBIO, libc::FIONREAD])?;
        }
        ThreadKind::Netstack => {
            allow(&mut r, STREAM_IO);
            allow(
                &mut r,
                &[
                    libc::SYS_connect,
                    libc::SYS_bind,
                    libc::SYS_listen,
                    libc::SYS_accept4,
                    libc::SYS_getsockopt,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockname,
                    libc::SYS_getpeername,
                    libc::SYS_sendmmsg,
                    libc::SYS_recvmmsg,
                ],
            );
            sockets(&mut r, &[libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK])?;
            ioctls(&mut r, false, &[libc::FIONBIO, libc::FIONREAD])?;
        }
        ThreadKind::Dns => {
            allow(&mut r, STREAM_IO);
            allow(
                &mut r,
                &[
                    libc::SYS_connect,
                    libc::SYS_bind,
                    libc::SYS_getsockname,
                    libc::SYS_getpeername,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockopt,
                    libc::SYS_sendmmsg,
                    libc::SYS_recvmmsg,
                    libc::SYS_pread64,
                    libc::SYS_lseek,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    libc::SYS_uname,
                ],
            );
            read_only_opens(&mut r)?;
            sockets(
                &mut r,
                &[
                    libc::AF_INET,
                    libc::AF_INET6,
                    libc::AF_UNIX,
                    libc::AF_NETLINK,
                ],
            )?;
            ioctls(&mut r, false, &[libc::FIONBIO, libc::FIONREAD])?;
        }
        ThreadKind::Control => {
            allow(&mut r, STREAM_IO);
            allow(&mut r, FILES);
            allow(
                &mut r,
                &[
                    libc::SYS_connect,
                    libc::SYS_socketpair,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockopt,
                    libc::SYS_rt_sigtimedwait,
                    libc::SYS_timerfd_settime,
                    // A named sandbox's control socket (`msb-vmm stats`, `policy`), and the
                    // stats it answers with: guest memory resident (mincore), the threads'
                    // CPU clocks, /proc.
                    libc::SYS_bind,
                    libc::SYS_listen,
                    libc::SYS_accept4,
                    libc::SYS_mincore,
                    // Snapshots (`msb-vmm snapshot`): the directory, files renamed into
                    // place, the shares' node paths.
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_mkdir,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_rename,
                    #[cfg(target_arch = "x86_64")]
                    libc::SYS_readlink,
                ],
            );
            sockets(&mut r, &[libc::AF_UNIX])?;
            ioctls(&mut r, true, TTY_IOCTLS)?;
            // Threads, and the one helper process `msb_vmm::host::exit_detaching_teardown`
            // starts (it shares our memory and filters, closes descriptors and waits).
            let helper = (libc::CLONE_VM | libc::CLONE_UNTRACED | libc::SIGCHLD) as u64;
            allow_when(
                &mut r,
                libc::SYS_clone,
                vec![
                    vec![masked_eq(
                        0,
                        libc::CLONE_THREAD as u64,
                        libc::CLONE_THREAD as u64,
                    )?],
                    vec![eq(0, helper)?],
                ],
            )?;
            allow(&mut r, &[libc::SYS_pipe2]);
        }
    }
    Ok(r)
}

/// Installs the `SIGSYS` handler once per process.
fn install_reporter() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value (no handler, empty mask, no flags).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: sigaction copies the struct we pass; the handler is async-signal-safe.
        unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) };
    });
}

/// A fixed buffer for the report: no allocation in a signal handler.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Reports the forbidden call and ends the process. Async-signal-safe: it only formats into a
/// stack buffer and calls `prctl(PR_GET_NAME)`, `write` and `exit_group`, which every filter
/// allows.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // One report per process: a second thread stopped meanwhile waits for the first one's
    // exit_group rather than print a second line (or end the process before the first).
    static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if REPORTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        loop {
            std::hint::spin_loop();
        }
    }
    // SIGSYS's siginfo: si_signo, si_errno, si_code (3 ints, padded to 16 bytes), then
    // { void *call_addr; int syscall; unsigned arch; }.
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; the offset is the
    // uapi layout of the SIGSYS fields on 64-bit targets.
    let field = (info as *const u8).wrapping_add(16 + 8).cast::<i32>();
    // SAFETY: see above: a readable, aligned i32 inside the kernel-provided siginfo.
    let nr = unsafe { field.read() } as i64;
    let mut comm = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer we pass.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr(), 0, 0, 0) };
    let comm_len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    let kind = KIND.with(|k| k.get()).map(ThreadKind::name).unwrap_or("?");
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    line.push(b"msb-vmm: seccomp stopped the VMM: thread '");
    line.push(&comm[..comm_len]);
    line.push(b"' (");
    line.push(kind.as_bytes());
    line.push(b" filter) made the forbidden system call ");
    line.push(crate::syscall_name(nr).unwrap_or("?").as_bytes());
    line.push(b" (");
    line.push_num(nr as u64);
    line.push(
        b"); a guest attack or a msb-vmm bug (report it); --no-seccomp runs without filters\n",
    );
    // SAFETY: writes our own buffer, of its filled length, to stderr (async-signal-safe).
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    // SAFETY: exit_group takes an integer and ends the process.
    unsafe { libc::syscall(libc::SYS_exit_group, EXIT_CODE) };
}
