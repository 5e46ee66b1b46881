//! Test tier 4 for the shim: a real containerd (Debian's), started per test with a private
//! root, state directory and socket, `ctr` as the client, and real guests.
//!
//! Built only with `--features e2e`; on PVM hosts `./x test` runs this binary inside the L2
//! VM. Asked to run where it cannot, a test fails with the reason.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use msb_containerd_shim::harness::{busybox_root, PrivateContainerd};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-msb-v2");
const RUNTIME: &str = "io.containerd.msb.v2";

fn check_host() {
    if msb_vmm::host::is_pvm() {
        panic!("the shim's end-to-end tests boot the real kernel, which this PVM /dev/kvm cannot run; use `./x test`, which runs them inside the L2 VM");
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        panic!("the shim's end-to-end tests need /dev/kvm (read/write)");
    }
    let kernel = msb_vmm::assets::default_kernel();
    assert!(
        kernel.exists(),
        "no guest kernel at {}: run `./x setup` first",
        kernel.display()
    );
    for tool in ["containerd", "ctr", "unshare"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success(),
            "{tool} is missing: apt-get install containerd (./x test installs it)"
        );
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A private containerd ([`PrivateContainerd`]) with a busybox root for the containers.
struct Containerd {
    d: PrivateContainerd,
    dir: PathBuf,
    rootfs: PathBuf,
}

impl Containerd {
    fn start() -> Containerd {
        check_host();
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/dev/shm/msb-ctrd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let shim_dir = Path::new(SHIM).parent().unwrap();
        let d = PrivateContainerd::start(&dir, shim_dir, Path::new("containerd"))
            .unwrap_or_else(|e| panic!("{e}"));
        let rootfs = dir.join("rootfs");
        busybox_root(&rootfs, APPLETS).unwrap();
        std::fs::create_dir_all(rootfs.join("data")).unwrap();
        Containerd { d, dir, rootfs }
    }

    fn log(&self) -> String {
        self.d.log()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.d
            .ctr()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr runs")
    }

    /// `ctr run` of `cmd` through our shim on `root` (the busybox tree unless given), with
    /// extra flags before the rootfs.
    fn run(&self, flags: &[&str], root: Option<&Path>, id: &str, cmd: &[&str]) -> Output {
        let fifo = self.dir.join("fifo");
        let root = root.unwrap_or(&self.rootfs);
        let mut args = vec![
            "run",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--runtime",
            RUNTIME,
        ];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--rootfs", root.to_str().unwrap(), id]);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// Panics naming whatever of ours outlived the containers: shim processes, shim sockets,
    /// mounts, task directories.
    fn assert_nothing_left(&self) {
        // The shim exits shortly after containerd's last call.
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = self.d.pid();
        loop {
            let shims = self.d.shim_pids();
            let sockets: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root/run/containerd/s"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            let mounts: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(self.dir.to_str().unwrap()))
                .map(String::from)
                .collect();
            let tasks: Vec<_> =
                std::fs::read_dir(self.dir.join("state/io.containerd.runtime.v2.task/default"))
                    .map(|d| d.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default();
            let shares: Vec<_> = std::fs::read_dir(self.dir.join("run"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            if shims.is_empty()
                && sockets.is_empty()
                && mounts.is_empty()
                && tasks.is_empty()
                && shares.is_empty()
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "left behind: shim processes {shims:?}, sockets {sockets:?}, mounts {mounts:?}, task dirs {tasks:?}, pod shares {shares:?}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `ctr task exec` of `sh -c script` in container `id`.
    fn exec(&self, id: &str, exec_id: &str, script: &str) -> Output {
        let fifo = self.dir.join("fifo");
        self.ctr(&[
            "task",
            "exec",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--exec-id",
            exec_id,
            id,
            "sh",
            "-c",
            script,
        ])
    }

    /// `ctr task kill -s SIGNAL id`, then waits until the task shows as stopped.
    fn kill_and_wait(&self, id: &str, signal: &str) {
        let out = self.ctr(&["task", "kill", "-s", signal, id]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !text(&self.ctr(&["task", "ls"]).stdout).contains("STOPPED") {
            assert!(
                Instant::now() < deadline,
                "{id} did not stop: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn audit_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("logs/default/{id}.net.log")))
            .unwrap_or_default()
    }
}

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "true", "false", "sleep", "ls", "wget", "id", "touch", "hostname",
    "nproc", "grep", "dd",
];

/// A loopback HTTP server answering `body` to every request, on a free port.
fn http_server(body: &'static str) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let _ = write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

#[test]
fn ctr_run_prints_the_output_and_returns_the_exit_code() {
    let c = Containerd::start();
    let out = c.run(
        &["--rm", "--cpus", "2", "--memory-limit", "268435456"],
        None,
        "t1",
        &[
            "sh",
            "-c",
            "echo hello; echo oops >&2; nproc; grep MemTotal /proc/meminfo; id -u; exit 7",
        ],
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout: {stdout}\nstderr: {}\n{}",
        text(&out.stderr),
        c.log()
    );
    assert!(stdout.starts_with("hello\n"), "{stdout}");
    assert!(text(&out.stderr).contains("oops"), "{}", text(&out.stderr));
    // --cpus 2 and a 256 MiB limit size the sandbox.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[1], "2", "{stdout}");
    let kib: u64 = lines[2].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((150 << 10..=256 << 10).contains(&kib), "{stdout}");
    assert_eq!(lines[3], "0", "{stdout}");
    c.assert_nothing_left();
}

#[test]
fn exec_kill_and_delete_and_nothing_is_left() {
    let c = Containerd::start();
    let data = c.dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "from the host\n").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        data.display()
    );
    let out = c.run(&["-d", "--mount", &mount], None, "t2", &["sleep", "1000"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    // A second process in the container, with its own output and exit code; it sees the
    // read-only bind mount.
    let out = c.exec(
        "t2",
        "e1",
        "cat /data/f; touch /data/g || echo read-only; exit 3",
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        text(&out.stderr),
        c.log()
    );
    assert_eq!(text(&out.stdout), "from the host\nread-only\n");
    assert!(!data.join("g").exists());
    // A process the guest's OOM killer ends: 137, and containerd hears `/tasks/oom` (the CRI
    // then gives the container the reason OOMKilled). Its buffer is all the guest's memory
    // but 2 MiB: allowed (the kernel overcommits up to its total), more than is free.
    let mut events =
        c.d.ctr()
            .arg("events")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events runs");
    let out = c.exec(
        "t2",
        "e-oom",
        "set -- $(grep MemTotal /proc/meminfo); \
         dd if=/dev/zero of=/dev/null bs=$((($2 - 2048) * 1024)) count=1",
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}\n{}",
        text(&out.stderr),
        c.log()
    );
    let _ = events.kill();
    let seen = events.wait_with_output().expect("ctr events output");
    let seen = text(&seen.stdout);
    assert!(
        seen.lines()
            .any(|l| l.contains("/tasks/oom") && l.contains("\"t2\"")),
        "no /tasks/oom event for t2 in:\n{seen}"
    );
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    assert!(ls.contains("t2") && ls.contains("RUNNING"), "{ls}");
    // Pause stops the whole sandbox; resume lets it go on; metrics come from the sandbox.
    let out = c.ctr(&["task", "pause", "t2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    assert!(ls.contains("PAUSED"), "{ls}");
    let out = c.ctr(&["task", "resume", "t2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = c.ctr(&["task", "metrics", "t2"]);
    let m = text(&out.stdout);
    assert!(
        m.contains("pids.current") && m.contains("memory.usage_in_bytes"),
        "{m}\n{}",
        text(&out.stderr)
    );
    c.kill_and_wait("t2", "TERM");
    // SIGTERM: 128 + 15.
    let out = c.ctr(&["task", "delete", "t2"]);
    assert!(
        text(&out.stderr).contains("exit code 143"),
        "{}",
        text(&out.stderr)
    );
    let out = c.ctr(&["container", "delete", "t2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.assert_nothing_left();
}

#[test]
fn egress_annotations_set_the_policy_and_a_denied_flow_is_audited() {
    let c = Containerd::start();
    let open = http_server("open");
    let shut = http_server("shut");
    let allow = format!("io.msb-vmm.network.allow=tcp:host:{open},tcp:host:{shut}");
    let deny = format!("io.msb-vmm.network.deny=tcp:host:{shut}");
    let out = c.run(
        &["--rm", "--annotation", &allow, "--annotation", &deny],
        None,
        "t3",
        &[
            "sh",
            "-c",
            &format!(
                "wget -q -O - http://10.0.2.2:{open}/; echo; \
                 wget -q -O - http://10.0.2.2:{shut}/ || echo denied"
            ),
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "open\ndenied\n",
        "stderr: {}\n{}",
        text(&out.stderr),
        c.log()
    );
    let log = c.audit_log("t3");
    let denied = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["kind"] == "flow" && v["verdict"] == "denied")
        .unwrap_or_else(|| panic!("no denied flow in the audit log: {log:?}"));
    assert_eq!(
        denied["rule"],
        format!("--deny tcp:host:{shut}"),
        "{denied}"
    );
    c.assert_nothing_left();
}

#[test]
fn bundles_we_cannot_run_get_one_clear_error_and_leave_nothing() {
    let c = Containerd::start();
    let missing = c.dir.join("no-such-root");
    let cases: Vec<(Vec<&str>, Option<&Path>, &str)> = vec![
        (vec![], Some(&missing), "no such directory"),
        (
            vec!["--annotation", "io.msb-vmm.network.bogus=1"],
            None,
            "annotation io.msb-vmm.network.bogus: unknown",
        ),
        (
            vec!["--annotation", "io.msb-vmm.network.preset=everything"],
            None,
            "io.msb-vmm.network",
        ),
        (vec!["--net-host"], None, "host networking"),
        (vec!["--privileged"], None, "privileged"),
        (vec!["--device", "/dev/null"], None, "device /dev/null"),
    ];
    for (i, (flags, root, want)) in cases.iter().enumerate() {
        let id = format!("bad{i}");
        let mut f = vec!["--rm"];
        f.extend(flags.iter().copied());
        let out = c.run(&f, *root, &id, &["true"]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(want), "{flags:?}: want {want:?} in {err}");
        // ctr leaves the container record when create fails; its task is what we made.
        let _ = c.ctr(&["container", "delete", &id]);
    }
    c.assert_nothing_left();
}

/// `sha256sum FILE`, hex.
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// An OCI image archive (`ctr image import` takes it) of the busybox tree as one layer,
/// named `name`.
fn oci_archive(root: &Path, work: &Path, name: &str) -> PathBuf {
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer = work.join("layer.tar");
    let ok = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(root)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    let put = |data: &[u8]| -> (String, usize) {
        let f = work.join("blob");
        std::fs::write(&f, data).unwrap();
        let d = sha256(&f);
        std::fs::rename(&f, blobs.join(&d)).unwrap();
        (d, data.len())
    };
    let (layer_digest, layer_size) = put(&std::fs::read(&layer).unwrap());
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]}
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_digest}"), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer_digest}"), "size": layer_size}]
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": "test"}}]
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = work.join("image.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    archive
}

#[test]
fn an_image_root_comes_from_the_snapshotter_mounts() {
    let c = Containerd::start();
    let work = c.dir.join("image-work");
    std::fs::create_dir_all(&work).unwrap();
    let name = "docker.io/msb/busybox:test";
    let archive = oci_archive(&c.rootfs, &work, name);
    let out = c.ctr(&["image", "import", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    let fifo = c.dir.join("fifo");
    // overlayfs: containerd's default snapshotter, an overlay mount with lowerdir, upperdir
    // and workdir; native: a bind mount of a copied tree.
    for (i, snapshotter) in ["overlayfs", "native"].iter().enumerate() {
        let id = format!("img{i}");
        let out = c.ctr(&[
            "run",
            "--rm",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--runtime",
            RUNTIME,
            "--snapshotter",
            snapshotter,
            name,
            &id,
            "sh",
            "-c",
            "ls /mine 2>/dev/null; echo $((6 * 7)) > /mine; cat /mine",
        ]);
        // Each container writes to its own snapshot: the first one's file is not the
        // image's.
        assert_eq!(
            text(&out.stdout),
            "42\n",
            "{snapshotter}: {}\n{}",
            text(&out.stderr),
            c.log()
        );
    }
    c.assert_nothing_left();
}

#[test]
fn containers_with_one_sandbox_id_share_one_sandbox() {
    let c = Containerd::start();
    let pod = "io.kubernetes.cri.sandbox-id=pod1";
    // The pod's first container (the pause container under Kubernetes) boots the sandbox,
    // sized by the pod's summed limits as CRI annotates them: 2 CPUs, 384 MiB.
    let out = c.run(
        &[
            "-d",
            "--annotation",
            pod,
            "--annotation",
            "io.kubernetes.cri.sandbox-cpu-quota=200000",
            "--annotation",
            "io.kubernetes.cri.sandbox-cpu-period=100000",
            "--annotation",
            "io.kubernetes.cri.sandbox-memory=402653184",
        ],
        None,
        "first",
        &["sleep", "1000"],
    );
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    let out = c.exec("first", "size", "nproc; grep MemTotal /proc/meminfo");
    let size = text(&out.stdout);
    let mut lines = size.lines();
    assert_eq!(lines.next(), Some("2"), "{size}{}", text(&out.stderr));
    let kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {size:?}"));
    // The kernel keeps some of the 384 MiB for itself; the default is far larger.
    assert!((300 << 10..=384 << 10).contains(&kib), "MemTotal {kib} kB");
    // A second container with a root of its own joins it.
    let second = c.dir.join("second-root");
    busybox_root(&second, APPLETS).unwrap();
    std::fs::write(second.join("who"), "second\n").unwrap();
    let boot_id = "cat /proc/sys/kernel/random/boot_id";
    let out = c.run(
        &["--rm", "--annotation", pod],
        Some(&second),
        "second",
        &["sh", "-c", &format!("cat /who; ls /dev/null; {boot_id}")],
    );
    let joined = text(&out.stdout);
    assert!(
        out.status.success(),
        "{joined}\n{}\n{}",
        text(&out.stderr),
        c.log()
    );
    let lines: Vec<&str> = joined.lines().collect();
    assert_eq!(lines[..2], ["second", "/dev/null"], "{joined}");
    // The same kernel answers in the first container: one sandbox, one shim.
    let out = c.exec("first", "b", boot_id);
    assert_eq!(text(&out.stdout).trim(), lines[2], "{}", text(&out.stderr));
    assert!(!lines[2].is_empty());
    assert_eq!(c.d.shim_pids().len(), 1);
    // The first container cannot see the second's files, nor the second the first's.
    let out = c.exec("first", "c", "cat /who 2>/dev/null || echo none");
    assert_eq!(text(&out.stdout), "none\n");
    c.kill_and_wait("first", "KILL");
    let out = c.ctr(&["task", "delete", "first"]);
    assert!(
        text(&out.stderr).contains("exit code 137"),
        "{}",
        text(&out.stderr)
    );
    let _ = c.ctr(&["container", "delete", "first"]);
    c.assert_nothing_left();
}
