//! Assembles and links each guest in guests/*.S into an ELF with GNU as/ld (through gcc), and,
//! when the tests are built for arm64, each guest in guests/aarch64/*.S into a flat binary
//! (with the cross toolchain on other hosts).

use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &[
    "pvh_boot",
    "linux64_boot",
    "smp",
    "fault",
    "stub",
    "hang",
    "count",
    "tick",
];
const AARCH64_GUESTS: &[&str] = &["timer"];

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
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("aarch64") {
        aarch64(&dir.join("aarch64"), &out);
    }
}

/// The arm64 guests: position-independent code, loaded at the start of guest RAM as is.
fn aarch64(dir: &std::path::Path, out: &std::path::Path) {
    let native = cfg!(target_arch = "aarch64");
    let tool = |name: &str, var: &str| {
        std::env::var(var).unwrap_or_else(|_| {
            if native {
                name.to_string()
            } else {
                format!("aarch64-linux-gnu-{name}")
            }
        })
    };
    let (cc, objcopy) = (
        tool("gcc", "MSB_GUEST_CC_AARCH64"),
        tool("objcopy", "MSB_GUEST_OBJCOPY_AARCH64"),
    );
    let run = |cmd: &mut Command, what: &str| {
        match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{what} failed ({s}); see the messages above"),
        Err(e) => panic!("{what}: {e}; arm64 test guests need `apt-get install gcc-aarch64-linux-gnu` on other hosts"),
    }
    };
    for g in AARCH64_GUESTS {
        let elf = out.join(format!("aarch64_{g}.elf"));
        let bin = out.join(format!("aarch64_{g}.bin"));
        run(
            Command::new(&cc)
                .args([
                    "-nostdlib",
                    "-static",
                    "-Wl,-Ttext=0x40000000",
                    "-Wl,--build-id=none",
                ])
                .arg("-o")
                .arg(&elf)
                .arg(dir.join(format!("{g}.S"))),
            &format!("assembling arm64 test guest {g} with {cc}"),
        );
        run(
            Command::new(&objcopy)
                .args(["-O", "binary"])
                .arg(&elf)
                .arg(&bin),
            &format!("{objcopy} -O binary for {g}"),
        );
    }
}
