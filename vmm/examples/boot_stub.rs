//! Boots the tier-2 stub guest (writes the boot timer, resets) with `VmBuilder` and prints the
//! boot time. Runs on any /dev/kvm, PVM included:
//! `cargo run --release --example boot_stub`.

use msb_vmm::vm::{GuestExit, VmBuilder};

fn main() {
    let outcome = VmBuilder::new(msb_test_guests::stub())
        .cpus(1)
        .memory_mib(128)
        .run()
        .unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(125)
        });
    assert_eq!(outcome.exit, GuestExit::PowerOff);
    println!(
        "boot timer after {:?} since process start",
        outcome.boot_time.unwrap_or_default()
    );
}
