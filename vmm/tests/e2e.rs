//! Test tier 4: the real guest kernel and msb-init under `msb-vmm`, end to end.
//!
//! Built only with `--features e2e`. They need a /dev/kvm that boots stock Linux: on hosts
//! with hardware virtualization they run directly; on PVM hosts `./x test` runs this binary
//! inside the L2 VM. Asked to run where they cannot, they fail with the reason.

use std::process::{Command, Output};
use std::sync::Once;
use std::time::Duration;

use msb_vmm::sandbox::{ExitStatus, Sandbox, SandboxError};

fn check_host() {
    static CHECK: Once = Once::new();
    CHECK.call_once(|| {
        if msb_vmm::host::is_pvm() {
            panic!("end-to-end tests boot the real kernel, which this PVM /dev/kvm cannot run; use `./x test`, which runs them inside the L2 VM");
        }
        if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
            panic!("end-to-end tests need /dev/kvm (read/write); use `./x test` on hosts without it");
        }
        let kernel = msb_vmm::assets::default_kernel();
        if !kernel.exists() {
            panic!("no guest kernel at {}: run `./x setup` first", kernel.display());
        }
    });
}

fn msb_vmm(args: &[&str]) -> Output {
    check_host();
    Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
        .args(args)
        .output()
        .expect("msb-vmm runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn command_output_and_exit_code() {
    let out = msb_vmm(&[
        "run",
        "--",
        "sh",
        "-c",
        "echo hello from the guest; echo to stderr >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from the guest\n");
    assert_eq!(text(&out.stderr), "to stderr\n");
}

#[test]
fn signal_exit_is_128_plus_signal() {
    let out = msb_vmm(&["run", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(
        out.status.code(),
        Some(128 + 15),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn nproc_matches_cpus_and_memtotal_matches_memory() {
    let out = msb_vmm(&[
        "run",
        "--cpus",
        "3",
        "--memory",
        "200",
        "--",
        "sh",
        "-c",
        "nproc; grep MemTotal /proc/meminfo",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("3"));
    let kib: u64 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    // MemTotal is RAM minus what the kernel reserves for itself: within 25% of --memory.
    let mib = kib / 1024;
    assert!(
        (150..=200).contains(&mib),
        "MemTotal {mib} MiB for --memory 200"
    );
}

#[test]
fn arguments_environment_and_workdir_survive_any_bytes() {
    let arg = "quotes ' \" and $dollar `tick` \\ back\nnew line";
    let out = msb_vmm(&[
        "run",
        "--env",
        "GREETING=a b=c ' \"",
        "--workdir",
        "/tmp",
        "--",
        "sh",
        "-c",
        "printf '%s|%s|%s' \"$1\" \"$GREETING\" \"$(pwd)\"",
        "sh",
        arg,
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{arg}|a b=c ' \"|/tmp"));
}

#[test]
fn missing_command_is_127_with_a_message() {
    let out = msb_vmm(&["run", "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("no-such-command: command not found"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn timeout_is_honoured() {
    let out = msb_vmm(&["run", "--timeout", "3", "--", "sleep", "1000"]);
    assert_eq!(out.status.code(), Some(124));
    assert!(
        text(&out.stderr).contains("timed out after 3 s"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn kernel_panic_exits_nonzero_with_console_lines() {
    let kernel = msb_vmm_kernel();
    let out = msb_vmm(&[
        "boot",
        "--kernel",
        &kernel,
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 init=/nonexistent",
    ]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("the guest kernel panicked"), "{err}");
    assert!(
        err.contains("Kernel panic - not syncing"),
        "console tail missing: {err}"
    );
}

fn msb_vmm_kernel() -> String {
    msb_vmm::assets::default_kernel()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn boot_timer_is_reported() {
    let report = std::env::temp_dir().join(format!("msb-e2e-report-{}.json", std::process::id()));
    let out = msb_vmm(&["run", "--report", report.to_str().unwrap(), "--", "true"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    std::fs::remove_file(&report).unwrap();
    assert!(r["boot_time_us"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["exit_code"], 0);
}

#[test]
fn library_api_captures_output() {
    check_host();
    let out = Sandbox::command(["sh", "-c", "echo out; echo err >&2; exit 3"])
        .cpus(2)
        .output()
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert!(out.boot_time.is_some());
    let e = Sandbox::command(["sleep", "100"])
        .timeout(Some(Duration::from_secs(2)))
        .output()
        .unwrap_err();
    assert!(matches!(e, SandboxError::Timeout { .. }), "{e}");
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn twenty_boots_in_one_process_leak_nothing() {
    check_host();
    // This test runs alone in its own process when run by `./x test` (--test-threads applies
    // to the others); it still tolerates a few fds/threads from tests running beside it.
    Sandbox::command(["true"]).output().unwrap();
    let (fds, threads) = (count("/proc/self/fd"), count("/proc/self/task"));
    for i in 0..20 {
        let out = Sandbox::command(["sh", "-c", &format!("echo {i}")])
            .output()
            .unwrap();
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
        assert_eq!(out.status, ExitStatus::Code(0));
    }
    let (fds_after, threads_after) = (count("/proc/self/fd"), count("/proc/self/task"));
    assert!(fds_after <= fds + 8, "fds {fds} -> {fds_after}");
    assert!(
        threads_after <= threads + 6,
        "threads {threads} -> {threads_after}"
    );
}

#[test]
fn background_processes_do_not_keep_the_sandbox_alive() {
    // A writer that never stops and a sleeper that holds the pipes: the main process's exit
    // ends the sandbox after a short drain.
    let out = msb_vmm(&[
        "run",
        "--timeout",
        "120",
        "--",
        "sh",
        "-c",
        "yes & sleep 1000 & sleep 0.2; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("y\n") && stdout.lines().all(|l| l == "y" || l.is_empty()),
        "{:?}",
        &stdout[..stdout.len().min(100)]
    );
}
