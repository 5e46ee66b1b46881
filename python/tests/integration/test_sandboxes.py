"""Tier 4 for the Python SDK: real sandboxes (the real kernel, msb-init and the default root)
driven through the installed wheel. On hosts whose /dev/kvm cannot boot Linux, ./x test runs
this file inside the L2 VM; run directly there, every test fails with SetupError."""

import asyncio
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from msb_vmm import (
    AsyncSandbox,
    CommandError,
    ExecTimeout,
    Exited,
    GuestFileNotFoundError,
    Network,
    Sandbox,
    SandboxError,
    Started,
    Stderr,
    Stdout,
)


@pytest.fixture(scope="module")
def sb():
    with Sandbox.create(env={"GREETING": "hello"}, network=False) as s:
        yield s


def test_run(sb):
    r = sb.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr, r.signal) == (3, b"out\n", b"err\n", None)
    # Shell strings, the sandbox's default env under the command's, cwd, user.
    r = sb.run('echo "$GREETING $WHO from $(pwd)"', env={"WHO": "py"}, cwd="/tmp")
    assert r.stdout_text == "hello py from /tmp\n"
    assert sb.run("id -u", user="nobody").stdout == b"65534\n"
    assert sb.run(["sha256sum"], stdin=b"fed from python").stdout.split()[0].decode() == hashlib.sha256(
        b"fed from python"
    ).hexdigest()
    assert sb.run_python("print(6 * 7)").stdout == b"42\n"
    with pytest.raises(CommandError) as e:
        sb.run("echo oops >&2; exit 4", check=True)
    assert e.value.result.exit_code == 4 and "oops" in str(e.value)
    with pytest.raises(ExecTimeout) as e:
        sb.run("echo started; sleep 30", timeout=1.5)
    assert e.value.result.stdout == b"started\n" and e.value.result.timed_out
    with pytest.raises(GuestFileNotFoundError):
        sb.run(["/no/such/program"])
    # A buffer of all the guest's memory but 2 MiB: the OOM killer ends it, and says so.
    r = sb.run("set -- $(grep MemTotal /proc/meminfo); "
               "dd if=/dev/zero of=/dev/null bs=$((($2 - 2048) * 1024)) count=1")
    assert (r.exit_code, r.oom_killed) == (137, True), r
    with pytest.raises(CommandError, match="OOM killer"):
        r.check()
    r = sb.run("kill -9 $$")
    assert (r.exit_code, r.oom_killed) == (137, False)
    r = sb.run("tty; stty size", tty=(30, 100))
    assert r.stdout_text.replace("\r", "").splitlines() == ["/dev/pts/0", "30 100"]


def test_stream(sb):
    with sb.stream("for i in 1 2 3; do echo tick $i; sleep 0.1; done; echo bye >&2") as p:
        events = list(p)
    assert isinstance(events[0], Started) and events[0].pid > 1
    assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"tick 1\ntick 2\ntick 3\n"
    assert [e.data for e in events if isinstance(e, Stderr)] == [b"bye\n"]
    assert events[-1] == Exited(0)
    # Interactive: a reply per line fed.
    p = sb.stream(["sh", "-c", "while read l; do echo got $l; done"], stdin=True)
    p.write_stdin("one\n")
    seen = b""
    while b"got one\n" not in seen:
        ev = p.next_event(timeout=30)
        assert ev is not None, "no output within 30 s"
        if isinstance(ev, Stdout):
            seen += ev.data
    p.write_stdin(b"two\n")
    p.close_stdin()
    r = p.wait()
    assert seen + r.stdout == b"got one\ngot two\n" and r.exit_code == 0
    # Signals: SIGTERM ends a sleeping process with 128 + 15.
    p = sb.stream(["sleep", "30"])
    assert isinstance(p.next_event(), Started)
    p.signal(15)
    r = p.wait()
    assert (r.exit_code, r.signal) == (143, 15)


def test_files(sb, tmp_path):
    sb.files.write("/tmp/py/a/b.txt", "text\n", mode=0o600)
    assert sb.files.read("/tmp/py/a/b.txt") == b"text\n"
    assert sb.files.read_text("/tmp/py/a/b.txt") == "text\n"
    st = sb.files.stat("/tmp/py/a/b.txt")
    assert (st.kind, st.mode, st.size, st.uid, st.name) == ("file", 0o600, 5, 0, "b.txt")
    assert [(f.name, f.kind) for f in sb.files.list("/tmp/py")] == [("a", "dir")]
    assert sb.run("cat /tmp/py/a/b.txt").stdout == b"text\n"
    # Streaming both ways, and host paths: 3 MiB of random bytes round trip.
    data = os.urandom(3 << 20)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    os.chmod(src, 0o640)
    sb.files.upload(src, "/tmp/py/big.bin")
    assert sb.files.stat("/tmp/py/big.bin").mode == 0o640
    assert sb.run("sha256sum /tmp/py/big.bin").stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert sb.files.download("/tmp/py/big.bin", tmp_path / "out.bin") == len(data)
    assert (tmp_path / "out.bin").read_bytes() == data
    buf = io.BytesIO()
    assert sb.files.read_into("/tmp/py/big.bin", buf) == len(data) and buf.getvalue() == data
    sb.files.write_from("/tmp/py/copy.bin", io.BytesIO(data[:1000]))
    assert sb.files.read("/tmp/py/copy.bin") == data[:1000]
    sb.files.remove("/tmp/py", recursive=True)
    assert not sb.files.exists("/tmp/py")
    with pytest.raises(FileNotFoundError):
        sb.files.read("/tmp/py/a/b.txt")


def _threads():
    return len(os.listdir("/proc/self/task"))


def test_the_context_manager_cleans_up_after_an_exception():
    before = _threads()
    with pytest.raises(RuntimeError, match="user code failed"):
        with Sandbox.create(network=False) as s:
            assert s.run("true").ok
            raise RuntimeError("user code failed")
    assert not s.alive
    with pytest.raises(SandboxError, match="stopped"):
        s.run("true")
    # Every VMM thread is gone (vCPUs, devices, netstack).
    deadline = time.monotonic() + 30
    while _threads() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _threads() <= before


def test_async():
    async def main():
        async with AsyncSandbox.create(network=False) as sb:
            r = await sb.run(["echo", "async"])
            assert r.stdout == b"async\n"
            # Sixteen commands at once from one event loop.
            results = await asyncio.gather(*(sb.run("echo $((%d * 2))" % i) for i in range(16)))
            assert [r.stdout for r in results] == [b"%d\n" % (i * 2) for i in range(16)]
            # Streaming.
            proc = await sb.stream("echo a; echo b >&2")
            kinds = [type(e).__name__ async for e in proc]
            assert kinds[0] == "Started" and kinds[-1] == "Exited" and "Stdout" in kinds and "Stderr" in kinds
            # Files.
            await sb.files.write("/tmp/async.txt", b"x" * 10)
            assert (await sb.files.stat("/tmp/async.txt")).size == 10
            # Cancelling an awaited run kills its process in the guest.
            task = asyncio.create_task(sb.run("echo $$ > /tmp/pid; exec sleep 1000"))
            for _ in range(300):
                if await sb.files.exists("/tmp/pid"):
                    break
                await asyncio.sleep(0.1)
            pid = int((await sb.files.read("/tmp/pid")).strip())
            assert (await sb.run("test -d /proc/%d" % pid)).ok
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(300):
                if not (await sb.run("test -d /proc/%d" % pid)).ok:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the cancelled run's process %d still runs" % pid)
        assert not sb.alive

    asyncio.run(main())


@pytest.fixture
def host_server():
    """A TCP server on the host's loopback that greets and closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.sendall(b"hello from the host\n")
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


CONNECT = """
import socket, sys
s = socket.create_connection(("10.0.2.2", %d), timeout=10)
print(s.recv(100).decode().strip())
"""


def test_policy_denial_is_visible_from_python(host_server, tmp_path):
    port = host_server
    log = tmp_path / "audit.jsonl"
    # The default preset (public) never reaches the host: the connection is refused, and the
    # audit log says which rule decided.
    with Sandbox.create(network=Network(audit_log=log)) as s:
        r = s.run_python(CONNECT % port)
    assert r.exit_code != 0 and "ConnectionRefusedError" in r.stderr_text, r
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    denied = [l for l in lines if l["kind"] == "flow" and l["dst"].endswith(":%d" % port)]
    assert denied and all(l["verdict"] == "denied" for l in denied), lines
    # A host rule lets exactly that port through.
    with Sandbox.create(network=Network(allow=["tcp:host:%d" % port])) as s:
        r = s.run_python(CONNECT % port, check=True)
    assert r.stdout == b"hello from the host\n"


def test_a_published_port_reaches_a_server_in_the_guest():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with Sandbox.create(network=Network(publish=["127.0.0.1:%d:8080" % port])) as s:
        p = s.stream(["python3", "-c", SERVE])
        for ev in p:
            if isinstance(ev, Stdout) and b"listening" in ev.data:
                break
        c = socket.create_connection(("127.0.0.1", port), timeout=60)
        assert c.recv(100) == b"hello from the guest\n"
        c.close()
        p.kill()
        assert p.wait().signal == 9


SERVE = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
c.sendall(b"hello from the guest\\n")
c.close()
import time
time.sleep(60)
"""


def test_named_sandboxes_are_shared_with_the_cli(monkeypatch):
    # Sockets cannot be bound on the L2 VM's 9p root: state lives on /dev/shm.
    state = tempfile.mkdtemp(prefix="msb-py-state-", dir="/dev/shm")
    monkeypatch.setenv("MSB_STATE_DIR", state)
    from msb_vmm._sync import cli_path

    cli = cli_path()
    with Sandbox.start("pybox", network=False) as sb:
        assert sb.name == "pybox"
        sb.files.write("/tmp/marker", b"from python\n")
        # The CLI sees and drives the same sandbox.
        out = subprocess.run([cli, "exec", "pybox", "--", "cat", "/tmp/marker"], capture_output=True)
        assert out.stdout == b"from python\n", out
        # A second client connects by name; leaving its block only disconnects.
        with Sandbox.connect("pybox") as other:
            assert other.run("cat /tmp/marker").stdout == b"from python\n"
        assert sb.run("echo still here").stdout == b"still here\n"
    # Leaving the starter's block stopped it and removed its state.
    assert not os.path.exists(os.path.join(state, "pybox"))
    with pytest.raises(SandboxError, match="no running sandbox named pybox"):
        Sandbox.connect("pybox")
    shutil.rmtree(state, ignore_errors=True)
