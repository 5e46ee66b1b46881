//! msb-init: PID 1 of every msb-vmm guest.
//!
//! It mounts the basic file systems, brings up loopback, signals "boot complete" to the VMM's
//! boot timer, runs the workload described on the kernel command line, forwards its output and
//! exit status over the control port, and powers the VM off. Linux only: it is built for
//! `x86_64-unknown-linux-musl` as a static binary.

#[cfg(target_os = "linux")]
mod pid1;

#[cfg(target_os = "linux")]
fn main() {
    pid1::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("msb-init runs only as PID 1 inside a Linux guest");
    std::process::exit(2);
}
