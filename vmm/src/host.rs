//! Facts about the host that decide what can run here.

/// Whether /dev/kvm is PVM (software nested virtualization): it runs tiny guests but a stock
/// Linux kernel takes minutes to boot and dies on its first syscall. `MSB_HOST_PVM=1` or `=0`
/// overrides the detection (to test the refusal path on any host).
pub fn is_pvm() -> bool {
    match std::env::var("MSB_HOST_PVM").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => std::path::Path::new("/sys/module/kvm_pvm").exists(),
    }
}

/// Exits the process with `code` without waiting for the kernel to destroy a VM kept alive by
/// [`crate::vm::VmBuilder::defer_teardown_to_exit`].
///
/// A KVM VM is destroyed when its last fd closes, and the mm that KVM registered an MMU notifier
/// on is torn down at exit; both wait for an RCU grace period (10-20 ms on some hosts), which
/// would otherwise sit between the guest powering off and our parent seeing us exit. A helper
/// process sharing our address space and holding copies of our fds takes that work: it closes
/// its copies of stdin/stdout/stderr at once (readers of our output see EOF when we exit),
/// waits for us to be gone, then exits, releasing the VM. Call only with no other threads left
/// running; stdout and stderr are flushed first.
pub fn exit_detaching_teardown(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if let Err(e) = spawn_teardown_helper() {
        tracing::debug!("teardown helper: {e}; destroying the VM on exit");
    }
    // SAFETY: _exit ends the process immediately; nothing after it runs.
    unsafe { libc::_exit(code) }
}

/// Size of the helper's stack; it only makes a few raw system calls.
const HELPER_STACK: usize = 64 * 1024;

fn spawn_teardown_helper() -> std::io::Result<()> {
    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an anonymous private mapping for the helper's stack; checked below. It is never
    // unmapped: the helper uses it until it exits, after we are gone.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            HELPER_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // Both pipe fds travel in the argument; the helper closes the write end and waits on the
    // read end until our copy of the write end closes with our exit.
    let arg = (pipe[0] as usize) | ((pipe[1] as usize) << 32);
    // SAFETY: HELPER_STACK is the mapping's length, so this is its one-past-the-end address.
    let stack_top = unsafe { (stack as *mut u8).add(HELPER_STACK) };
    // SAFETY: the stack top is the end of the mapping, 16-byte aligned; the helper shares our
    // memory (CLONE_VM) but only runs `teardown_helper`, which makes raw system calls and
    // touches no Rust runtime state. It exits after us, so SIGCHLD reaches its new parent.
    let pid = unsafe {
        libc::clone(
            teardown_helper,
            stack_top.cast(),
            libc::CLONE_VM | libc::CLONE_UNTRACED | libc::SIGCHLD,
            arg as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A one-argument system call made directly, without Rust's runtime: the helper shares memory
/// with the exiting parent and must not take its locks or allocate. (glibc may store errno in
/// the parent's thread-local area on failure, which nothing reads any more.)
fn raw_syscall1(nr: libc::c_long, a: libc::c_long) -> libc::c_long {
    // SAFETY: callers pass system calls whose single argument is an integer (close, exit).
    unsafe { libc::syscall(nr, a) }
}

extern "C" fn teardown_helper(arg: *mut libc::c_void) -> libc::c_int {
    let arg = arg as usize;
    let (read_end, write_end) = (
        (arg & 0xffff_ffff) as libc::c_long,
        (arg >> 32) as libc::c_long,
    );
    for fd in [0, 1, 2, write_end] {
        raw_syscall1(libc::SYS_close, fd);
    }
    // Returns 0 once the parent is gone. Bounded: a failing read (it cannot, short of a bug)
    // must not spin forever.
    let mut byte = 0u8;
    for _ in 0..1000 {
        // SAFETY: reads at most one byte into a valid local.
        if unsafe { libc::syscall(libc::SYS_read, read_end, &mut byte as *mut u8, 1) } >= 0 {
            break;
        }
    }
    raw_syscall1(libc::SYS_exit, 0);
    0
}
