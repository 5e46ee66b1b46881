//! Runs a command in a fresh sandbox and exits with its status:
//! `cargo run --release --example run_command -- sh -c 'echo hi; exit 3'`.
//! Needs the default assets (`./x setup`) and a /dev/kvm that boots Linux guests.

use msb_vmm::sandbox::Sandbox;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        eprintln!("usage: run_command CMD [ARGS]...");
        std::process::exit(2);
    }
    match Sandbox::command(&argv).cpus(1).memory_mib(128).status() {
        Ok(out) => {
            eprintln!("boot took {:?}; exit {:?}", out.boot_time, out.status);
            std::process::exit(out.status.shell_code());
        }
        Err(e) => {
            eprintln!("error: {e}");
            for line in e.console_tail() {
                eprintln!("  | {line}");
            }
            std::process::exit(125);
        }
    }
}
