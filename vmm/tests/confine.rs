//! Test tier 2: the VMM's threads run confined (msb-confine), and a forbidden system call in
//! one of them stops the VMM with one line naming the thread, its filter and the call. Tiny
//! test guests on this host's /dev/kvm, PVM included; without /dev/kvm these tests fail with
//! the reason (they never skip).

use std::process::Command;
use std::time::{Duration, Instant};

use msb_test_guests as guests;
use msb_vmm::vm::{Console, VmBuilder};

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "tier-2 tests need read/write access to /dev/kvm ({e}); run them on a host with KVM"
        );
    }
}

/// `(thread name, Seccomp, NoNewPrivs, CapEff)` of every thread of this process.
fn threads() -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // exited meanwhile
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp:"),
            field("NoNewPrivs:"),
            field("CapEff:"),
        ));
    }
    out
}

#[test]
fn every_thread_of_a_running_vm_is_confined() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("msb-confine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let b = VmBuilder::new(guests::hang())
        .cpus(2)
        .console(Console::Off)
        .vsock_uds(dir.join("vsock.sock"));
    let stop = b.stop_handle();
    let vm = b.start().unwrap();
    // The VM's threads confine themselves as they start; give them a moment to.
    let wanted = [
        "vcpu0",
        "vcpu1",
        "vmm-events",
        "vsock-hybrid",
        "vmm-launcher",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let ours: Vec<_> = threads()
            .into_iter()
            .filter(|t| wanted.contains(&t.0.as_str()))
            .collect();
        if ours.len() == wanted.len() && ours.iter().all(|t| t.1 == "2") {
            break ours;
        }
        assert!(
            Instant::now() < deadline,
            "VM threads not all confined: {ours:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    stop.stop();
    vm.wait();
    let _ = std::fs::remove_dir_all(&dir);
    for (name, seccomp, nnp, caps) in seen {
        assert_eq!(seccomp, "2", "{name}: seccomp filter mode");
        assert_eq!(nnp, "1", "{name}: no_new_privs");
        assert_eq!(caps, "0000000000000000", "{name}: effective capabilities");
    }
}

/// Boots the hanging guest with `msb-vmm boot`, asking the thread kind `kind` to make a
/// forbidden call once confined; returns the exit code and stderr.
fn probe(kind: &str, timeout_secs: u32, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
        .args(["boot", "--timeout", &timeout_secs.to_string(), "--kernel"])
        .arg(guests::hang())
        .args(extra)
        .env(msb_confine::PROBE_ENV, kind)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn a_forbidden_call_in_a_vcpu_the_event_loop_or_the_launcher_stops_the_vmm_naming_it() {
    require_kvm();
    for (kind, thread) in [
        ("vcpu", "vcpu0"),
        ("events", "vmm-events"),
        ("launcher", "vmm-launcher"),
    ] {
        let (code, stderr) = probe(kind, 30, &[]);
        assert_eq!(code, Some(msb_confine::EXIT_CODE), "{kind}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("seccomp")).collect();
        assert_eq!(lines.len(), 1, "{kind}: one line: {stderr}");
        assert!(
            lines[0].contains(&format!("thread '{thread}' ({kind} filter)"))
                && lines[0].contains("forbidden system call execve (59)")
                && lines[0].contains("--no-seccomp"),
            "{kind}: {}",
            lines[0]
        );
    }
}

#[test]
fn no_seccomp_runs_unfiltered_for_debugging() {
    require_kvm();
    // The probe's execve(NULL) then fails with EFAULT and the guest runs to its timeout.
    let (code, stderr) = probe("vcpu", 1, &["--no-seccomp"]);
    assert_eq!(code, Some(124), "{stderr}");
    assert!(!stderr.contains("seccomp stopped"), "{stderr}");
}

#[test]
fn a_jailed_vmm_sees_only_what_it_needs_in_its_own_namespaces() {
    require_kvm();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "--jail needs root: run the tier-2 tests as root");
    let dir = std::env::temp_dir().join(format!("msb-jail-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let vmm = Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
        .args(["boot", "--timeout", "3", "--jail-max-file", "1m", "--jail"])
        .arg(&dir)
        .arg("--kernel")
        .arg(guests::hang())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let parent = vmm.id();
    // The jailed child: the parent's only child, once its vCPU runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    let child = loop {
        let kids = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        let threads = kids
            .split_whitespace()
            .next()
            .and_then(|c| std::fs::read_dir(format!("/proc/{c}/task")).ok())
            .map_or(0, |d| d.count());
        if threads >= 3 {
            break kids.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no jailed VMM appeared");
        std::thread::sleep(Duration::from_millis(10));
    };
    let root = format!("/proc/{child}/root");
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for absent in ["usr", "bin", "home", "var", "boot", "lib"] {
        assert!(
            !top.iter().any(|t| t == absent),
            "/{absent} in the jail: {top:?}"
        );
    }
    assert!(std::path::Path::new(&format!("{root}/dev/kvm")).exists());
    assert!(std::path::Path::new(&format!("{root}{}", guests::hang().display())).exists());
    // The host's own files beside the kernel are not there.
    assert!(!std::path::Path::new(&format!("{root}/etc/passwd")).exists());
    let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "{nspid}");
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    for kind in ["mnt", "pid_for_children", "ipc", "uts"] {
        let theirs = if kind == "pid_for_children" {
            "pid"
        } else {
            kind
        };
        assert_ne!(ns("self", theirs), ns(&child, theirs), "{kind} namespace");
    }
    let limits = std::fs::read_to_string(format!("/proc/{child}/limits")).unwrap();
    // fs.nr_open (at most 2^20: the shares hold an fd per file the guest looked up), or the
    // hard limit we have where raising it is not ours to do (no CAP_SYS_RESOURCE).
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        .min(1 << 20);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_sys_resource = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|eff| eff & (1 << 24) != 0);
    let ours = std::fs::read_to_string("/proc/self/limits").unwrap();
    let our_hard: u64 = ours
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let nofile = if cap_sys_resource {
        ceiling
    } else {
        ceiling.min(our_hard)
    };
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().nth(3) == Some(nofile.to_string().as_str())
            && l.split_whitespace().nth(4) == Some(nofile.to_string().as_str())),
        "want {nofile}: {limits}"
    );
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max file size") && l.contains("1048576")),
        "{limits}"
    );
    let out = vmm.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "the jail leaves nothing behind"
    );
    std::fs::remove_dir(&dir).unwrap();

    // A directory with something in it is refused before anything happens.
    std::fs::create_dir_all(dir.join("x")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_msb-vmm"))
        .args(["boot", "--jail"])
        .arg(&dir)
        .arg("--kernel")
        .arg(guests::hang())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("must be empty"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
