//! A long-lived sandbox driven through the agent: several commands in one guest, output
//! streamed as it is produced, stdin fed from the host, files in and out, a clean shutdown.
//! `cargo run --release --example sandbox_session`.
//! Needs the default assets (`./x setup`) and a /dev/kvm that boots Linux guests.

use std::io::Write;

use msb_vmm::sandbox::{request, ExecEvent, Sandbox, SandboxError};

fn main() {
    if let Err(e) = session() {
        eprintln!("error: {e}");
        for line in e.console_tail() {
            eprintln!("  | {line}");
        }
        std::process::exit(125);
    }
}

fn session() -> Result<(), SandboxError> {
    let sb = Sandbox::builder().cpus(1).memory_mib(128).start()?;
    eprintln!("agent ready after {:?}", sb.ready_time());

    // Stream: lines arrive one by one while the command runs.
    let h = sb.exec(request([
        "sh",
        "-c",
        "for i in 1 2 3; do echo tick $i; sleep 0.2; done; echo done >&2",
    ]))?;
    for event in h {
        match event? {
            ExecEvent::Started { pid } => eprintln!("[started pid {pid}]"),
            ExecEvent::Stdout(d) => std::io::stdout().write_all(&d).expect("stdout"),
            ExecEvent::Stderr(d) => std::io::stderr().write_all(&d).expect("stderr"),
            ExecEvent::Exited { status, .. } => eprintln!("[exited: {status:?}]"),
        }
    }

    // Stdin: the controller is an io::Write for the process's stdin.
    let mut req = request(["sha256sum"]);
    req.stdin = true;
    let h = sb.exec(req)?;
    let mut stdin = h.controller();
    stdin
        .write_all(b"fed from the host\n")
        .expect("writing stdin");
    stdin.close_stdin()?;
    let out = h.output()?;
    print!(
        "sha256 in the guest: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Files: write, use, read back.
    sb.write_file("/tmp/work/input.txt", b"3\n1\n2\n", 0o644)?;
    let out = sb.output([
        "sh",
        "-c",
        "sort /tmp/work/input.txt > /tmp/work/sorted.txt",
    ])?;
    assert!(out.status.success(), "sort failed: {out:?}");
    let sorted = sb.read_file("/tmp/work/sorted.txt")?;
    print!("sorted in the guest:\n{}", String::from_utf8_lossy(&sorted));

    let outcome = sb.shutdown()?;
    eprintln!("powered off: {:?}", outcome.exit);
    Ok(())
}
