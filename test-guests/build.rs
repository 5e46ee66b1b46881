//! Assembles and links each guest in guests/*.S into an ELF with GNU as/ld (through gcc).

use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &["pvh_boot", "linux64_boot", "smp", "fault", "stub", "hang"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
        .join("guests");
    println!("cargo:rerun-if-changed=guests");
    let cc = std::env::var("MSB_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    for g in GUESTS {
        let src = dir.join(format!("{g}.S"));
        let elf = out.join(format!("{g}.elf"));
        let status = Command::new(&cc)
            .args([
                "-nostdlib",
                "-static",
                "-no-pie",
                "-fno-pic",
                "-Wl,--build-id=none",
                "-Wl,-z,noexecstack",
                "-Wl,--no-warn-rwx-segments",
            ])
            .arg(format!("-Wl,-T,{}", dir.join("guest.ld").display()))
            .arg(format!("-I{}", dir.display()))
            .arg("-o")
            .arg(&elf)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("assembling test guest {g} failed ({s}); see the assembler messages above"),
            Err(e) => panic!("test guests need gcc and binutils to assemble ({cc}: {e}); install them with `apt-get install gcc`"),
        }
    }
}
