//! The CLI's handling of user mistakes: one line naming the fix, a non-zero exit code. Runs on
//! any host with /dev/kvm (PVM included); the permission test needs `unshare --user`.

use std::process::{Command, Output};

fn msb_vmm(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_msb-vmm"));
    c.args(args).env_remove("MSB_ALLOW_PVM");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("msb-vmm runs")
}

/// Asserts `out` failed with `code` and exactly one stderr line containing `needle`.
fn one_line_error(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    assert!(err.contains(needle), "{needle:?} not in: {err}");
}

fn stub() -> &'static str {
    msb_test_guests::stub().to_str().unwrap()
}

#[test]
fn unknown_flag() {
    one_line_error(
        &msb_vmm(&["boot", "--kernel", stub(), "--frobnicate"], &[]),
        2,
        "unexpected argument '--frobnicate'",
    );
    one_line_error(
        &msb_vmm(&["run", "--cpus", "many", "--", "true"], &[]),
        2,
        "invalid value 'many'",
    );
    one_line_error(
        &msb_vmm(&["launch"], &[]),
        2,
        "unrecognized subcommand 'launch'",
    );
}

#[test]
fn missing_and_wrong_kernels() {
    one_line_error(
        &msb_vmm(&["boot", "--kernel", "/nonexistent/vmlinux"], &[]),
        125,
        "no such file",
    );
    let dir = std::env::temp_dir().join(format!("msb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bz = dir.join("bzImage");
    std::fs::write(&bz, [b"MZ".as_slice(), &[0u8; 4096]].concat()).unwrap();
    one_line_error(
        &msb_vmm(&["boot", "--kernel", bz.to_str().unwrap()], &[]),
        125,
        "not an ELF image",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn too_little_memory_and_bad_cpus() {
    // One range whichever end is missed, and its low end is accepted.
    let range = |mem: &str| {
        let out = msb_vmm(&["boot", "--kernel", stub(), "--memory", mem], &[]);
        one_line_error(&out, 125, &format!("--memory {mem} MiB is out of range"));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        err.split_once(": use ").unwrap().1.trim().to_string()
    };
    let low = range("4");
    assert_eq!(low, range("99999999"));
    assert_eq!(low, range("18446744073709551615"));
    let min = low.split_whitespace().next().unwrap();
    let ok = msb_vmm(&["boot", "--kernel", stub(), "--memory", min], &[]);
    assert!(
        ok.status.success(),
        "--memory {min}: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    one_line_error(
        &msb_vmm(&["boot", "--kernel", stub(), "--cpus", "65"], &[]),
        125,
        "--cpus 65 is out of range",
    );
}

/// An unknown flag before the command is refused, as `docker run` does, not run as the
/// command; after `--` (or after the command's first word) flags are the command's.
#[test]
fn unknown_flags_before_the_command_are_refused() {
    for sub in [&["run"][..], &["exec", "box"][..]] {
        let mut args = sub.to_vec();
        args.extend(["--bogus", "--", "echo", "hi"]);
        let out = msb_vmm(&args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--bogus'"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Flags after the command's first word belong to it (refused here only for PVM).
    let out = msb_vmm(&["run", "ls", "-la"], &[("MSB_HOST_PVM", "1")]);
    one_line_error(&out, 125, "is PVM");
}

#[test]
fn pvm_host_refuses_run_at_once() {
    let out = msb_vmm(&["run", "--", "true"], &[("MSB_HOST_PVM", "1")]);
    one_line_error(&out, 125, "is PVM");
    assert!(String::from_utf8_lossy(&out.stderr).contains("README"));
}

#[test]
fn no_permission_on_dev_kvm() {
    // Run as `nobody` without supplementary groups: /dev/kvm is root/kvm-only on every distro
    // that does not make it world-writable. Dropping to nobody needs root (CI runs as root).
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            env!("CARGO_BIN_EXE_msb-vmm"),
            "boot",
            "--kernel",
            stub(),
        ])
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    let err = String::from_utf8_lossy(&out.stderr);
    if err.starts_with("setpriv:") {
        panic!("this test switches to the nobody user and needs root: {err}");
    }
    let world_rw = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006)
        .unwrap_or(false);
    if world_rw {
        panic!("/dev/kvm is world-read/writable here, so the permission error cannot be provoked");
    }
    one_line_error(&out, 125, "no permission to open /dev/kvm");
}

#[test]
fn stub_boot_succeeds_and_reports() {
    let report = std::env::temp_dir().join(format!("msb-cli-report-{}.json", std::process::id()));
    let out = msb_vmm(
        &[
            "boot",
            "--kernel",
            stub(),
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    std::fs::remove_file(&report).unwrap();
    assert_eq!(r["exit_code"], 0);
    assert!(r["boot_time_us"].as_u64().unwrap() > 0);
}

#[test]
fn missing_root_file_systems() {
    let env = [
        ("MSB_ALLOW_PVM", "1"),
        ("MSB_ROOTFS", "/nonexistent/root"),
        ("MSB_KERNEL", stub()),
    ];
    one_line_error(
        &msb_vmm(&["run", "--", "true"], &env),
        125,
        "run ./x setup to build it",
    );
    one_line_error(
        &msb_vmm(&["run", "--rootfs", "/nonexistent/dir", "--", "true"], &env),
        125,
        "--rootfs /nonexistent/dir",
    );
}

/// The stub kernel and the initramfs root, allowed on PVM: errors found before any boot.
fn stub_env() -> [(&'static str, &'static str); 3] {
    [
        ("MSB_ALLOW_PVM", "1"),
        ("MSB_ROOTFS", "initramfs"),
        ("MSB_KERNEL", stub()),
    ]
}

#[test]
fn network_policy_mistakes() {
    let env = stub_env();
    one_line_error(
        &msb_vmm(&["run", "--net", "pubic", "--", "true"], &env),
        125,
        "unknown network preset \"pubic\"",
    );
    one_line_error(
        &msb_vmm(&["run", "--allow", "tcp:x.com:http", "--", "true"], &env),
        125,
        "bad rule \"tcp:x.com:http\"",
    );
    let policy = std::env::temp_dir().join(format!("msb-cli-policy-{}.toml", std::process::id()));
    std::fs::write(&policy, "preset = \"public\"\n\nalow = [\"x.com\"]\n").unwrap();
    let out = msb_vmm(
        &["run", "--policy", policy.to_str().unwrap(), "--", "true"],
        &env,
    );
    let _ = std::fs::remove_file(&policy);
    one_line_error(&out, 125, ".toml:3: unknown field `alow`");
    one_line_error(
        &msb_vmm(&["run", "--mtu", "65521", "--", "true"], &env),
        125,
        "--mtu 65521: use 68 to 65520",
    );
}

#[test]
fn publish_mistakes_are_caught_before_boot() {
    let env = stub_env();
    one_line_error(
        &msb_vmm(&["run", "--publish", "80", "--", "true"], &env),
        125,
        "--publish 80: use [HOSTIP:]HOSTPORT:GUESTPORT[/udp]",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    one_line_error(
        &msb_vmm(
            &["run", "--publish", &format!("{port}:80"), "--", "true"],
            &env,
        ),
        125,
        &format!("cannot listen on 127.0.0.1:{port}"),
    );
}

/// `msb-vmm ca`: made once (0700 directory, 0600 key), the same certificate on every call,
/// a new one with `--regenerate`, and a key others can read refused with the fix named.
#[test]
fn the_sandbox_ca_is_made_once_kept_private_and_regenerated_on_request() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("msb-cli-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let env = [("MSB_CA_DIR", dir.to_str().unwrap())];
    let first = msb_vmm(&["ca"], &env);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let pem = String::from_utf8(first.stdout).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "{pem}");
    assert!(String::from_utf8_lossy(&first.stderr).contains("made a new sandbox CA"));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    let again = msb_vmm(&["ca"], &env);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), pem);
    assert!(again.stderr.is_empty());
    let new = msb_vmm(&["ca", "--regenerate"], &env);
    assert!(new.status.success());
    assert_ne!(String::from_utf8(new.stdout).unwrap(), pem);
    std::fs::set_permissions(
        dir.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    one_line_error(&msb_vmm(&["ca"], &env), 125, "chmod 600");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Secret and interception mistakes: one line naming the fix, before boot; a value is never
/// taken from the command line.
#[test]
fn secret_mistakes_are_caught_before_boot() {
    let env = stub_env();
    one_line_error(
        &msb_vmm(
            &[
                "run",
                "--secret",
                "MSB_TEST_UNSET_VAR=api.test",
                "--",
                "true",
            ],
            &env,
        ),
        125,
        "the environment variable MSB_TEST_UNSET_VAR is not set",
    );
    one_line_error(
        &msb_vmm(&["run", "--secret", "KEY", "--", "true"], &env),
        125,
        "--secret KEY: use NAME=HOSTS",
    );
    let mut with_value = env.to_vec();
    with_value.push(("MSB_TEST_KEY", "v"));
    one_line_error(
        &msb_vmm(
            &["run", "--secret", "MSB_TEST_KEY=not a host", "--", "true"],
            &with_value,
        ),
        125,
        "bad host \"not a host\"",
    );
    one_line_error(
        &msb_vmm(
            &[
                "run",
                "--secret-file",
                "K=/nonexistent/key=api.test",
                "--",
                "true",
            ],
            &env,
        ),
        125,
        "--secret-file K: /nonexistent/key",
    );
    one_line_error(
        &msb_vmm(
            &[
                "run",
                "--tls-intercept",
                "--on-violation",
                "maybe",
                "--",
                "true",
            ],
            &env,
        ),
        125,
        "--on-violation maybe: use block or log",
    );
    one_line_error(
        &msb_vmm(
            &[
                "run",
                "--tls-upstream-ca",
                "/nonexistent.pem",
                "--tls-intercept",
                "--",
                "true",
            ],
            &env,
        ),
        125,
        "--tls-upstream-ca /nonexistent.pem: no such file",
    );
    let policy = std::env::temp_dir().join(format!("msb-cli-secret-{}.toml", std::process::id()));
    std::fs::write(
        &policy,
        "\n[[secret]]\nname = \"MSB_TEST_UNSET_VAR\"\nhosts = [\"api.test\"]\n",
    )
    .unwrap();
    let out = msb_vmm(
        &["run", "--policy", policy.to_str().unwrap(), "--", "true"],
        &env,
    );
    let _ = std::fs::remove_file(&policy);
    one_line_error(&out, 125, ".toml:2: secret MSB_TEST_UNSET_VAR: the environment variable MSB_TEST_UNSET_VAR is not set");
}

/// A state directory where no Unix socket can be bound (here: a path too long for one; on 9p
/// or NFS mounts, the file system) is one line naming MSB_STATE_DIR, before anything starts.
#[test]
fn a_state_directory_without_sockets_is_named() {
    let dir = std::env::temp_dir()
        .join(format!("msb-cli-state-{}", std::process::id()))
        .join("x".repeat(100));
    let out = msb_vmm(
        &["start", "--name", "box"],
        &[("MSB_STATE_DIR", dir.to_str().unwrap())],
    );
    one_line_error(&out, 125, "cannot hold Unix sockets");
    assert!(String::from_utf8_lossy(&out.stderr).contains("MSB_STATE_DIR"));
    assert!(!dir.join("box").exists(), "nothing left behind");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn stats_and_policy_of_an_unknown_sandbox_or_with_bad_flags() {
    let dir = std::env::temp_dir().join(format!("msb-cli-stats-{}", std::process::id()));
    let env = [("MSB_STATE_DIR", dir.to_str().unwrap())];
    one_line_error(
        &msb_vmm(&["stats", "nosuch"], &env),
        125,
        "no sandbox named nosuch",
    );
    one_line_error(
        &msb_vmm(&["policy", "nosuch", "--allow", "tcp:x:1"], &env),
        125,
        "no sandbox named nosuch",
    );
    one_line_error(
        &msb_vmm(&["stats", "Bad Name"], &env),
        125,
        "invalid sandbox name",
    );
    one_line_error(
        &msb_vmm(&["stats", "box", "--watch", "0"], &env),
        2,
        "positive number of seconds",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn learn_mode_mistakes() {
    let env = stub_env();
    one_line_error(
        &msb_vmm(&["run", "--suggest-to", "/tmp/x.toml", "--", "true"], &env),
        125,
        "add --net learn",
    );
    one_line_error(
        &msb_vmm(
            &[
                "start",
                "--name",
                "box",
                "--net",
                "learn",
                "--suggest-to",
                "/tmp/x.toml",
            ],
            &env,
        ),
        125,
        "msb-vmm policy NAME --suggest",
    );
    one_line_error(
        &msb_vmm(&["policy", "box", "--suggest", "--allow", "x"], &env),
        2,
        "cannot be used with",
    );
}

#[test]
fn limit_mistakes() {
    let env = stub_env();
    one_line_error(
        &msb_vmm(&["run", "--pids-limit", "3", "--", "true"], &env),
        125,
        "--pids-limit 3: use at least 8",
    );
    one_line_error(
        &msb_vmm(&["run", "--memory-limit", "lots", "--", "true"], &env),
        125,
        "--memory-limit lots",
    );
    one_line_error(
        &msb_vmm(&["run", "--net-rate", "fast", "--", "true"], &env),
        125,
        "--net-rate \"fast\": use [IN]/[OUT]",
    );
    one_line_error(
        &msb_vmm(&["start", "--name", "b", "--egress-budget", "0"], &env),
        125,
        "--egress-budget 0",
    );
    one_line_error(
        &msb_vmm(&["start", "--name", "b", "--memory-limit", "1k"], &env),
        125,
        "at least 4m",
    );
    one_line_error(
        &msb_vmm(&["run", "--fs-rate", "5/", "--", "true"], &env),
        125,
        "--fs-rate \"5/\": use OPS/BYTES",
    );
    one_line_error(
        &msb_vmm(&["start", "--name", "b", "--fs-rate", "100"], &env),
        125,
        "at least 10 requests and 1m",
    );
    one_line_error(
        &msb_vmm(&["start", "--name", "b", "--idle-timeout", "soon"], &env),
        2,
        "is not a number of seconds",
    );
}
