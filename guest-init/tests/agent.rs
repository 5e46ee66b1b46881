//! Test tier 3: the agent running as a host process (`msb-init agent --listen PATH`), driven by
//! the host client over a Unix socket at full speed. Same code as in the guest, only the
//! transport differs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use msb_init::agent::{ErrorKind, ExecRequest, ExitStatus, FileKind, TermSize, User};
use msb_init::client::{AgentClient, ClientError, ExecEvent};
use sha2::{Digest, Sha256};

struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        let dir = std::env::temp_dir().join(format!(
            "msb-agent-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        std::fs::write(dir.join("kmsg"), b"").unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_msb-init"))
            .args(["agent", "--listen"])
            .arg(&sock)
            // Certificates from `Configure` land here, never in this host's /etc.
            .env("MSB_AGENT_ROOT", dir.join("root"))
            // The kernel log it reads for OOM kills: a file the tests write.
            .env("MSB_AGENT_KMSG", dir.join("kmsg"))
            .spawn()
            .expect("msb-init agent starts");
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "agent socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent { child, dir }
    }

    fn client(&self) -> AgentClient {
        // The socket file appears at bind(), a moment before listen(): retry a refusal.
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(self.dir.join("agent.sock")) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && t.elapsed() < Duration::from_secs(10) =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("connecting to the agent: {e}"),
            }
        };
        AgentClient::connect(s, Duration::from_secs(10)).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    exec(&["sh", "-c", script])
}

#[test]
fn ping_and_exit_codes() {
    let a = Agent::start();
    let c = a.client();
    c.ping().unwrap();
    let out = c
        .exec(sh("echo out; echo err >&2; exit 7"))
        .unwrap()
        .output()
        .unwrap();
    assert_eq!(
        (out.status, out.stdout.as_slice(), out.stderr.as_slice()),
        (
            ExitStatus::Code(7),
            b"out\n".as_slice(),
            b"err\n".as_slice()
        )
    );
    assert_eq!(
        c.exec(sh("kill -9 $$")).unwrap().wait().unwrap(),
        ExitStatus::Signal(9)
    );
    match c.exec(exec(&["no-such-command-anywhere"])).unwrap().wait() {
        Err(ClientError::Agent(e)) => assert_eq!(
            (e.kind, e.message.contains("command not found")),
            (ErrorKind::NotFound, true)
        ),
        other => panic!("{other:?}"),
    }
    let mut bad_dir = exec(&["true"]);
    bad_dir.workdir = Some(b"/no/such/dir".to_vec());
    assert!(
        matches!(c.exec(bad_dir).unwrap().wait(), Err(ClientError::Agent(e)) if e.kind == ErrorKind::NotFound)
    );
}

/// A program named without a slash is looked up on the request's PATH as execvp does
/// (entries that are not executable files skipped), keeps the name it was given as argv[0],
/// and gets the same RLIMIT_NOFILE whether it needs a fork (an rlimit to set) or not.
#[test]
fn programs_are_found_on_the_path_and_keep_their_name() {
    let a = Agent::start();
    let c = a.client();
    let bin = a.dir.join("bin");
    std::fs::create_dir_all(bin.join("true")).unwrap();
    std::fs::write(bin.join("hello"), "#!/bin/sh\necho hello from \"$1\"\n").unwrap();
    std::fs::write(bin.join("cat"), "not executable").unwrap();
    std::fs::set_permissions(
        bin.join("hello"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let run = |argv: &[&str], rlimits: Vec<msb_init::agent::Rlimit>| {
        let mut r = exec(argv);
        r.env.push((b"PATH".to_vec(), path.as_bytes().to_vec()));
        r.rlimits = rlimits;
        let out = c.exec(r).unwrap().output().unwrap();
        assert_eq!(out.status, ExitStatus::Code(0), "{argv:?}: {out:?}");
        out.stdout
    };
    assert_eq!(run(&["hello", "x"], vec![]), b"hello from x\n");
    assert_eq!(run(&["true"], vec![]), b"");
    assert_eq!(
        run(&["cat", "/proc/self/cmdline"], vec![]),
        b"cat\0/proc/self/cmdline\0"
    );
    let core = msb_init::agent::Rlimit {
        resource: msb_init::agent::RlimitResource::Core,
        soft: 0,
        hard: 0,
    };
    let plain = run(&["sh", "-c", "ulimit -n"], vec![]);
    let forked = run(&["sh", "-c", "ulimit -n"], vec![core]);
    assert_eq!(plain, forked);
    let mut missing = exec(&["hello"]);
    missing
        .env
        .push((b"PATH".to_vec(), b"/usr/bin:/bin".to_vec()));
    assert!(matches!(
        c.exec(missing).unwrap().wait(),
        Err(ClientError::Agent(e)) if e.kind == ErrorKind::NotFound
    ));
}

#[test]
fn environment_workdir_and_started_event() {
    let a = Agent::start();
    let c = a.client();
    let mut r = sh("printf '%s|%s' \"$X\" \"$(pwd)\"");
    r.env.push((b"X".to_vec(), b"a b\n\"c\"".to_vec()));
    r.workdir = Some(b"/tmp".to_vec());
    let mut h = c.exec(r).unwrap();
    assert!(matches!(h.next_event().unwrap(), Some(ExecEvent::Started { pid }) if pid > 0));
    let mut out = Vec::new();
    while let Some(e) = h.next_event().unwrap() {
        if let ExecEvent::Stdout(d) = e {
            out.extend(d);
        }
    }
    assert_eq!(out, b"a b\n\"c\"|/tmp");
    // nofile defaults high: 2^20 where the hard limit can be raised, else the hard limit.
    let nofile = c.exec(sh("ulimit -n")).unwrap().output().unwrap();
    let n: u64 = String::from_utf8_lossy(&nofile.stdout)
        .trim()
        .parse()
        .unwrap();
    let hard = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard: u64 = hard
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .nth(4)
        .unwrap()
        .parse()
        .unwrap();
    assert!(n == 1 << 20 || n == hard, "nofile {n}, hard limit {hard}");
}

#[test]
fn thirty_two_concurrent_execs_on_one_connection() {
    let a = Agent::start();
    let c = std::sync::Arc::new(a.client());
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                let out = c
                    .exec(sh(&format!("sleep 0.2; echo {i}; exit {}", i % 5)))
                    .unwrap()
                    .output()
                    .unwrap();
                (i, out)
            })
        })
        .collect();
    for t in threads {
        let (i, out) = t.join().unwrap();
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
        assert_eq!(out.status, ExitStatus::Code(i % 5));
    }
}

#[test]
fn one_gib_of_output_checksummed_end_to_end() {
    let a = Agent::start();
    let c = a.client();
    // stdout: 1 GiB of random bytes; stderr: their SHA-256 computed on the agent's side.
    let script = "{ head -c 1073741824 /dev/urandom | tee /dev/fd/3 | sha256sum >&2; } 3>&1";
    let mut h = c.exec(sh(script)).unwrap();
    let (mut hasher, mut n, mut err) = (Sha256::new(), 0usize, Vec::new());
    while let Some(e) = h.next_event().unwrap() {
        match e {
            ExecEvent::Stdout(d) => {
                n += d.len();
                hasher.update(&d);
            }
            ExecEvent::Stderr(d) => err.extend(d),
            ExecEvent::Exited { status, .. } => assert_eq!(status, ExitStatus::Code(0)),
            ExecEvent::Started { .. } => {}
        }
    }
    assert_eq!(n, 1 << 30);
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&err).split_whitespace().next(),
        Some(digest.as_str())
    );
}

#[test]
fn stdin_round_trip() {
    let a = Agent::start();
    let c = a.client();
    let mut r = exec(&["cat"]);
    r.stdin = true;
    let mut h = c.exec(r).unwrap();
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut ctl = h.controller();
    let input = data.clone();
    let writer = std::thread::spawn(move || {
        // The controller is an io::Write for stdin.
        std::io::copy(&mut &input[..], &mut ctl).unwrap();
        ctl.close_stdin().unwrap();
    });
    let mut out = Vec::new();
    while let Some(e) = h.next_event().unwrap() {
        if let ExecEvent::Stdout(d) = e {
            out.extend(d);
        }
    }
    writer.join().unwrap();
    assert!(
        out == data,
        "stdin came back altered ({} of {} bytes)",
        out.len(),
        data.len()
    );
}

#[test]
fn timeout_and_signals() {
    let a = Agent::start();
    let c = a.client();
    let mut r = exec(&["sleep", "100"]);
    r.timeout_ms = Some(200);
    let t = Instant::now();
    let out = c.exec(r).unwrap().output().unwrap();
    assert_eq!((out.status, out.timed_out), (ExitStatus::Signal(9), true));
    assert!(t.elapsed() < Duration::from_secs(10));
    let mut h = c
        .exec(sh(
            "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done",
        ))
        .unwrap();
    loop {
        if let Some(ExecEvent::Stdout(d)) = h.next_event().unwrap() {
            assert_eq!(d, b"ready\n");
            break;
        }
    }
    h.signal(libc::SIGTERM).unwrap();
    assert_eq!(h.wait().unwrap(), ExitStatus::Code(42));
}

fn read_line(h: &mut msb_init::client::ExecHandle, acc: &mut Vec<u8>) -> String {
    loop {
        if let Some(i) = acc.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = acc.drain(..=i).collect();
            return String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_string();
        }
        match h.next_event().unwrap() {
            Some(ExecEvent::Stdout(d)) => acc.extend(d),
            Some(ExecEvent::Exited { status, .. }) => {
                panic!("exited {status:?} before a full line: {acc:?}")
            }
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
}

/// A command killed while the kernel logged an OOM kill is reported OOM-killed; a kill with
/// no such record, a record before the command started, or a record with a normal exit is not.
#[test]
fn oom_kills_are_told_from_other_kills() {
    let a = Agent::start();
    let c = a.client();
    let log = a.dir.join("kmsg");
    let record = "3,812,5501234,-;Out of memory: Killed process 4242 (python3) total-vm:2100000kB";
    let append = |line: &str| {
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "{line}").unwrap();
    };
    let run = |script: String| c.exec(sh(&script)).unwrap().output().unwrap();
    let oom = run(format!(
        "echo '{record}' >> '{}'; kill -9 $$",
        log.display()
    ));
    assert_eq!(oom.status, ExitStatus::Signal(9));
    assert!(oom.oom_killed, "killed while the OOM killer killed");
    let wrapped = run(format!(
        "echo '{record}' >> '{}'; sh -c 'kill -9 $$'; exit $?",
        log.display()
    ));
    assert_eq!(wrapped.status, ExitStatus::Code(137));
    assert!(
        wrapped.oom_killed,
        "a shell whose child the OOM killer ended"
    );
    let plain = run("kill -9 $$".into());
    assert_eq!(plain.status, ExitStatus::Signal(9));
    assert!(!plain.oom_killed, "no OOM kill logged");
    append(record);
    let later = run("kill -9 $$".into());
    assert!(
        !later.oom_killed,
        "the OOM kill came before the command started"
    );
    let fine = run(format!("echo '{record}' >> '{}'", log.display()));
    assert_eq!(fine.status, ExitStatus::Code(0));
    assert!(!fine.oom_killed, "it exited by itself");
    let mut h = c.exec(sh("echo ready; sleep 30")).unwrap();
    let mut acc = Vec::new();
    assert_eq!(read_line(&mut h, &mut acc), "ready");
    append(record);
    h.kill().unwrap();
    let mut ended = None;
    while let Some(e) = h.next_event().unwrap() {
        if let ExecEvent::Exited { oom_killed, .. } = e {
            ended = Some(oom_killed);
        }
    }
    assert_eq!(
        ended,
        Some(true),
        "guest-wide: any SIGKILL during an OOM kill counts"
    );
}

#[test]
fn pty_names_a_pts_device_and_sees_resizes() {
    let a = Agent::start();
    let c = a.client();
    let mut r = sh("tty; stty size; read x; stty size; exit 3");
    r.pty = Some(TermSize { rows: 24, cols: 80 });
    r.stdin = true;
    let mut h = c.exec(r).unwrap();
    let mut acc = Vec::new();
    assert!(read_line(&mut h, &mut acc).starts_with("/dev/pts/"));
    assert_eq!(read_line(&mut h, &mut acc), "24 80");
    h.resize(TermSize {
        rows: 40,
        cols: 132,
    })
    .unwrap();
    h.write_stdin(b"\n").unwrap();
    let _echo = read_line(&mut h, &mut acc);
    assert_eq!(read_line(&mut h, &mut acc), "40 132");
    assert_eq!(h.wait().unwrap(), ExitStatus::Code(3));
}

#[test]
fn files_written_read_listed_and_removed() {
    let a = Agent::start();
    let c = a.client();
    let base = a.dir.join("files");
    let path = base.join("deep/er/big.bin");
    let data: Vec<u8> = (0..100u32 << 20)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 24) as u8)
        .collect();
    let n = c
        .write_file(
            path.as_os_str().as_encoded_bytes(),
            0o640,
            true,
            &mut data.as_slice(),
        )
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let st = c.stat(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(
        (st.kind, st.mode, st.size),
        (FileKind::File, 0o640, data.len() as u64)
    );
    let mut back = Vec::new();
    c.read_file(path.as_os_str().as_encoded_bytes(), &mut back)
        .unwrap();
    assert!(
        Sha256::digest(&back) == Sha256::digest(&data),
        "file changed in transit"
    );
    let entries = c
        .list_dir(base.join("deep/er").as_os_str().as_encoded_bytes())
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, b"big.bin");
    assert!(
        matches!(
            c.remove(base.join("deep").as_os_str().as_encoded_bytes(), false),
            Err(ClientError::Agent(_))
        ),
        "non-empty directory"
    );
    c.remove(base.join("deep").as_os_str().as_encoded_bytes(), true)
        .unwrap();
    match c.stat(path.as_os_str().as_encoded_bytes()) {
        Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
    match c.write_file(b"/proc/nonexistent/x", 0o644, false, &mut b"x".as_slice()) {
        Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
    let mut sink = Vec::new();
    assert!(
        matches!(
            c.read_file(base.as_os_str().as_encoded_bytes(), &mut sink),
            Err(ClientError::Agent(_))
        ),
        "a directory"
    );
}

/// A copy that fails part-way (here the local file cannot be read past 1 MiB) leaves the
/// target as it was and no partial file beside it.
#[test]
fn a_failed_write_leaves_no_partial_file() {
    struct Failing(usize);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 >= 1 << 20 {
                return Err(std::io::Error::other("disk error"));
            }
            let n = buf.len().min((1 << 20) - self.0);
            buf[..n].fill(b'n');
            self.0 += n;
            Ok(n)
        }
    }
    let a = Agent::start();
    let c = a.client();
    let dir = a.dir.join("partial");
    let path = dir.join("f.txt");
    let p = path.as_os_str().as_encoded_bytes();
    c.write_file(p, 0o644, true, &mut b"old".as_slice())
        .unwrap();
    assert!(c.write_file(p, 0o644, false, &mut Failing(0)).is_err());
    let listing = || {
        let mut names: Vec<Vec<u8>> = c
            .list_dir(dir.as_os_str().as_encoded_bytes())
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        names
    };
    // The agent notices the abandoned transfer on its own time.
    let t = std::time::Instant::now();
    while listing().len() > 1 && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(listing(), vec![b"f.txt".to_vec()]);
    let mut back = Vec::new();
    c.read_file(p, &mut back).unwrap();
    assert_eq!(back, b"old");
}

#[test]
fn a_slow_reader_throttles_the_process() {
    let a = Agent::start();
    let c = a.client();
    let mut h = c
        .exec(exec(&["head", "-c", "1073741824", "/dev/zero"]))
        .unwrap();
    let pid = loop {
        if let Some(ExecEvent::Started { pid }) = h.next_event().unwrap() {
            break pid;
        }
    };
    // Read nothing for a while: the agent may hold a window of output, the pipe a little more;
    // the process must be blocked, not the agent buffering a gigabyte.
    std::thread::sleep(Duration::from_millis(700));
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let wchar: u64 = io
        .lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wchar < 8 << 20,
        "process wrote {wchar} bytes with nobody reading"
    );
    let agent_rss = std::fs::read_to_string(format!("/proc/{}/status", a.child.id())).unwrap();
    let rss_kib: u64 = agent_rss
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rss_kib < 64 << 10, "agent RSS {rss_kib} KiB");
    h.kill().unwrap();
    assert_eq!(h.wait().unwrap(), ExitStatus::Signal(9));
}

#[test]
fn run_as_another_user() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        panic!("switching users needs the agent to run as root (CI runs as root)");
    }
    let a = Agent::start();
    let c = a.client();
    let mut r = sh("id -u; id -g");
    r.user = Some(User::Id {
        uid: 65534,
        gid: 65534,
    });
    assert_eq!(
        c.exec(r).unwrap().output().unwrap().stdout,
        b"65534\n65534\n"
    );
    let mut r = exec(&["id", "-u"]);
    r.user = Some(User::Name("nosuchuser".into()));
    assert!(
        matches!(c.exec(r).unwrap().wait(), Err(ClientError::Agent(e)) if e.kind == ErrorKind::NotFound)
    );
}

#[test]
fn dropping_a_handle_does_not_break_the_connection() {
    let a = Agent::start();
    let c = a.client();
    drop(
        c.exec(exec(&["head", "-c", "50000000", "/dev/zero"]))
            .unwrap(),
    );
    for _ in 0..3 {
        assert_eq!(
            c.exec(exec(&["true"])).unwrap().wait().unwrap(),
            ExitStatus::Code(0)
        );
    }
    assert!(c.failure().is_none());
}

#[test]
fn many_connections_at_once() {
    let a = Agent::start();
    let clients: Vec<AgentClient> = (0..8).map(|_| a.client()).collect();
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(
            c.exec(sh(&format!("echo {i}")))
                .unwrap()
                .output()
                .unwrap()
                .stdout,
            format!("{i}\n").into_bytes()
        );
    }
}

/// A fake agent: hands the client a scripted byte stream, as a hostile guest would.
fn fake_agent(script: Vec<u8>) -> Result<AgentClient, ClientError> {
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut theirs = theirs;
        let _ = theirs.write_all(&script);
        // Keep the stream open a little so the client sees the bytes, not just an EOF.
        let mut sink = [0u8; 4096];
        let _ = theirs.set_read_timeout(Some(Duration::from_millis(500)));
        while matches!(theirs.read(&mut sink), Ok(n) if n > 0) {}
    });
    AgentClient::connect(ours, Duration::from_secs(5))
}

fn frame<T: serde::Serialize>(m: &T) -> Vec<u8> {
    msb_init::frame::encode(m).unwrap()
}

#[test]
fn hostile_agent_streams_fail_cleanly() {
    use msb_init::agent::{AgentMessage, Response, WINDOW};
    use msb_init::PROTOCOL_VERSION;
    let hello = frame(&AgentMessage::Hello {
        version: PROTOCOL_VERSION,
    });
    match fake_agent(frame(&AgentMessage::Hello {
        version: PROTOCOL_VERSION + 9,
    })) {
        Err(ClientError::Version { guest, host }) => {
            assert_eq!((guest, host), (PROTOCOL_VERSION + 9, PROTOCOL_VERSION))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        fake_agent(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
        Err(ClientError::Protocol(_))
    ));
    assert!(matches!(fake_agent(vec![]), Err(ClientError::Closed)));
    let cases: Vec<Vec<u8>> = vec![
        // Response to a request that does not exist.
        [
            hello.clone(),
            frame(&AgentMessage::Response {
                id: 999,
                response: Response::Done,
            }),
        ]
        .concat(),
        // Garbage after Hello.
        [hello.clone(), vec![3, 0, 0, 0, 0xee, 0xee, 0xee]].concat(),
        // More output than the window allows for request 1 (the first id the client uses).
        [
            hello.clone(),
            (0..=(WINDOW as usize / 65536))
                .flat_map(|_| {
                    frame(&AgentMessage::Response {
                        id: 1,
                        response: Response::Stdout(vec![0; 65536]),
                    })
                })
                .collect::<Vec<u8>>(),
        ]
        .concat(),
        // A second Hello.
        [hello.clone(), hello.clone()].concat(),
    ];
    for script in cases {
        let c = fake_agent(script).unwrap();
        let r = c.exec(exec(&["true"])).and_then(|h| h.output());
        assert!(
            matches!(
                r,
                Err(ClientError::Protocol(_)) | Err(ClientError::Closed) | Err(ClientError::Io(_))
            ),
            "{r:?}"
        );
        assert!(c.failure().is_some());
    }
}

/// `Configure`: a default environment under every exec's own, and a CA appended once to the
/// root's bundle (or combined under /run for a root that persists), named by the variables
/// TLS clients read.
#[test]
fn configure_sets_default_environment_and_trusts_a_ca() {
    use msb_init::agent::Configure;
    let a = Agent::start();
    let c = a.client();
    let root = a.dir.join("root");
    std::fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    std::fs::write(
        root.join("etc/ssl/certs/ca-certificates.crt"),
        "existing roots",
    )
    .unwrap();
    let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec();
    let cfg = Configure {
        env: vec![(b"KEY".to_vec(), b"MSB_SECRET_placeholder".to_vec())],
        ca_pem: Some(pem.clone()),
        append_to_bundle: true,
        limits: Default::default(),
    };
    c.configure(cfg.clone()).unwrap();
    c.configure(cfg).unwrap();
    let bundle = std::fs::read(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    let mut want = b"existing roots\n".to_vec();
    want.extend_from_slice(&pem);
    assert_eq!(
        String::from_utf8_lossy(&bundle),
        String::from_utf8_lossy(&want),
        "appended once"
    );
    assert_eq!(
        std::fs::read(root.join("etc/ssl/certs/msb-vmm-ca.pem")).unwrap(),
        pem
    );
    let script =
        "echo $KEY $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $CURL_CA_BUNDLE $NODE_EXTRA_CA_CERTS";
    let out = c.exec(sh(script)).unwrap().output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "MSB_SECRET_placeholder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/msb-vmm-ca.pem\n"
    );
    let mut own = sh("echo $KEY");
    own.env.push((b"KEY".to_vec(), b"mine".to_vec()));
    assert_eq!(
        c.exec(own).unwrap().output().unwrap().stdout,
        b"mine\n",
        "an exec's own variable wins"
    );
    // A root that persists keeps its bundle; the combined one lives under /run.
    c.configure(Configure {
        env: Vec::new(),
        ca_pem: Some(pem.clone()),
        append_to_bundle: false,
        limits: Default::default(),
    })
    .unwrap();
    let run = std::fs::read(root.join("run/msb-vmm/ca-certificates.crt")).unwrap();
    assert_eq!(run, want);
    let out = c
        .exec(sh("echo $SSL_CERT_FILE $KEY."))
        .unwrap()
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"/run/msb-vmm/ca-certificates.crt .\n");
    let e = c
        .configure(Configure {
            env: Vec::new(),
            ca_pem: Some(b"not a certificate".to_vec()),
            append_to_bundle: true,
            limits: Default::default(),
        })
        .unwrap_err();
    assert!(e.to_string().contains("PEM"), "{e}");
}

#[test]
fn stats_count_execs_and_read_the_memory_in_use() {
    let a = Agent::start();
    let c = a.client();
    let before = c.stats().unwrap();
    assert_eq!((before.execs_started, before.execs_running), (0, 0));
    assert!(before.mem_total_kib > 0 && before.mem_available_kib <= before.mem_total_kib);
    assert!(before.processes > 0);
    c.exec(sh("true")).unwrap().wait().unwrap();
    let mut sleeper = c.exec(sh("sleep 30")).unwrap();
    assert!(matches!(
        sleeper.next_event().unwrap(),
        Some(ExecEvent::Started { .. })
    ));
    let during = c.stats().unwrap();
    assert_eq!((during.execs_started, during.execs_running), (2, 1));
    sleeper.signal(9).unwrap();
    assert_eq!(sleeper.wait().unwrap(), ExitStatus::Signal(9));
    let after = c.stats().unwrap();
    assert_eq!((after.execs_started, after.execs_running), (2, 0));
}

#[test]
fn limits_need_a_cgroup_and_a_host_agent_never_takes_its_hosts() {
    let a = Agent::start();
    let c = a.client();
    let err = c
        .configure(msb_init::agent::Configure {
            limits: msb_init::agent::GuestLimits {
                pids_max: Some(64),
                memory_max: None,
            },
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("MSB_AGENT_CGROUP"), "{err}");
    // Still serving, without limits.
    assert_eq!(
        c.exec(sh("exit 3")).unwrap().wait().unwrap(),
        ExitStatus::Code(3)
    );
}

/// A program that cannot be executed makes the standard library reap the failed child itself,
/// and panic (aborting the agent: PID 1 in a guest) if the agent's reaper took it first. The
/// reaper reaps only outside a spawn: hundreds of failed spawns racing children that exit
/// leave the agent serving.
#[test]
fn failed_spawns_racing_the_reaper_leave_the_agent_serving() {
    let mut a = Agent::start();
    let c = std::sync::Arc::new(a.client());
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for _ in 0..150 {
                    if t % 2 == 0 {
                        // A request the agent dropped (its thread panicked) never ends:
                        // bound each wait.
                        let mut h = c.exec(exec(&["/no/such/program"])).unwrap();
                        h.set_deadline(Some(Instant::now() + Duration::from_secs(30)));
                        match h.wait() {
                            Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
                            other => panic!("{other:?}"),
                        }
                    } else {
                        let mut h = c.exec(exec(&["true"])).unwrap();
                        h.set_deadline(Some(Instant::now() + Duration::from_secs(30)));
                        assert_eq!(h.wait().unwrap(), ExitStatus::Code(0));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread failed (the agent died?)");
    }
    assert!(a.child.try_wait().unwrap().is_none(), "the agent exited");
    assert_eq!(
        c.exec(exec(&["true"])).unwrap().wait().unwrap(),
        ExitStatus::Code(0)
    );
}

/// A container's process runs chrooted into its root: `PATH` lookup, the working directory
/// and what it sees are inside; a missing or relative root is refused.
#[test]
fn an_exec_with_a_root_runs_inside_it() {
    let a = Agent::start();
    let c = a.client();
    let root = a.dir.join("container");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("work/here")).unwrap();
    std::fs::write(root.join("marker"), "inside\n").unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a static busybox (apt-get install busybox-static)");
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "pwd", "ls"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let mut r = sh("pwd; cat /marker; ls /");
    r.root = Some(root.as_os_str().as_encoded_bytes().to_vec());
    r.workdir = Some(b"/work/here".to_vec());
    r.env = vec![(b"PATH".to_vec(), b"/bin".to_vec())];
    let out = c.exec(r).unwrap().output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/work/here\ninside\nbin\nmarker\nwork\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut r = sh("true");
    r.root = Some(a.dir.join("none").as_os_str().as_encoded_bytes().to_vec());
    let e = c.exec(r).and_then(|h| h.output()).unwrap_err().to_string();
    assert!(e.contains("no such directory"), "{e}");
    let mut r = sh("true");
    r.root = Some(b"relative".to_vec());
    let e = c.exec(r).and_then(|h| h.output()).unwrap_err().to_string();
    assert!(e.contains("absolute"), "{e}");
    let mut r = sh("true");
    r.root = Some(root.as_os_str().as_encoded_bytes().to_vec());
    r.workdir = Some(b"/no/such".to_vec());
    let e = c.exec(r).and_then(|h| h.output()).unwrap_err().to_string();
    assert!(e.contains("no such directory"), "{e}");
}
