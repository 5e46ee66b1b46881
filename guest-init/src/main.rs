//! msb-init: PID 1 of every msb-vmm guest, and its agent.
//!
//! As PID 1 it mounts the basic file systems, brings up loopback, starts the agent on vsock
//! port `msb_init::agent::AGENT_PORT`, signals "boot complete" to the VMM's boot timer and
//! serves the host's requests until asked to power off. `msb-init agent --listen PATH` runs the
//! same agent as an ordinary process on a Unix socket (tests and benchmarks on the host).
//! Linux only: it is built for `x86_64-unknown-linux-musl` as a static binary.

#[cfg(target_os = "linux")]
mod agent_server;
#[cfg(target_os = "linux")]
mod net;
#[cfg(target_os = "linux")]
mod oom;
mod pid1;
#[cfg(target_os = "linux")]
mod sys;

#[cfg(target_os = "linux")]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("agent") => match (args.get(2).map(String::as_str), args.get(3)) {
            (Some("--listen"), Some(path)) if args.len() == 4 => {
                if let Err(e) = agent_server::serve_unix(std::path::Path::new(path)) {
                    eprintln!("msb-init: agent on {path}: {e}");
                    std::process::exit(1);
                }
            }
            _ => {
                eprintln!("usage: msb-init agent --listen PATH");
                std::process::exit(2);
            }
        },
        Some("--version") => println!(
            "msb-init {} (protocol {})",
            env!("CARGO_PKG_VERSION"),
            msb_init::PROTOCOL_VERSION
        ),
        Some(other) if std::process::id() != 1 => {
            eprintln!("msb-init: unknown argument '{other}' (usage: msb-init agent --listen PATH)");
            std::process::exit(2);
        }
        _ => pid1::main(),
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("msb-init runs only as PID 1 inside a Linux guest");
    std::process::exit(2);
}
