//! Test tier 4: the real guest kernel and msb-init under `msb-vmm`, end to end.
//!
//! Built only with `--features e2e`. They need a /dev/kvm that boots stock Linux: on hosts
//! with hardware virtualization they run directly; on PVM hosts `./x test` runs this binary
//! inside the L2 VM. Asked to run where they cannot, they fail with the reason.

use std::path::Path;
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

/// Turns a hung test into a failure: CI gets one clear line and a process listing instead of
/// a run that never ends. Generous, since the L2 VM emulates the CPU.
struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.take();
    }
}

fn watchdog(test: &'static str) -> Watchdog {
    // A test sharing the emulated CPUs with the Debian-root tests can take minutes.
    watchdog_for(test, Duration::from_secs(540))
}

/// A watchdog with its own limit, for the tests that do the most work in the emulated CPU
/// (below `./x test`'s 960 s without output from the L2 run, which it treats as a wedge).
fn watchdog_for(test: &'static str, limit: Duration) -> Watchdog {
    assert!(
        limit < Duration::from_secs(960),
        "a watchdog must fire first"
    );
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!(
                "e2e test {test} hung for {} s; aborting the run",
                limit.as_secs()
            );
            let _ = Command::new("ps")
                .args(["-eo", "pid,ppid,stat,etime,args"])
                .status();
            std::process::abort();
        }
    });
    Watchdog(Some(tx))
}

/// `msb-vmm ARGS` on the small initramfs root: most tests exercise the VMM and the agent, and
/// the busybox root boots fastest in the emulated L2 VM. The Debian root has its own tests.
fn msb_vmm(args: &[&str]) -> Output {
    check_host();
    Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
        .args(args)
        .env("MSB_ROOTFS", "initramfs")
        .output()
        .expect("msb-vmm runs")
}

/// `msb-vmm ARGS` with the default root (the Debian tree `./x setup` builds).
fn msb_vmm_default_root(args: &[&str]) -> Output {
    check_host();
    if let msb_vmm::assets::DefaultRoot::Dir(d) = msb_vmm::assets::default_root() {
        assert!(
            d.is_dir(),
            "no default root file system at {}: run `./x setup` first",
            d.display()
        );
    }
    Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
        .args(args)
        .env_remove("MSB_ROOTFS")
        .output()
        .expect("msb-vmm runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn command_output_and_exit_code() {
    let _w = watchdog("command_output_and_exit_code");
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
    let _w = watchdog("signal_exit_is_128_plus_signal");
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
    let _w = watchdog("nproc_matches_cpus_and_memtotal_matches_memory");
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
    let _w = watchdog("arguments_environment_and_workdir_survive_any_bytes");
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

/// A command the guest's OOM killer ends exits 137 with one line naming the cause and the fix;
/// a command killed otherwise gets no such line.
#[test]
fn an_oom_kill_is_named_with_its_fix() {
    let _w = watchdog("an_oom_kill_is_named_with_its_fix");
    // One buffer of all the guest's memory but 2 MiB: allowed (the kernel overcommits up to
    // its total), and more than is free once touched.
    let out = msb_vmm(&[
        "run",
        "--cold",
        "--memory",
        "128",
        "--",
        "sh",
        "-c",
        "set -- $(grep MemTotal /proc/meminfo); \
         dd if=/dev/zero of=/dev/null bs=$((($2 - 2048) * 1024)) count=1",
    ]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains(
            "the sandbox ran out of memory and its OOM killer ended the command (it has 128 MiB): give it more with --memory MIB"
        ),
        "stderr: {}",
        text(&out.stderr)
    );
    let out = msb_vmm(&[
        "run",
        "--cold",
        "--memory",
        "128",
        "--",
        "sh",
        "-c",
        "kill -9 $$",
    ]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(!text(&out.stderr).contains("OOM"), "{}", text(&out.stderr));
}

#[test]
fn missing_command_is_127_with_a_message() {
    let _w = watchdog("missing_command_is_127_with_a_message");
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
    let _w = watchdog("timeout_is_honoured");
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
    let _w = watchdog("kernel_panic_exits_nonzero_with_console_lines");
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
    let _w = watchdog("boot_timer_is_reported");
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
    let _w = watchdog("library_api_captures_output");
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
    let _w = watchdog("twenty_boots_in_one_process_leak_nothing");
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
    let _w = watchdog("background_processes_do_not_keep_the_sandbox_alive");
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

fn sandbox() -> msb_vmm::sandbox::Sandbox {
    check_host();
    msb_vmm::sandbox::Sandbox::builder()
        .cpus(2)
        .memory_mib(256)
        .start()
        .expect("sandbox starts")
}

#[test]
fn thirty_two_concurrent_execs_in_one_sandbox() {
    let _w = watchdog("thirty_two_concurrent_execs_in_one_sandbox");
    let sb = std::sync::Arc::new(sandbox());
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let sb = sb.clone();
            std::thread::spawn(move || {
                sb.output(["sh", "-c", &format!("echo {i}; exit {}", i % 7)])
                    .unwrap()
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let out = t.join().unwrap();
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
        assert_eq!(out.status, ExitStatus::Code(i as i32 % 7));
    }
}

#[test]
fn output_checksummed_end_to_end_and_files_round_trip() {
    let _w = watchdog("output_checksummed_end_to_end_and_files_round_trip");
    use sha2::{Digest, Sha256};
    let sb = sandbox();
    // Bulk volume is covered by the host-transport tier (1 GiB); here 16 MiB (many times the
    // vsock buffers) proves the path keeps every byte in order. More only costs minutes of
    // emulated CPU in the L2 VM.
    let script = "{ head -c 16777216 /dev/urandom | tee /dev/fd/3 | sha256sum >&2; } 3>&1";
    let out = sb.output(["sh", "-c", script]).unwrap();
    assert_eq!(out.stdout.len(), 16 << 20);
    let digest: String = Sha256::digest(&out.stdout)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .split_whitespace()
            .next(),
        Some(digest.as_str())
    );
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 24) as u8)
        .collect();
    sb.write_file("/tmp/deep/dir/data.bin", &data, 0o600)
        .unwrap();
    let sum = sb.output(["sha256sum", "/tmp/deep/dir/data.bin"]).unwrap();
    let want: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(String::from_utf8_lossy(&sum.stdout).starts_with(&want));
    assert!(
        sb.read_file("/tmp/deep/dir/data.bin").unwrap() == data,
        "file changed on the way back"
    );
    let st = sb.agent().stat(b"/tmp/deep/dir/data.bin").unwrap();
    assert_eq!((st.mode, st.size), (0o600, data.len() as u64));
}

#[test]
fn stdin_is_forwarded() {
    let _w = watchdog("stdin_is_forwarded");
    check_host();
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
        .args(["run", "--", "sh", "-c", "cat; echo done >&2"])
        .env("MSB_ROOTFS", "initramfs")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&data).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        out.stdout == input,
        "stdin came back altered ({} bytes)",
        out.stdout.len()
    );
    assert_eq!(text(&out.stderr), "done\n");
}

#[test]
fn pty_exec_sees_a_terminal_and_resizes() {
    let _w = watchdog("pty_exec_sees_a_terminal_and_resizes");
    use msb_vmm::sandbox::{ExecEvent, TermSize};
    let sb = sandbox();
    let mut req = msb_vmm::sandbox::request(["sh", "-c", "tty; stty size; read x; stty size"]);
    req.pty = Some(TermSize { rows: 20, cols: 70 });
    req.stdin = true;
    let mut h = sb.exec(req).unwrap();
    let mut acc = String::new();
    let wait_for = |h: &mut msb_vmm::sandbox::ExecHandle, needle: &str, acc: &mut String| {
        while !acc.contains(needle) {
            match h.next_event().unwrap() {
                Some(ExecEvent::Stdout(d)) => acc.push_str(&String::from_utf8_lossy(&d)),
                Some(ExecEvent::Exited { status, .. }) => {
                    panic!("exited {status:?}; output {acc:?}")
                }
                Some(_) => {}
                None => panic!("ended; output {acc:?}"),
            }
        }
    };
    wait_for(&mut h, "20 70", &mut acc);
    assert!(acc.starts_with("/dev/pts/"), "{acc:?}");
    h.resize(TermSize { rows: 33, cols: 99 }).unwrap();
    h.write_stdin(b"\n").unwrap();
    wait_for(&mut h, "33 99", &mut acc);
    assert_eq!(h.wait().unwrap(), ExitStatus::Code(0));
}

#[test]
fn ctrl_c_reaches_the_command() {
    let _w = watchdog("ctrl_c_reaches_the_command");
    check_host();
    let mut child = Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
        .args(["run", "--", "sh", "-c", "echo started; exec sleep 1000"])
        .env("MSB_ROOTFS", "initramfs")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut line = [0u8; 8];
    use std::io::Read;
    stdout.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"started\n");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
}

fn state_dir() -> std::path::PathBuf {
    // On tmpfs: Unix sockets cannot be bound on the 9p file system the L2 VM shares /tmp over.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("msb-e2e-state-{}", std::process::id()))
}

/// `msb-vmm` with a test state directory, under umask 002 (a shared-group setup, where
/// files following the umask would be open to the group).
fn msb_vmm_state(args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    check_host();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_msb-vmm"));
    cmd.args(args)
        .env("MSB_STATE_DIR", state_dir())
        .env("MSB_ROOTFS", "initramfs");
    let hook = || -> std::io::Result<()> {
        // SAFETY: umask cannot fail and changes only this (child) process's mask.
        unsafe { libc::umask(0o002) };
        Ok(())
    };
    // SAFETY: the hook only calls umask, which is async-signal-safe.
    unsafe { cmd.pre_exec(hook) };
    cmd.output().expect("msb-vmm runs")
}

#[test]
fn long_running_sandbox_start_exec_cp_ls_stop() {
    let _w = watchdog("long_running_sandbox_start_exec_cp_ls_stop");
    let out = msb_vmm_state(&[
        "start",
        "--name",
        "box1",
        "--cpus",
        "2",
        "--tmpfs",
        "/small:1m",
    ]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    // The owner's only, whatever the umask: the socket runs commands as root in the guest.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = state_dir().join("box1");
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    for f in [
        "vsock.sock",
        "control.sock",
        "log",
        "pid",
        "info.json",
        "ready",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let again = msb_vmm_state(&["start", "--name", "box1"]);
    assert_eq!(again.status.code(), Some(125));
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
    let ls = msb_vmm_state(&["ls"]);
    assert!(
        text(&ls.stdout).contains("box1") && text(&ls.stdout).contains("running"),
        "{}",
        text(&ls.stdout)
    );

    let e = msb_vmm_state(&[
        "exec",
        "box1",
        "--",
        "sh",
        "-c",
        "hostname; nproc; echo x > /tmp/state",
    ]);
    assert_eq!(text(&e.stdout), "box1\n2\n", "stderr: {}", text(&e.stderr));
    // State persists between execs in a long-running sandbox.
    let e = msb_vmm_state(&["exec", "box1", "--", "cat", "/tmp/state"]);
    assert_eq!(text(&e.stdout), "x\n");
    // Paused: `ls` says so, exec and cp are refused naming the fix, stats still answers.
    // Resumed, the same guest carries on with its agent connection.
    let p = msb_vmm_state(&["pause", "box1"]);
    assert!(p.status.success(), "pause: {}", text(&p.stderr));
    let ls = text(&msb_vmm_state(&["ls"]).stdout);
    assert!(ls.contains("paused (pid"), "{ls}");
    let refused = msb_vmm_state(&["exec", "box1", "--", "true"]);
    assert_eq!(refused.status.code(), Some(125));
    assert!(
        text(&refused.stderr).contains("`msb-vmm resume box1`"),
        "{}",
        text(&refused.stderr)
    );
    let refused = msb_vmm_state(&["cp", "box1:/tmp/state", "/dev/null"]);
    assert_eq!(
        refused.status.code(),
        Some(125),
        "{}",
        text(&refused.stderr)
    );
    let st = msb_vmm_state(&["stats", "box1", "--json"]);
    assert!(st.status.success(), "stats: {}", text(&st.stderr));
    let r = msb_vmm_state(&["resume", "box1"]);
    assert!(r.status.success(), "resume: {}", text(&r.stderr));
    assert!(text(&msb_vmm_state(&["ls"]).stdout).contains("running (pid"));
    let e = msb_vmm_state(&["exec", "box1", "--", "cat", "/tmp/state"]);
    assert_eq!(text(&e.stdout), "x\n", "after resume: {}", text(&e.stderr));
    assert_eq!(
        msb_vmm_state(&["exec", "box1", "--", "sh", "-c", "exit 9"])
            .status
            .code(),
        Some(9)
    );

    let local = state_dir().join("payload.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let cp = msb_vmm_state(&["cp", local.to_str().unwrap(), "box1:/tmp/"]);
    assert!(cp.status.success(), "cp in: {}", text(&cp.stderr));
    let back = state_dir().join("back.bin");
    let cp = msb_vmm_state(&["cp", "box1:/tmp/payload.bin", back.to_str().unwrap()]);
    assert!(cp.status.success(), "cp out: {}", text(&cp.stderr));
    assert!(std::fs::read(&back).unwrap() == data);
    // The default memory leaves /tmp room for a 64 MiB file.
    let big = state_dir().join("big.bin");
    std::fs::write(&big, vec![0x5a; 64 << 20]).unwrap();
    let cp = msb_vmm_state(&["cp", big.to_str().unwrap(), "box1:/tmp/big.bin"]);
    assert!(cp.status.success(), "cp 64 MiB: {}", text(&cp.stderr));
    let size = msb_vmm_state(&["exec", "box1", "--", "stat", "-c", "%s", "/tmp/big.bin"]);
    assert_eq!(text(&size.stdout), format!("{}\n", 64 << 20));
    // A copy that does not fit fails and leaves the target as it was, and nothing beside it.
    let e = msb_vmm_state(&["exec", "box1", "--", "sh", "-c", "echo old > /small/keep"]);
    assert!(e.status.success());
    let over = state_dir().join("over.bin");
    std::fs::write(&over, vec![1u8; 2 << 20]).unwrap();
    let cp = msb_vmm_state(&["cp", over.to_str().unwrap(), "box1:/small/keep"]);
    assert_eq!(cp.status.code(), Some(125), "{}", text(&cp.stderr));
    let e = msb_vmm_state(&[
        "exec",
        "box1",
        "--",
        "sh",
        "-c",
        "ls -A /small; head -c 8 /small/keep",
    ]);
    assert_eq!(text(&e.stdout), "keep\nold\n", "{}", text(&e.stderr));
    let missing = msb_vmm_state(&["cp", "box1:/no/such/file", back.to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(125));
    assert_eq!(
        text(&missing.stderr).lines().count(),
        1,
        "{}",
        text(&missing.stderr)
    );

    let stop = msb_vmm_state(&["stop", "box1"]);
    assert!(stop.status.success(), "stop: {}", text(&stop.stderr));
    assert!(!text(&msb_vmm_state(&["ls"]).stdout).contains("box1"));
    let gone = msb_vmm_state(&["exec", "box1", "--", "true"]);
    assert_eq!(gone.status.code(), Some(125));
    assert!(
        text(&gone.stderr).contains("no sandbox named box1"),
        "{}",
        text(&gone.stderr)
    );
    let bad = msb_vmm_state(&["start", "--name", "Bad Name"]);
    assert!(
        text(&bad.stderr).contains("invalid sandbox name"),
        "{}",
        text(&bad.stderr)
    );
    // Only this test's own files: other tests' sandboxes live in the same state directory
    // and may still be running (removing it all once stopped the limits test's sandboxes).
    for f in ["payload.bin", "back.bin", "big.bin", "over.bin"] {
        let _ = std::fs::remove_file(state_dir().join(f));
    }
}

#[test]
fn a_snapshot_restores_processes_memory_and_open_files_twice() {
    let _w = watchdog("a_snapshot_restores_processes_memory_and_open_files_twice");
    let shm = state_dir().with_file_name(format!("msb-e2e-snap-{}", std::process::id()));
    let (vol, snap) = (shm.join("vol"), shm.join("snap"));
    let _ = std::fs::remove_dir_all(&shm);
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("data"), b"held open across the snapshot\n").unwrap();
    std::fs::write(
        vol.join("doomed"),
        b"deleted on the host after the snapshot\n",
    )
    .unwrap();
    let volume = format!("{}:/vol", vol.display());
    let out = msb_vmm_state(&["start", "--name", "snapsrc", "--volume", &volume]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    // Guest state in memory (a tmpfs file, a process) and a file the process holds open on a
    // share (its node and handle live in the VMM's FUSE server).
    let e = msb_vmm_state(&[
        "exec",
        "snapsrc",
        "--",
        "sh",
        "-c",
        "echo in-memory > /dev/shm/m; (exec 3</vol/data; while sleep 1; do :; done) >/dev/null 2>&1 & echo $! > /dev/shm/pid; (exec 3</vol/doomed; while sleep 1; do :; done) >/dev/null 2>&1 & echo $! > /dev/shm/pid2; date -s @$(($(date +%s) - 3600)) >/dev/null",
    ]);
    assert!(e.status.success(), "exec: {}", text(&e.stderr));
    let snapshot = msb_vmm_state(&["snapshot", "snapsrc", snap.to_str().unwrap()]);
    assert!(
        snapshot.status.success(),
        "snapshot: {}",
        text(&snapshot.stderr)
    );
    std::fs::remove_file(vol.join("doomed")).unwrap();
    // The original carries on.
    let e = msb_vmm_state(&["exec", "snapsrc", "--", "cat", "/dev/shm/m"]);
    assert_eq!(text(&e.stdout), "in-memory\n", "{}", text(&e.stderr));
    let e = msb_vmm_state(&[
        "exec",
        "snapsrc",
        "--",
        "sh",
        "-c",
        "echo after > /dev/shm/m",
    ]);
    assert!(e.status.success());

    // Two copies from the one snapshot, beside the original.
    let mut randoms = Vec::new();
    for name in ["snapcopy1", "snapcopy2"] {
        let r = msb_vmm_state(&["restore", snap.to_str().unwrap(), "--name", name]);
        assert!(r.status.success(), "restore {name}: {}", text(&r.stderr));
        let e = msb_vmm_state(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "cat /dev/shm/m; p=$(cat /dev/shm/pid); kill -0 $p && echo alive; head -c 9 /proc/$p/fd/3; echo; hostname; date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; q=$(cat /dev/shm/pid2); kill -0 $q && echo alive; if head -c 4 /proc/$q/fd/3 >/dev/null 2>&1; then echo readable; else echo stale; fi",
        ]);
        let out = text(&e.stdout);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.get(..4),
            Some(&["in-memory", "alive", "held open", "snapsrc"][..]),
            "{name}: {out} {}",
            text(&e.stderr)
        );
        // The saved guest's clock was an hour behind; a restore steps it to the host's.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let guest: i64 = lines.get(4).and_then(|c| c.parse().ok()).unwrap_or(0);
        assert!(
            (guest - now).abs() < 600,
            "{name}: guest clock {guest}, host {now}"
        );
        let random = lines.get(5).copied().unwrap_or_default().to_string();
        assert_eq!(random.len(), 32, "{name}: {out}");
        randoms.push(random);
        // The file deleted on the host is stale for the guest, which carries on.
        assert_eq!(
            lines.get(6..8),
            Some(&["alive", "stale"][..]),
            "{name}: {out}"
        );
        // The agent's other paths work on the copy: a file copied in reads back.
        let local = shm.join(format!("{name}.in"));
        std::fs::write(&local, name.as_bytes()).unwrap();
        let cp = msb_vmm_state(&["cp", local.to_str().unwrap(), &format!("{name}:/tmp/in")]);
        assert!(cp.status.success(), "cp into {name}: {}", text(&cp.stderr));
        let e = msb_vmm_state(&["exec", name, "--", "cat", "/tmp/in"]);
        assert_eq!(text(&e.stdout), name);
        // The copy's writes are its own.
        let e = msb_vmm_state(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            &format!("echo {name} > /dev/shm/m"),
        ]);
        assert!(e.status.success());
    }
    // Each restore reseeded its kernel's generator: the copies do not share random numbers.
    assert_ne!(randoms[0], randoms[1]);
    // A fork branches the original as it is now; its snapshot is gone once it runs.
    let f = msb_vmm_state(&["fork", "snapsrc", "--name", "snapfork"]);
    assert!(f.status.success(), "fork: {}", text(&f.stderr));
    let left: Vec<_> = std::fs::read_dir(state_dir().join("snapsrc"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("fork-"))
        .collect();
    assert!(left.is_empty(), "the fork's snapshot is left: {left:?}");
    let e = msb_vmm_state(&[
        "exec",
        "snapfork",
        "--",
        "sh",
        "-c",
        "cat /dev/shm/m; echo forked > /dev/shm/m",
    ]);
    assert_eq!(text(&e.stdout), "after\n", "{}", text(&e.stderr));
    // Several at once from the snapshot directory.
    let f = msb_vmm_state(&[
        "fork",
        snap.to_str().unwrap(),
        "--count",
        "2",
        "--name-prefix",
        "snapk",
    ]);
    assert!(f.status.success(), "fork --count: {}", text(&f.stderr));
    for name in ["snapk1", "snapk2"] {
        let e = msb_vmm_state(&["exec", name, "--", "cat", "/dev/shm/m"]);
        assert_eq!(
            text(&e.stdout),
            "in-memory\n",
            "{name}: {}",
            text(&e.stderr)
        );
    }
    let ls = text(&msb_vmm_state(&["ls"]).stdout);
    for name in ["snapsrc", "snapcopy1", "snapcopy2"] {
        assert!(ls.contains(name), "{ls}");
    }
    let e = msb_vmm_state(&["exec", "snapsrc", "--", "cat", "/dev/shm/m"]);
    assert_eq!(text(&e.stdout), "after\n", "the fork's writes are its own");
    let e = msb_vmm_state(&["exec", "snapcopy1", "--", "cat", "/dev/shm/m"]);
    assert_eq!(text(&e.stdout), "snapcopy1\n");

    // Mistakes are one line naming the fix.
    let missing = msb_vmm_state(&["restore", "/nonexistent/snap", "--name", "snapbad"]);
    assert_eq!(missing.status.code(), Some(125));
    assert_eq!(
        text(&missing.stderr).lines().count(),
        1,
        "{}",
        text(&missing.stderr)
    );
    let taken = msb_vmm_state(&["restore", snap.to_str().unwrap(), "--name", "snapsrc"]);
    assert!(
        text(&taken.stderr).contains("already exists"),
        "{}",
        text(&taken.stderr)
    );

    for name in ["snapcopy1", "snapcopy2", "snapfork", "snapk1", "snapk2"] {
        let stop = msb_vmm_state(&["stop", name]);
        assert!(stop.status.success(), "stop {name}: {}", text(&stop.stderr));
    }
    // A last snapshot that stops its sandbox.
    let last = shm.join("last");
    let s = msb_vmm_state(&["snapshot", "snapsrc", last.to_str().unwrap(), "--stop"]);
    assert!(s.status.success(), "snapshot --stop: {}", text(&s.stderr));
    assert!(last.join("sandbox.json").exists());
    assert!(!text(&msb_vmm_state(&["ls"]).stdout).contains("snapsrc"));
    let _ = std::fs::remove_dir_all(&shm);
}

#[test]
fn dead_sandboxes_are_detected_and_cleaned() {
    let _w = watchdog("dead_sandboxes_are_detected_and_cleaned");
    let out = msb_vmm_state(&["start", "--name", "box2"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let pid: i32 = std::fs::read_to_string(state_dir().join("box2/pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: killing the sandbox process we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    let e = msb_vmm_state(&["exec", "box2", "--", "true"]);
    assert_eq!(e.status.code(), Some(125));
    assert!(
        text(&e.stderr).contains("not running"),
        "{}",
        text(&e.stderr)
    );
    assert!(!state_dir().join("box2").exists(), "leftovers removed");
}

#[test]
fn volumes_tmpfs_and_escape_attempts() {
    let _w = watchdog("volumes_tmpfs_and_escape_attempts");
    check_host();
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Pids repeat from one L2 VM to the next: start clean, and clean up even on failure.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let base = std::env::temp_dir().join(format!("msb-e2e-vol-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let _cleanup = Cleanup(base.clone());
    let (rw, ro, outside) = (base.join("rw"), base.join("ro"), base.join("outside"));
    for d in [&rw, &ro, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    std::fs::write(ro.join("keep"), b"read only").unwrap();
    // A tree to extract in the guest, and its checksum computed on the host.
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(rw.join("blob"), &data).unwrap();
    let want: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Planted by the host: symlinks that point outside the share.
    std::os::unix::fs::symlink(outside.join("secret"), rw.join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", rw.join("rel")).unwrap();

    let script = r#"
set -e
cd /data
mkdir tree && cd tree
for d in 1 2 3 4 5; do mkdir -p d$d; for i in $(seq 1 60); do echo "$d-$i" > d$d/f$i; done; done
cp /data/blob big && ln big big.hard && ln -s big big.sym
cd /data && tar -cf t.tar tree && mkdir x && tar -xf t.tar -C x
diff -r tree x/tree && echo tree-ok
sha256sum /data/x/tree/big | cut -d' ' -f1
# escape attempts: each must fail or stay inside
echo pwned > /data/abs 2>/dev/null && echo "abs-write-succeeded" || echo abs-refused
echo pwned > /data/rel 2>/dev/null && echo "rel-write-succeeded" || echo rel-refused
ls /data/../../../.. | grep -qx scratch && echo dotdot-stays-in-guest
ln /bin/busybox /data/hardlink 2>/dev/null && echo hardlink-made || echo hardlink-refused
mknod /data/null c 1 3 && [ -c /data/null ] && echo dev-ok
cp /bin/busybox /data/su && chmod 4755 /data/su && ls -l /data/su | cut -c1-10
echo w > /ro/w 2>/dev/null && echo ro-writable || echo ro-refused
cat /ro/keep; echo
echo t > /scratch/t && df /scratch | tail -1 | awk '{print $2}'
"#;
    let out = msb_vmm(&[
        "run",
        "-V",
        &format!("{}:/data", rw.display()),
        "-V",
        &format!("{}:/ro:ro", ro.display()),
        "--tmpfs",
        "/scratch:8m",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"tree-ok"), "{stdout}");
    assert!(
        lines.contains(&want.as_str()),
        "checksum through virtio-fs: {stdout}"
    );
    // In the guest the absolute symlink names a guest path (absent there), the relative one
    // climbs to the guest's /data/.. : neither reaches the host file.
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"host secret"
    );
    assert!(lines.contains(&"dotdot-stays-in-guest"), "{stdout}");
    assert!(lines.contains(&"hardlink-refused"), "{stdout}");
    assert!(lines.contains(&"dev-ok"), "{stdout}");
    let host_null = std::fs::symlink_metadata(rw.join("null")).unwrap();
    assert!(
        host_null.file_type().is_file(),
        "a guest device node is a plain host file"
    );
    assert!(
        lines.contains(&"-rwsr-xr-x"),
        "setuid in the guest: {stdout}"
    );
    let su = std::fs::metadata(rw.join("su")).unwrap();
    assert_eq!(
        su.permissions().mode() & 0o7000,
        0,
        "no setuid bit on the host"
    );
    assert_eq!(su.uid(), unsafe_geteuid(), "owned by the serving user");
    assert!(lines.contains(&"ro-refused"), "{stdout}");
    assert!(lines.contains(&"read only"), "{stdout}");
    assert!(lines.contains(&"8192"), "tmpfs size: {stdout}");
    assert!(!ro.join("w").exists());
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

#[test]
fn a_host_directory_boots_as_the_root_file_system() {
    let _w = watchdog("a_host_directory_boots_as_the_root_file_system");
    check_host();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let base = std::env::temp_dir().join(format!("msb-e2e-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let _cleanup = Cleanup(base.clone());
    let (root, vol) = (base.join("root"), base.join("vol"));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::copy(msb_vmm::assets::busybox(), root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "ls", "echo", "mount", "grep", "test", "["] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("marker"), b"from the host root\n").unwrap();
    std::fs::write(vol.join("v"), b"volume\n").unwrap();
    let out = msb_vmm(&[
        "run",
        "--rootfs",
        root.to_str().unwrap(),
        "-V",
        &format!("{}:/mnt/vol", vol.display()),
        "--",
        "sh",
        "-c",
        "cat /marker /mnt/vol/v; echo made-in-guest > /created; [ -e /init ] && echo initramfs-visible; \
         mount | grep -c ' / type virtiofs'; cat /proc/1/cmdline | grep -c init",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "from the host root\nvolume\n1\n1\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(root.join("created")).unwrap(),
        b"made-in-guest\n"
    );
    // A missing root directory is one line before boot.
    let bad = msb_vmm(&["run", "--rootfs", "/nonexistent/root", "--", "true"]);
    assert_eq!(bad.status.code(), Some(125));
    assert_eq!(
        text(&bad.stderr).lines().count(),
        1,
        "{}",
        text(&bad.stderr)
    );
}

/// The default root is the Debian minbase tree, shared copy-on-write: Debian's tools work,
/// real workloads run on a volume (permissions, ownership by guest root, links, rename over,
/// sparse files, mmap, fsync, a tarball checksummed against the host), a guest racing renames
/// against symlinks reaches nothing outside, and the cached tree never changes.
#[test]
fn the_default_debian_root_runs_real_workloads_copy_on_write() {
    let _w = watchdog("the_default_debian_root_runs_real_workloads_copy_on_write");
    check_host();
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let base = std::env::temp_dir().join(format!("msb-e2e-debian-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let _cleanup = Cleanup(base.clone());
    let (data, outside) = (base.join("data"), base.join("outside"));
    std::fs::create_dir_all(data.join("src")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    // A tarball made on the host: 400 files; the guest extracts it and reports checksums.
    let mut want = Vec::new();
    for i in 0..400u32 {
        let body: Vec<u8> = (0..(i * 97 % 5000)).map(|j| (j * 7 + i) as u8).collect();
        let name = format!("f{i:03}");
        std::fs::write(data.join("src").join(&name), &body).unwrap();
        let sum: String = Sha256::digest(&body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        want.push(format!("{sum}  ./{name}"));
    }
    let st = Command::new("tar")
        .args(["-cf", "tree.tar", "-C", "src", "."])
        .current_dir(&data)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_dir_all(data.join("src")).unwrap();
    let root = match msb_vmm::assets::default_root() {
        msb_vmm::assets::DefaultRoot::Dir(d) => d,
        _ => unreachable!("MSB_ROOTFS is not set by this test"),
    };
    let before = std::fs::read(root.join("etc/hostname")).unwrap_or_default();

    let script = r#"
set -euo pipefail
echo "debian $(cat /etc/debian_version | cut -d. -f1)"
dpkg-query -W -f='${Status}\n' coreutils bash apt
apt-get --version | sed -n '1s/ .*//p'
python3 -c 'print("python", 6 * 7)'
# Copy-on-write root: changes land in guest memory only.
echo changed > /etc/hostname && rm /usr/bin/sha1sum && [ ! -e /usr/bin/sha1sum ] && echo root-writable
cd /data
mkdir x && tar -xf tree.tar -C x && (cd x && sha256sum ./f* > ../sums) && echo extracted
# A shell-heavy workload: word frequencies over the extracted names with bash and awk.
n=0; for f in x/f*; do n=$((n + ${#f})); done; echo "name-bytes $n"
echo a > perm && chmod 640 perm && stat -c 'perm %a' perm
chown 1234:5678 perm && stat -c 'owner %u:%g' perm
ln perm perm.hard && stat -c 'links %h' perm
ln -s perm perm.sym && echo "sym $(readlink perm.sym) $(cat perm.sym)"
echo old > over && echo new > over.tmp && mv -f over.tmp over && echo "over $(cat over)"
truncate -s 1G sparse && echo tail >> sparse && echo "sparse $(stat -c %s sparse) $(du -k sparse | cut -f1)"
python3 - <<'PY'
import mmap, os, threading
fd = os.open("/data/mm", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 8192)
m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
m[4096:4101] = b"mmap!"
m.flush()
os.fsync(fd)
with open("/data/mm", "rb") as f:
    f.seek(4096)
    print("mmap", f.read(5).decode())
# Race: one thread swaps a directory for a symlink that, read on the host, would lead out
# of the share; the other writes and reads through it. Nothing may reach the host's file.
os.makedirs("/data/race/d")
stop = False
def swap():
    while not stop:
        try:
            os.rename("/data/race/d", "/data/race/real")
            os.symlink("../../outside", "/data/race/d")
            os.unlink("/data/race/d")
            os.rename("/data/race/real", "/data/race/d")
        except OSError:
            pass
t = threading.Thread(target=swap)
t.start()
leaked = 0
for i in range(300):
    for p in ("/data/race/d/secret", "/data/race/d/pwned"):
        try:
            with open(p, "a+") as f:
                f.seek(0)
                if "host secret" in f.read():
                    leaked += 1
        except OSError:
            pass
stop = True
t.join()
print("race-leaks", leaked)
PY
"#;
    let out = msb_vmm_default_root(&[
        "run",
        "--memory",
        "256",
        "-V",
        &format!("{}:/data", data.display()),
        "--",
        "bash",
        "-c",
        script,
    ]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for want_line in [
        "debian 12",
        "install ok installed",
        "apt",
        "python 42",
        "root-writable",
        "extracted",
        "perm 640",
        "owner 1234:5678",
        "links 2",
        "sym perm a",
        "over new",
        "mmap mmap!",
        "race-leaks 0",
    ] {
        assert!(
            lines.contains(&want_line),
            "missing {want_line:?} in {stdout}"
        );
    }
    let sparse = lines
        .iter()
        .find_map(|l| l.strip_prefix("sparse "))
        .expect("sparse line");
    let (size, kib) = sparse.split_once(' ').unwrap();
    assert_eq!(size, "1073741829");
    assert!(
        kib.parse::<u64>().unwrap() < 1024,
        "sparse file allocated {kib} KiB"
    );
    // The checksums the guest computed over what it extracted match the host's.
    let mut got: Vec<String> = std::fs::read_to_string(data.join("sums"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // Ownership set by guest root lives in the xattr; the host file keeps the server's user.
    let perm = std::fs::metadata(data.join("perm")).unwrap();
    assert_eq!(perm.uid(), unsafe_geteuid());
    assert_eq!(
        std::fs::read(data.join("mm")).unwrap()[4096..4101],
        *b"mmap!"
    );
    // Nothing outside the share changed; the cached root did not either.
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret"]);
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"host secret"
    );
    assert_eq!(
        std::fs::read(root.join("etc/hostname")).unwrap_or_default(),
        before
    );
    assert!(root.join("usr/bin/sha1sum").exists());
    // And the next sandbox starts from the pristine tree.
    let again = msb_vmm_default_root(&[
        "run",
        "--",
        "sh",
        "-c",
        "ls /usr/bin/sha1sum; cat /etc/hostname",
    ]);
    assert_eq!(
        text(&again.stdout),
        "/usr/bin/sha1sum\nmsb\n",
        "{}",
        text(&again.stderr)
    );
}

/// The sandbox's network: the host is unreachable by default and reachable on exactly the
/// port a rule allows (1 MiB checksummed through virtio-net and the netstack); the guest has
/// its IPv4 and IPv6 addresses and routes; `--net none` has no card at all.
#[test]
fn the_network_reaches_only_what_the_policy_allows() {
    let _w = watchdog("the_network_reaches_only_what_the_policy_allows");
    check_host();
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    let body: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    let want: String = Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let serve = |addr: &str| {
        let l = std::net::TcpListener::bind(addr).unwrap();
        let port = l.local_addr().unwrap().port();
        let body = body.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let body = body.clone();
                std::thread::spawn(move || {
                    let mut req = Vec::new();
                    let mut b = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut b) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    let _ = c
                        .write_all(head.as_bytes())
                        .and_then(|_| c.write_all(&body));
                });
            }
        });
        port
    };
    let port = serve("127.0.0.1:0");
    let port_v6 = serve("[::1]:0");
    let url = format!("http://10.0.2.2:{port}/");
    let script = format!(
        "wget -q -O /dev/null {url} 2>&1 | grep -c 'Connection refused'; \
         grep -c fd006d73006200000000000000000015 /proc/net/if_inet6; \
         ip route | grep -c 'default via 10.0.2.2'; cat /etc/resolv.conf | grep -c 10.0.2.2"
    );
    let out = msb_vmm(&["run", "--", "sh", "-c", &script]);
    assert_eq!(
        text(&out.stdout),
        "1\n1\n1\n1\n",
        "stderr: {}",
        text(&out.stderr)
    );
    let allow = format!("tcp:host:{port}");
    let allow_v6 = format!("tcp:host:{port_v6}");
    let log = std::env::temp_dir().join(format!("msb-e2e-netlog-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    // Downloads over IPv4 and IPv6 come as 64 KiB segments with partial checksums, spread
    // over the driver's mergeable buffers: the card's negotiated feature bits say so
    // (GUEST_CSUM 1, GUEST_TSO4/6 7 and 8, MRG_RXBUF 15), the checksums that the bytes
    // arrived whole.
    let out = msb_vmm(&[
        "run",
        "--allow",
        &allow,
        "--allow",
        &allow_v6,
        "--net-log",
        log.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        // (No -T: busybox-static's wget crashes with a timeout set.)
        &format!(
            "wget -q -O - {url} | sha256sum | cut -d' ' -f1; \
             wget -q -O - 'http://[fd00:6d73:62::2]:{port_v6}/' | sha256sum | cut -d' ' -f1; \
             cat /sys/class/net/eth0/device/features"
        ),
    ]);
    let got = text(&out.stdout);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(
        lines.get(..2),
        Some(&[want.as_str(), want.as_str()][..]),
        "stderr: {}",
        text(&out.stderr)
    );
    let bits = lines.get(2).copied().unwrap_or_default().as_bytes();
    for bit in [1, 7, 8, 15] {
        assert_eq!(bits.get(bit), Some(&b'1'), "feature {bit} in {bits:?}");
    }
    // The audit log has the flow, its rule and the bytes each way.
    let lines = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let flow: serde_json::Value = lines
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &serde_json::Value| v["kind"] == "flow")
        .unwrap_or_else(|| panic!("no flow line in {lines:?}"));
    assert_eq!(flow["verdict"], "allowed");
    assert_eq!(flow["rule"], format!("--allow {allow}"));
    assert!(flow["bytes_in"].as_u64().unwrap() > 1 << 20, "{flow}");
    // Upload over IPv6: 8 MiB of random bytes (base64: busybox wget posts a file as a C
    // string) from the guest, TCP segmentation and checksums offloaded by its kernel to the
    // card, to a server on the host's ::1 through the gateway's IPv6 address; the server
    // answers the body's SHA-256.
    let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
    let port6 = l6.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l6.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut b = vec![0u8; 65536];
                let head_end = loop {
                    if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&req[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = req[head_end..].to_vec();
                while body.len() < len {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => body.extend_from_slice(&b[..n]),
                    }
                }
                let sum: String = Sha256::digest(&body)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let reply = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{sum}",
                    sum.len()
                );
                let _ = c.write_all(reply.as_bytes());
            });
        }
    });
    let allow6 = format!("tcp:host:{port6}");
    let out = msb_vmm(&[
        "run",
        "--allow",
        &allow6,
        "--",
        "sh",
        "-c",
        &format!(
            "dd if=/dev/urandom bs=1048576 count=8 2>/dev/null | base64 > /tmp/up; \
             sha256sum /tmp/up | cut -d' ' -f1; \
             wget -q -O - --post-file /tmp/up 'http://[fd00:6d73:62::2]:{port6}/'; echo"
        ),
    ]);
    let got = text(&out.stdout);
    let lines: Vec<&str> = got.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].len() == 64 && lines[0] == lines[1],
        "the upload's checksum, in the guest and as the host received it: {got:?}; stderr: {}",
        text(&out.stderr)
    );
    let out = msb_vmm(&["run", "--net", "none", "--", "ls", "/sys/class/net"]);
    assert_eq!(text(&out.stdout), "lo\n", "stderr: {}", text(&out.stderr));
}

/// `--publish`: a host port forwarded to a server in the guest (busybox httpd), with no
/// egress allowed at all.
#[test]
fn published_ports_reach_a_server_in_the_guest() {
    let _w = watchdog("published_ports_reach_a_server_in_the_guest");
    check_host();
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(
        Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
            .args([
                "run",
                "--net",
                "none",
                "--publish",
                &format!("{port}:7000"),
                "--",
                "sh",
                "-c",
                "echo published-page > /tmp/index.html && httpd -p 7000 -h /tmp && sleep 600",
            ])
            .env("MSB_ROOTFS", "initramfs")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("msb-vmm runs"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    let page = loop {
        let got = (|| -> std::io::Result<String> {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
            c.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
            c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut s = String::new();
            c.read_to_string(&mut s)?;
            Ok(s)
        })();
        match got {
            Ok(s) if s.contains("published-page") => break s,
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(500))
            }
            other => panic!("no page through the published port: {other:?}"),
        }
    };
    assert!(
        page.starts_with("HTTP/1.") && page.contains(" 200 OK"),
        "{page}"
    );
    drop(child);
}

/// The host's own addresses are the host: a real guest under `--net all` cannot reach a
/// server on the host's wildcard address through a private, a public or an IPv6 address of
/// the host, and `--allow tcp:host:PORT` reaches it through each. The VMM runs in a network
/// namespace this test makes (so the machine's own interfaces never change), holding those
/// addresses.
#[test]
fn the_hosts_own_addresses_are_reached_only_by_a_host_rule() {
    let _w = watchdog("the_hosts_own_addresses_are_reached_only_by_a_host_rule");
    check_host();
    use std::io::{Read, Write};
    const ADDRS: [&str; 3] = ["192.168.77.1", "81.2.69.142", "[2a02:8070::5]"];
    // One thread moves into a fresh network namespace; what it runs (ip, the listener, the
    // VMM) lives there.
    let outs = std::thread::spawn(|| {
        // SAFETY: unshare affects only the calling thread (CLONE_NEWNET alone).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!(
                "unshare(CLONE_NEWNET): {} (this test needs root)",
                std::io::Error::last_os_error()
            );
        }
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "192.168.77.1/32", "dev", "lo"],
            &["addr", "add", "81.2.69.142/32", "dev", "lo"],
            &["addr", "add", "2a02:8070::5/128", "dev", "lo", "nodad"],
        ] {
            let ok = Command::new("ip")
                .args(args)
                .status()
                .expect("ip (iproute2)");
            assert!(ok.success(), "ip {args:?}");
        }
        let l = std::net::TcpListener::bind("[::]:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let mut b = [0u8; 1024];
                let _ = c.read(&mut b);
                let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhost-service");
            }
        });
        let script: String = ADDRS
            .iter()
            .map(|a| {
                format!("wget -q -O - http://{a}:{port}/ 2>/dev/null || echo no-answer; echo; ")
            })
            .collect();
        let run = |extra: &[&str]| {
            let mut args = vec!["run", "--net", "all"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["--", "sh", "-c", &script]);
            msb_vmm(&args)
        };
        let allow = format!("tcp:host:{port}");
        (run(&[]), run(&["--allow", &allow]))
    })
    .join()
    .unwrap();
    let (denied, allowed) = outs;
    assert_eq!(
        text(&denied.stdout),
        "no-answer\n\n".repeat(3),
        "under --net all; stderr: {}",
        text(&denied.stderr)
    );
    assert_eq!(
        text(&allowed.stdout),
        "host-service\n".repeat(3),
        "with a host rule; stderr: {}",
        text(&allowed.stderr)
    );
}

/// Learn mode through the CLI: `run --net learn --suggest-to FILE` records what a workload
/// reached (two names under one domain and an address, private ones in a second network
/// namespace joined by a veth pair, so none of it is the host's), and `run --policy FILE` admits the same
/// workload and nothing else. The names come from an /etc/hosts bind-mounted in a mount
/// namespace of the VMM's own (the netstack resolves with the host's resolver).
#[test]
fn learn_mode_suggestion_admits_the_same_workload() {
    let _w = watchdog("learn_mode_suggestion_admits_the_same_workload");
    check_host();
    use std::io::{Read, Write};
    use std::sync::mpsc;
    fn ip(args: &[&str]) {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .expect("ip (iproute2)");
        assert!(ok.success(), "ip {args:?}");
    }
    fn unshare_net() {
        // SAFETY: unshare affects only the calling thread (CLONE_NEWNET alone).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!(
                "unshare(CLONE_NEWNET): {} (this test needs root)",
                std::io::Error::last_os_error()
            );
        }
    }
    // The far side: its own namespace, four addresses, one server answering on all.
    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (port_tx, port_rx) = mpsc::channel();
    std::thread::spawn(move || {
        unshare_net();
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        go_rx.recv().unwrap();
        ip(&["link", "set", "lo", "up"]);
        for a in [
            "10.199.77.2/24",
            "10.199.77.3/24",
            "10.199.77.4/24",
            "10.199.77.5/24",
        ] {
            ip(&["addr", "add", a, "dev", "msbl1"]);
        }
        ip(&["link", "set", "msbl1", "up"]);
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        port_tx.send(l.local_addr().unwrap().port()).unwrap();
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut b = [0u8; 1024];
            let _ = c.read(&mut b);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nfar");
        }
    });
    let far = tid_rx.recv().unwrap();
    let dir = std::env::temp_dir().join(format!("msb-e2e-learn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n10.199.77.2 api.far.test\n10.199.77.3 cdn.far.test\n",
    )
    .unwrap();
    let suggestion = dir.join("allow.toml");
    let (learned, replayed, text_of_policy) = std::thread::spawn(move || {
        unshare_net();
        ip(&["link", "set", "lo", "up"]);
        ip(&[
            "link", "add", "msbl0", "type", "veth", "peer", "name", "msbl1",
        ]);
        ip(&["link", "set", "msbl1", "netns", &far.to_string()]);
        ip(&["addr", "add", "10.199.77.1/24", "dev", "msbl0"]);
        ip(&["link", "set", "msbl0", "up"]);
        go_tx.send(()).unwrap();
        let port = port_rx.recv().unwrap();
        let fetch = |target: &str| {
            format!("wget -q -O - http://{target}:{port}/ 2>/dev/null || echo no-answer; echo; ")
        };
        let workload: String = ["api.far.test", "cdn.far.test", "10.199.77.4"]
            .iter()
            .map(|t| fetch(t))
            .collect();
        // The VMM in a mount namespace of its own (private propagation: the bind mount
        // never reaches the host), in this thread's network namespace.
        let run = |args: &[&str], script: &str| {
            let mut cmd = format!(
                "mount --bind {} /etc/hosts && exec {}",
                hosts.display(),
                env!("CARGO_BIN_EXE_msb-vmm")
            );
            for a in args {
                cmd.push(' ');
                cmd.push_str(a);
            }
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(format!("{cmd} -- sh -c \"$0\""))
                .arg(script)
                .env("MSB_ROOTFS", "initramfs")
                .output()
                .expect("unshare (util-linux) runs")
        };
        let s = suggestion.display().to_string();
        let learned = run(&["run", "--net", "learn", "--suggest-to", &s], &workload);
        let policy = std::fs::read_to_string(&suggestion).unwrap_or_default();
        // The same workload under the suggestion, then a served address it never reached.
        let replay = format!("{workload}{}", fetch("10.199.77.5"));
        let replayed = run(&["run", "--policy", &s], &replay);
        (learned, replayed, policy)
    })
    .join()
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        text(&learned.stdout),
        "far\n".repeat(3),
        "under --net learn; stderr: {}",
        text(&learned.stderr)
    );
    assert!(
        text_of_policy.contains("far.test") && text_of_policy.contains("10.199.77.4"),
        "the suggestion names what was reached:\n{text_of_policy}\nstderr: {}",
        text(&learned.stderr)
    );
    assert!(
        !text_of_policy.contains("10.199.77.2") && !text_of_policy.contains("10.199.77.3"),
        "names, not their addresses:\n{text_of_policy}"
    );
    assert_eq!(
        text(&replayed.stdout),
        format!("{}no-answer\n\n", "far\n".repeat(3)),
        "under the suggestion:\n{text_of_policy}\nstderr: {}",
        text(&replayed.stderr)
    );
}

/// Secrets through TLS interception, end to end: the default Debian root's curl and python3
/// call an HTTPS upstream (the test's, with its own CA given as an upstream CA) with a
/// placeholder from their environment; the upstream receives the real value, and afterwards
/// the guest's whole RAM holds the placeholder but never the value. The VMM runs in a network
/// namespace the test makes, where the upstream is the host (reached by a `host:443` rule).
#[test]
fn secrets_reach_their_host_and_never_enter_the_guest() {
    let _w = watchdog("secrets_reach_their_host_and_never_enter_the_guest");
    check_host();
    use msb_netstack::ca::{Ca, Leaves};
    use msb_netstack::policy::{Action, Policy, Preset};
    use msb_netstack::secrets::{Secret, Secrets};
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let root = match msb_vmm::assets::default_root() {
        msb_vmm::assets::DefaultRoot::Dir(d) if d.is_dir() => d,
        other => panic!("this test needs the default Debian root (./x setup): {other:?}"),
    };
    // A value that exists nowhere but here and at the upstream.
    let mut rnd = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut rnd)
        .unwrap();
    let value: String = format!(
        "sk-e2e-{}",
        rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let up_ca = Ca::generate().unwrap();
    let ca_file =
        std::env::temp_dir().join(format!("msb-e2e-upstream-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, up_ca.cert_pem()).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let (value2, seen2, ca2) = (value.clone(), seen.clone(), ca_file.clone());
    let (outs, guest_value, guest_placeholder) = std::thread::spawn(move || {
        // SAFETY: unshare affects only the calling thread (CLONE_NEWNET alone).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!("unshare(CLONE_NEWNET): {} (this test needs root)", std::io::Error::last_os_error());
        }
        for args in [&["link", "set", "lo", "up"][..], &["addr", "add", "192.168.77.1/32", "dev", "lo"]] {
            assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        }
        // The upstream: HTTPS on 192.168.77.1:443, recording what it receives, answering
        // without echoing it (so the value cannot come back into the guest).
        let l = std::net::TcpListener::bind("192.168.77.1:443").unwrap();
        let cfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Leaves::new(up_ca).unwrap())),
        );
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let (cfg, seen) = (cfg.clone(), seen2.clone());
                std::thread::spawn(move || {
                    let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(cfg).unwrap(), c);
                    let mut req = Vec::new();
                    let mut b = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut b) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    seen.lock().unwrap().extend_from_slice(&req);
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nseen\n");
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        let mut policy = Policy::preset(Preset::None);
        policy.add_flag(Action::Allow, "tcp:host:443").unwrap();
        let mut net = msb_vmm::sandbox::Network::new(policy);
        let secrets = Secrets::new(vec![Secret::new("API_KEY", value2.clone().into_bytes(), "api.test").unwrap()]).unwrap();
        let placeholder = secrets.get(0).placeholder().to_string();
        net.intercept = Some(
            msb_vmm::tls::TlsOptions { secrets, upstream_cas: vec![ca2], ..Default::default() }
                .build()
                .unwrap(),
        );
        let sb = Sandbox::builder()
            .cpus(2)
            .memory_mib(160)
            .rootfs_overlay(root)
            .network(net)
            .start()
            .expect("sandbox starts");
        let run = |script: &str| {
            let out = sb.output(["sh", "-c", script]).expect("exec");
            (text(&out.stdout), text(&out.stderr))
        };
        let curl = run("curl -sS --resolve api.test:443:192.168.77.1 -H \"Authorization: Bearer $API_KEY\" https://api.test/curl");
        let py = run(
            r#"python3 -c '
import os, socket, ssl
s = ssl.create_default_context().wrap_socket(socket.create_connection(("192.168.77.1", 443)), server_hostname="api.test")
s.sendall(("GET /py?key=" + os.environ["API_KEY"] + " HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n").encode())
print(s.recv(4096).decode().split("\r\n\r\n")[1], end="")
'"#,
        );
        let env = run("echo $API_KEY; echo $SSL_CERT_FILE; grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/msb-vmm-ca.pem");
        let c = sb.count_in_guest_memory(&[value2.as_bytes(), placeholder.as_bytes()]);
        let counts = (c[0], c[1]);
        let _ = sb.shutdown();
        ((curl, py, env, placeholder.clone()), counts.0, counts.1)
    })
    .join()
    .unwrap();
    let _ = std::fs::remove_file(&ca_file);
    let (curl, py, env, placeholder) = outs;
    assert_eq!(curl.0, "seen\n", "curl: {curl:?}");
    assert_eq!(py.0, "seen\n", "python: {py:?}");
    assert_eq!(
        env.0,
        format!("{placeholder}\n/etc/ssl/certs/ca-certificates.crt\n1\n"),
        "{env:?}"
    );
    let seen = String::from_utf8_lossy(&seen.lock().unwrap()).to_string();
    assert!(
        seen.contains(&format!("Authorization: Bearer {value}")),
        "the upstream got the value: {seen}"
    );
    assert!(seen.contains(&format!("GET /py?key={value} ")), "{seen}");
    assert!(!seen.contains(&placeholder), "{seen}");
    assert!(
        guest_placeholder > 0,
        "the memory scan finds what the guest holds"
    );
    assert_eq!(guest_value, 0, "the real value is nowhere in guest RAM");
}

#[test]
fn a_forbidden_call_in_any_thread_kind_stops_the_vmm_naming_it() {
    let _w = watchdog("a_forbidden_call_in_any_thread_kind_stops_the_vmm_naming_it");
    let vol = std::env::temp_dir().join(format!("msb-e2e-probe-{}", std::process::id()));
    std::fs::create_dir_all(&vol).unwrap();
    let volume = format!("{}:/v", vol.display());
    let check = |kind: &str, thread: &str, out: &Output| {
        let stderr = text(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("seccomp")).collect();
        assert_eq!(
            out.status.code(),
            if kind == "vsock-listener" {
                Some(125) // `start` reports its sandbox process's failure
            } else {
                Some(msb_confine::EXIT_CODE)
            },
            "{kind}: {stderr}"
        );
        assert_eq!(lines.len(), 1, "{kind}: one line: {stderr}");
        assert!(
            lines[0].contains(&format!("thread '{thread}' ({kind} filter)"))
                && lines[0].contains("forbidden system call execve (59)"),
            "{kind}: {}",
            lines[0]
        );
    };
    // Every kind a sandbox with a volume and a network runs, through the real CLI.
    for (kind, thread) in [
        ("control", "msb-vmm"),
        ("vcpu", "vcpu0"),
        ("events", "vmm-events"),
        ("vsock", "vsock"),
        ("fs", "virtiofs-vol0"),
        ("net", "virtio-net"),
        ("netstack", "netstack"),
        ("dns", "netstack-dns"),
        ("launcher", "vmm-launcher"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_msb-vmm"));
        cmd.args(["run", "-V", &volume, "--", "ls", "/v"])
            .env("MSB_ROOTFS", "initramfs")
            .env(msb_confine::PROBE_ENV, kind);
        check_host();
        check(kind, thread, &cmd.output().unwrap());
    }
    // The vsock listener of a named sandbox.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_msb-vmm"));
    cmd.args(["start", "--name", "probe"])
        .env("MSB_STATE_DIR", state_dir())
        .env("MSB_ROOTFS", "initramfs")
        .env(msb_confine::PROBE_ENV, "vsock-listener");
    check("vsock-listener", "vsock-hybrid", &cmd.output().unwrap());
    let _ = std::fs::remove_dir_all(&vol);
}

#[test]
fn a_jailed_sandbox_runs_shares_files_and_is_held_to_its_limits() {
    let _w = watchdog("a_jailed_sandbox_runs_shares_files_and_is_held_to_its_limits");
    let base = std::env::temp_dir().join(format!("msb-e2e-jail-{}", std::process::id()));
    let vol = base.join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("in"), b"from the host\n").unwrap();
    let volume = format!("{}:/v", vol.display());
    let jails = state_dir().with_extension("jails");
    let jail = jails.join("run");
    // One command in a jailed sandbox, through a volume.
    let out = msb_vmm(&[
        "run",
        "--jail",
        jail.to_str().unwrap(),
        "-V",
        &volume,
        "--",
        "sh",
        "-c",
        "cat /v/in; echo from the guest > /v/out",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from the host\n");
    assert_eq!(std::fs::read(vol.join("out")).unwrap(), b"from the guest\n");
    assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);

    // A named one: exec and cp reach it; a file past --jail-max-file fails, the VMM lives.
    let jail = jails.join("start");
    let out = msb_vmm_state(&[
        "start",
        "--name",
        "jailed",
        "--jail",
        jail.to_str().unwrap(),
        "--jail-max-file",
        "1m",
        "-V",
        &volume,
    ]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let out = msb_vmm_state(&[
        "exec",
        "jailed",
        "--",
        "sh",
        "-c",
        "head -c 2097152 /dev/zero > /v/big; echo rc=$?; hostname",
    ]);
    let stdout = text(&out.stdout);
    assert!(
        !stdout.contains("rc=0"),
        "a 2 MiB file under a 1 MiB limit: {stdout}"
    );
    assert!(
        std::fs::metadata(vol.join("big")).map_or(0, |m| m.len()) <= 1 << 20,
        "the host file stayed within the limit"
    );
    let out = msb_vmm_state(&["exec", "jailed", "--", "cat", "/v/in"]);
    assert_eq!(
        text(&out.stdout),
        "from the host\n",
        "{}",
        text(&out.stderr)
    );
    let out = msb_vmm_state(&["stop", "jailed"]);
    assert!(out.status.success(), "stop: {}", text(&out.stderr));
    assert!(!state_dir().join("jailed").exists(), "state cleaned up");
    assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&base);
    let _ = std::fs::remove_dir_all(&jails);
}

/// `msb-vmm stats` of a running sandbox (table, JSON, Prometheus), then a live policy change
/// while a download runs: the download is cut, the other allowed port still works, a bad
/// update changes nothing, and the audit log says why the flow ended.
#[test]
fn stats_of_a_running_sandbox_and_a_live_policy_change() {
    let _w = watchdog("stats_of_a_running_sandbox_and_a_live_policy_change");
    check_host();
    use std::io::{Read, Write};
    // An endless download, and an echo server.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_port = down.local_addr().unwrap().port();
    let (ended_tx, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in down.incoming() {
            let Ok(mut c) = c else { return };
            let tx = ended_tx.clone();
            std::thread::spawn(move || {
                let block = vec![b'x'; 1 << 16];
                while c.write_all(&block).is_ok() {}
                let _ = tx.send(());
            });
        }
    });
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in echo.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let dir = state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let vol = dir.join("statsvol");
    std::fs::create_dir_all(&vol).unwrap();
    let metrics = dir.join("metrics.sock");
    let log = dir.join("netlog.jsonl");
    let (allow_down, allow_echo) = (
        format!("tcp:host:{down_port}"),
        format!("tcp:host:{echo_port}"),
    );
    let out = msb_vmm_state(&[
        "start",
        "--name",
        "netbox",
        "--net",
        "none",
        "--allow",
        &allow_down,
        "--allow",
        &allow_echo,
        "-V",
        &format!("{}:/data", vol.display()),
        "--metrics-socket",
        metrics.to_str().unwrap(),
        "--net-log",
        log.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let e = msb_vmm_state(&[
        "exec",
        "netbox",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/data/f bs=1024 count=2048 2>/dev/null && echo wrote",
    ]);
    assert_eq!(text(&e.stdout), "wrote\n", "{}", text(&e.stderr));
    // The download runs in the background of this test.
    let state = dir.clone();
    let download = std::thread::spawn(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_msb-vmm"));
        cmd.args([
            "exec",
            "netbox",
            "--",
            "sh",
            "-c",
            &format!("nc 10.0.2.2 {down_port} </dev/null | wc -c"),
        ])
        .env("MSB_STATE_DIR", state);
        cmd.output().unwrap()
    });
    // Stats until the download shows (bytes into the guest), as JSON.
    let stats = loop {
        let o = msb_vmm_state(&["stats", "netbox", "--json"]);
        assert!(o.status.success(), "stats: {}", text(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if v["net"]["bytes_in"].as_u64().unwrap_or(0) > 2 << 20 {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(stats["cpus"], 1);
    assert!(stats["vcpu_time_s"].as_f64().unwrap() > 0.0, "{stats}");
    let resident = stats["memory"]["host_resident_bytes"].as_u64().unwrap();
    assert!(
        resident > 1 << 20 && resident <= stats["memory"]["guest_bytes"].as_u64().unwrap(),
        "{stats}"
    );
    assert!(
        stats["guest"]["memory_used_bytes"].as_u64().unwrap() > 1 << 20,
        "{stats}"
    );
    assert!(
        stats["guest"]["execs_started"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    assert!(
        stats["guest"]["execs_running"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert!(stats["net"]["flows_out"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["net"]["flows_open"].as_u64().unwrap() >= 1, "{stats}");
    let vol0 = &stats["fs"][0];
    assert_eq!(
        (vol0["tag"].as_str(), vol0["guest_path"].as_str()),
        (Some("vol0"), Some("/data"))
    );
    assert!(
        vol0["bytes_written"].as_u64().unwrap() >= 2 << 20,
        "{stats}"
    );
    let table = msb_vmm_state(&["stats", "netbox"]);
    let t = text(&table.stdout);
    assert!(
        t.contains("sandbox netbox: up") && t.contains("fs vol0  /data"),
        "{t}"
    );
    // Prometheus text over HTTP on the metrics socket.
    let mut m = std::os::unix::net::UnixStream::connect(&metrics).unwrap();
    m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    m.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(
        page.contains("msb_execs_total{sandbox=\"netbox\"}"),
        "{page}"
    );
    assert!(
        page.contains("msb_net_bytes_total{sandbox=\"netbox\",direction=\"in\"}"),
        "{page}"
    );

    // The policy in force, then a bad update that changes nothing.
    let shown = text(&msb_vmm_state(&["policy", "netbox"]).stdout);
    assert!(
        shown.contains("preset = \"none\"") && shown.contains(&allow_down),
        "{shown}"
    );
    let bad = msb_vmm_state(&["policy", "netbox", "--allow", "tcp:host:99999"]);
    assert_eq!(bad.status.code(), Some(125));
    assert_eq!(
        text(&bad.stderr).lines().count(),
        1,
        "{}",
        text(&bad.stderr)
    );
    assert_eq!(text(&msb_vmm_state(&["policy", "netbox"]).stdout), shown);
    // The live change: only the echo port stays allowed. The download is cut.
    let change = msb_vmm_state(&["policy", "netbox", "--net", "none", "--allow", &allow_echo]);
    assert!(change.status.success(), "{}", text(&change.stderr));
    assert!(
        text(&change.stderr).contains("1 open flows it denies were cut"),
        "{}",
        text(&change.stderr)
    );
    ended
        .recv_timeout(Duration::from_secs(60))
        .expect("the host side of the cut download closed");
    let d = download.join().unwrap();
    let got: u64 = text(&d.stdout).trim().parse().unwrap_or(0);
    assert!(got > 2 << 20, "{} / {}", text(&d.stdout), text(&d.stderr));
    let e = msb_vmm_state(&[
        "exec",
        "netbox",
        "--",
        "sh",
        "-c",
        &format!(
            "echo hi | nc 10.0.2.2 {echo_port} & sleep 2; kill %1 2>/dev/null; \
             nc 10.0.2.2 {down_port} </dev/null >/dev/null 2>&1; echo down=$?"
        ),
    ]);
    assert_eq!(text(&e.stdout), "hi\ndown=1\n", "{}", text(&e.stderr));
    let after = text(&msb_vmm_state(&["policy", "netbox"]).stdout);
    assert!(
        !after.contains(&allow_down) && after.contains(&allow_echo),
        "{after}"
    );
    let stop = msb_vmm_state(&["stop", "netbox"]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    assert!(!metrics.exists(), "the metrics socket is removed at stop");
    let lines = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        lines
            .lines()
            .any(|l| l.contains(&format!("10.0.2.2:{down_port}"))
                && l.contains("\"denied\"")
                && l.contains("policy changed")),
        "{lines}"
    );
    let _ = std::fs::remove_dir_all(&vol);
    let _ = std::fs::remove_file(&log);
}

/// Waits (at most `limit`) until `msb-vmm ls` shows `name` with `state` in its row.
fn wait_for_ls(name: &str, state: &str, limit: Duration) -> String {
    let t = std::time::Instant::now();
    loop {
        let ls = text(&msb_vmm_state(&["ls"]).stdout);
        if ls
            .lines()
            .any(|l| l.starts_with(&format!("{name} ")) && l.contains(state))
        {
            return ls;
        }
        assert!(t.elapsed() < limit, "{name} never showed {state:?}: {ls}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The guest-side limits hold against a fork bomb and a memory hog (the agent keeps
/// answering), and named sandboxes stop cleanly when idle or at their maximum lifetime,
/// with the reason shown by `ls`.
#[test]
fn limits_hold_and_idle_or_old_sandboxes_stop() {
    let _w = watchdog("limits_hold_and_idle_or_old_sandboxes_stop");
    let out = msb_vmm_state(&["start", "--name", "lifebox", "--max-lifetime", "30"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let out = msb_vmm_state(&[
        "start",
        "--name",
        "limbox",
        "--pids-limit",
        "32",
        "--memory-limit",
        "64m",
        "--idle-timeout",
        "25",
    ]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let bomb = msb_vmm_state(&[
        "exec",
        "limbox",
        "--timeout",
        "60",
        "--",
        "sh",
        "-c",
        // The bomb waits (with shell built-ins only: no fork is possible at the limit)
        // until the cgroup has refused a fork, so a slow machine cannot end it early.
        "f() { f | f & }; f 2>/dev/null; \
         while :; do while read k v; do [ \"$k\" = max ] && [ \"$v\" != 0 ] && exec sleep 100; \
         done < /sys/fs/cgroup/sandbox/pids.events; done",
    ]);
    assert_eq!(bomb.status.code(), Some(124), "{}", text(&bomb.stderr));
    let hog = msb_vmm_state(&[
        "exec",
        "limbox",
        "--",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=100M",
        "count=1",
    ]);
    assert_eq!(
        hog.status.code(),
        Some(137),
        "OOM-killed: {}",
        text(&hog.stderr)
    );
    assert!(
        text(&hog.stderr).contains("ran out of memory and its OOM killer ended the command"),
        "the OOM kill is named: {}",
        text(&hog.stderr)
    );
    let e = msb_vmm_state(&[
        "exec",
        "limbox",
        "--",
        "sh",
        "-c",
        "cd /sys/fs/cgroup/sandbox; cat pids.max memory.max; grep -c '^max [1-9]' pids.events; \
         grep -c '^oom_kill [1-9]' memory.events; echo alive",
    ]);
    assert_eq!(
        text(&e.stdout),
        "32\n67108864\n1\n1\nalive\n",
        "{}",
        text(&e.stderr)
    );
    // Left alone, it stops itself; so does the old one.
    let ls = wait_for_ls("limbox", "stopped: idle for 25 s", Duration::from_secs(240));
    assert!(ls.contains("stopped: max lifetime (30 s) reached"), "{ls}");
    let gone = msb_vmm_state(&["exec", "limbox", "--", "true"]);
    assert_eq!(gone.status.code(), Some(125));
    assert!(
        text(&gone.stderr).contains("was stopped: idle"),
        "{}",
        text(&gone.stderr)
    );
    for name in ["limbox", "lifebox"] {
        let s = msb_vmm_state(&["stop", name]);
        assert!(s.status.success(), "{}", text(&s.stderr));
        assert!(!text(&msb_vmm_state(&["ls"]).stdout).contains(name));
    }
}

/// Warm starts: the first `run` of a configuration boots and saves a template; the next
/// ones continue it, each with its own volume directory, environment, fresh entropy and
/// the current clock; `--cold` boots; a broken template gives way to a boot that saves a
/// new one.
#[test]
fn run_starts_warm_from_a_template_saved_on_first_use() {
    let _w = watchdog("run_starts_warm_from_a_template_saved_on_first_use");
    check_host();
    let base = state_dir().with_file_name(format!("msb-e2e-warm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let cache = base.join("cache");
    for (d, who) in [("a", "from-a"), ("b", "from-b")] {
        std::fs::create_dir_all(base.join(d)).unwrap();
        std::fs::write(base.join(d).join("who"), who).unwrap();
    }
    let report = base.join("report.json");
    let run = |args: &[&str]| -> (Vec<String>, serde_json::Value) {
        let vol = |d: &str| format!("{}:/data", base.join(d).display());
        let mut full: Vec<String> = vec!["run".into(), "--report".into()];
        full.push(report.display().to_string());
        for a in args {
            full.push(match *a {
                "A" => vol("a"),
                "B" => vol("b"),
                a => a.to_string(),
            });
        }
        full.extend(["--".into(), "sh".into(), "-c".into(),
            "cat /data/who; echo; echo $X; date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo".into()]);
        let out = Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
            .args(&full)
            .env("MSB_CACHE_DIR", &cache)
            .env("MSB_KERNEL", msb_vmm::assets::default_kernel())
            .env("MSB_INIT", msb_vmm::assets::msb_init())
            .env("MSB_BUSYBOX", msb_vmm::assets::busybox())
            .env("MSB_ROOTFS", "initramfs")
            .env("MSB_LOG", "info")
            .output()
            .unwrap();
        assert!(out.status.success(), "run {args:?}: {}", text(&out.stderr));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
        assert_eq!(lines.len(), 4, "{lines:?}; stderr {}", text(&out.stderr));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let guest: i64 = lines[2].parse().unwrap();
        assert!((now - guest).abs() < 120, "guest clock {guest}, host {now}");
        (lines, r)
    };
    let templates = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(cache.join("warm"))
            .map(|d| {
                d.map(|e| e.unwrap().path())
                    .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    };

    // First use: a boot, and a template of it.
    let (l1, r1) = run(&["--volume", "A", "-e", "X=1"]);
    assert_eq!((l1[0].as_str(), l1[1].as_str()), ("from-a", "1"));
    assert_eq!(r1["warm"], false, "{r1}");
    let t = templates();
    assert_eq!(t.len(), 1, "{t:?}");
    for f in ["sandbox.json", "state.bin", "memory.bin"] {
        assert!(t[0].join(f).is_file(), "{} lacks {f}", t[0].display());
    }
    // Next runs: warm, each with its own volume directory and environment, and entropy of
    // its own although all continue the same saved generator state.
    let (l2, r2) = run(&["--volume", "B", "-e", "X=2"]);
    assert_eq!(r2["warm"], true, "{r2}");
    assert_eq!((l2[0].as_str(), l2[1].as_str()), ("from-b", "2"));
    let (l3, r3) = run(&["--volume", "A", "-e", "X=3"]);
    assert_eq!(r3["warm"], true, "{r3}");
    assert_eq!((l3[0].as_str(), l3[1].as_str()), ("from-a", "3"));
    assert_ne!(
        l2[3], l3[3],
        "two warm starts read the same /dev/urandom bytes"
    );
    assert_ne!(l1[3], l2[3]);
    // --cold boots; another configuration gets its own template.
    let (l4, r4) = run(&["--cold", "--volume", "B"]);
    assert_eq!(r4["warm"], false, "{r4}");
    assert_eq!(l4[0], "from-b");
    let (_, r5) = run(&["--memory", "256", "--volume", "B"]);
    assert_eq!(r5["warm"], false, "{r5}");
    assert_eq!(templates().len(), 2);
    // A broken template: that run boots (and says why), the next is warm again.
    let state = t[0].join("state.bin");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (l6, r6) = run(&["--volume", "A"]);
    assert_eq!(r6["warm"], false, "{r6}");
    assert_eq!(l6[0], "from-a");
    let (_, r7) = run(&["--volume", "B"]);
    assert_eq!(r7["warm"], true, "{r7}");
    std::fs::remove_dir_all(&base).unwrap();
}

/// Kills the child when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The reference registry (Debian's docker-registry) on a free loopback port, its data under
/// `base`; its address.
fn loopback_registry(base: &Path) -> (KillOnDrop, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    std::fs::write(
        base.join("registry.yml"),
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            base.join("registry").display()
        ),
    )
    .unwrap();
    let registry = KillOnDrop(
        Command::new("docker-registry")
            .arg("serve")
            .arg(base.join("registry.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry is installed (./x test installs it)"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the registry did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (registry, addr)
}

/// `skopeo copy oci:LAYOUT:TAG docker://DEST`.
fn push(layout: &Path, tag: &str, dest: &str) {
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .expect("skopeo is installed (./x test installs it)");
    assert!(out.status.success(), "skopeo: {}", text(&out.stderr));
}

/// A distribution image from the registry: the Debian tree as a gzip layer plus a layer that
/// adds a user, pulled by `run` and running python3 with the image's Env, WorkingDir and User.
#[test]
fn a_debian_image_from_the_registry_runs_python() {
    // Packs, pushes, pulls and unpacks the whole Debian root, then walks it: about 4 minutes
    // alone in the L2 VM, more than 9 beside the other Debian-root tests.
    let _w = watchdog_for(
        "a_debian_image_from_the_registry_runs_python",
        Duration::from_secs(900),
    );
    check_host();
    let root = match msb_vmm::assets::default_root() {
        msb_vmm::assets::DefaultRoot::Dir(d) => d,
        _ => panic!("no default Debian root: run ./x setup"),
    };
    let base = std::env::temp_dir().join(format!("msb-e2e-debian-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let layout = base.join("layout");
    let st = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/make_image.py"
        ))
        .arg("--debian")
        .arg(&layout)
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success(), "make_image.py --debian failed");
    let (_registry, addr) = loopback_registry(&base);
    let image = format!("{addr}/test/debian:12");
    push(&layout, "12", &image);
    // `msb-vmm run IMAGE -- sh -c SCRIPT` with this test's cache.
    let run = |image: &str, script: &str| {
        Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
            .args(["run", "--net", "none", image, "--", "sh", "-c", script])
            .env("MSB_CACHE_DIR", base.join("cache"))
            .env("MSB_STATE_DIR", state_dir())
            .env("MSB_KERNEL", msb_vmm::assets::default_kernel())
            .env("MSB_INIT", msb_vmm::assets::msb_init())
            .env("MSB_BUSYBOX", msb_vmm::assets::busybox())
            .output()
            .unwrap()
    };
    // The whole tree walked first: every file a lookup, more than a hard limit of 4096 fds
    // allowed the file server before it raised it (the walk failed after ~2900 files).
    let out = run(
        &image,
        // As the image's user: directories only root may read are the one expected error.
        "n=$(find / -xdev 2>/tmp/find.err | wc -l); echo \"walked $n\" >&2; \
         grep -v 'Permission denied' /tmp/find.err >&2; \
         python3 -c \"import os; print(os.environ['GREETING'], os.getcwd(), os.getuid(), open('data').read().strip())\"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "hello-from-debian /srv/app 1000 from-debian-image\n",
        "{}",
        text(&out.stderr)
    );
    let err = text(&out.stderr);
    assert!(!err.contains("find:"), "the walk failed: {err}");
    let walked: usize = err
        .lines()
        .find_map(|l| l.strip_prefix("walked ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count from find: {err}"));
    assert!(walked > 9000, "the Debian tree has more entries: {walked}");

    // The Debian layer alone: one layer without whiteouts is served as its own root. The
    // guest sees the owners and modes the tar recorded and writes into its own overlay, never
    // into the shared layer.
    let one = format!("{addr}/test/debian:base");
    push(&layout, "base", &one);
    let out = run(
        &one,
        "stat -c '%U %a' /usr/bin/passwd /etc/shadow && stat -c %U / && \
         touch /written-in-the-guest && id -u",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "root 4755\nroot 640\nroot\n0\n",
        "{}",
        text(&out.stderr)
    );
    let layers = base.join("cache/images/layers");
    let dirs: Vec<_> = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(dirs.len(), 2, "the Debian layer and the upper one");
    for d in dirs {
        assert!(
            !d.path().join("written-in-the-guest").exists(),
            "a guest write reached the shared layer {}",
            d.path().display()
        );
    }
    assert!(
        !base
            .join("cache/images/roots")
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().path().join("written-in-the-guest").exists()),
        "a guest write reached a merged root"
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// `msb-vmm run IMAGE -- CMD` from the reference registry on loopback: the image's Env,
/// WorkingDir, User, whiteouts and owners reach the guest; flags override them as with
/// `docker run`; an image with an Entrypoint runs without a command; `start --image` gives
/// `exec` the image's settings; two sandboxes of one image do not see each other's writes.
#[test]
fn images_from_a_loopback_registry_run_with_their_settings() {
    let _w = watchdog("images_from_a_loopback_registry_run_with_their_settings");
    check_host();
    // The cache needs user xattrs (/tmp; the L2 VM's 9p passes them through); sandbox sockets
    // go on /dev/shm.
    let base = std::env::temp_dir().join(format!("msb-e2e-images-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let cache = base.join("cache");
    let layout = base.join("layout");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/make_image.py");
    let busybox = msb_vmm::assets::busybox();
    let st = Command::new("python3")
        .arg(script)
        .arg(&layout)
        .arg(&busybox)
        .status()
        .unwrap();
    assert!(st.success(), "make_image.py failed");

    let (_registry, addr) = loopback_registry(&base);
    for tag in ["plain", "entry"] {
        push(&layout, tag, &format!("{addr}/test/busy:{tag}"));
    }
    let state = state_dir().with_file_name(format!("msb-e2e-images-state-{}", std::process::id()));
    let cli = |args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
            .args(args)
            .env("MSB_CACHE_DIR", &cache)
            .env("MSB_STATE_DIR", &state)
            .env("MSB_KERNEL", msb_vmm::assets::default_kernel())
            .env("MSB_INIT", msb_vmm::assets::msb_init())
            .env("MSB_BUSYBOX", &busybox)
            .output()
            .unwrap()
    };
    let plain = format!("{addr}/test/busy:plain");
    let probe = "echo $GREETING; pwd; id -u; cat data; test -e /etc/motd && echo motd || echo no-motd; stat -c %U:%a /app";

    // First use pulls, says so, and runs with the image's settings.
    let out = cli(&["run", &plain, "--", "sh", "-c", probe]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "hello-from-image\n/app\n1000\nfrom-image\nno-motd\napp:755\n"
    );
    assert!(
        text(&out.stderr).contains("pulling"),
        "{}",
        text(&out.stderr)
    );
    // Flags win over the image, as with docker run; a cached image pulls nothing.
    let out = cli(&[
        "run",
        "-e",
        "GREETING=flag",
        "-w",
        "/",
        "-u",
        "0",
        &plain,
        "--",
        "sh",
        "-c",
        "echo $GREETING; pwd; id -u; echo $PATH",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "flag\n/\n0\n/bin\n");
    assert!(
        !text(&out.stderr).contains("pulling"),
        "{}",
        text(&out.stderr)
    );
    // An Entrypoint and a Cmd: no command needed.
    let out = cli(&["run", "--image", &format!("{addr}/test/busy:entry")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "entry hello-from-image\n1000\n");
    // Without one, a missing command is one clear line.
    let out = cli(&["run", "--image", &plain]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("give a command"),
        "{}",
        text(&out.stderr)
    );

    // Two named sandboxes of one image: exec gets the image's settings, writes stay apart.
    for n in ["img-a", "img-b"] {
        let out = cli(&["start", "--name", n, "--image", &plain]);
        assert!(out.status.success(), "start {n}: {}", text(&out.stderr));
    }
    let out = cli(&[
        "exec",
        "img-a",
        "sh",
        "-c",
        "echo a > mine; pwd; id -u; echo $GREETING",
    ]);
    assert_eq!(
        text(&out.stdout),
        "/app\n1000\nhello-from-image\n",
        "{}",
        text(&out.stderr)
    );
    let out = cli(&["exec", "img-b", "cat", "/app/mine"]);
    assert!(!out.status.success(), "img-b sees img-a's file");
    let out = cli(&["exec", "img-a", "cat", "/app/mine"]);
    assert_eq!(text(&out.stdout), "a\n");
    // The root of running sandboxes is not removed from under them.
    let out = cli(&["rmi", &plain]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("in use by running sandbox"),
        "{}",
        text(&out.stderr)
    );
    for n in ["img-a", "img-b"] {
        let _ = cli(&["stop", n]);
    }
    let out = cli(&["images"]);
    assert!(text(&out.stdout).contains(&plain), "{}", text(&out.stdout));
    let out = cli(&["rmi", &plain]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&base);
    let _ = std::fs::remove_dir_all(&state);
}
