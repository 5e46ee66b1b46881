"""Tier 3 for the Python SDK: the real agent (msb-init) as a host process on a Unix socket,
driven through the installed wheel at full speed, no VM. What the guest would do here runs on
the host, in a temporary directory."""

import asyncio
import hashlib
import io
import os
import signal
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
    Sandbox,
    Started,
    Stdout,
)


def msb_init():
    if os.environ.get("MSB_INIT"):
        return os.environ["MSB_INIT"]
    cache = os.environ.get("MSB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "msb-vmm"
    )
    return os.path.join(cache, "msb-init")


@pytest.fixture(scope="module")
def agent_socket():
    init = msb_init()
    assert os.access(init, os.X_OK), "no msb-init at %s: run ./x setup" % init
    d = tempfile.mkdtemp(prefix="msb-py-agent-")
    sock = os.path.join(d, "agent.sock")
    p = subprocess.Popen([init, "agent", "--listen", sock])
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert p.poll() is None and time.monotonic() < deadline, "the host agent did not start"
        time.sleep(0.005)
    yield sock
    p.kill()
    p.wait()
    os.unlink(sock)
    os.rmdir(d)


@pytest.fixture
def sb(agent_socket):
    s = Sandbox._from_agent_socket(agent_socket, env={"GREETING": "hi"})
    yield s
    s.close()


@pytest.fixture
def work():
    with tempfile.TemporaryDirectory(prefix="msb-py-work-") as d:
        yield d


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (and the process may be reaped meanwhile).
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pid, secs=10):
    deadline = time.monotonic() + secs
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def test_run(sb, work):
    r = sb.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    assert sb.run('echo "$GREETING $X $(pwd)"', env={"X": "y"}, cwd=work).stdout_text == "hi y %s\n" % work
    assert sb.run("id -u", user="65534:65534").stdout == b"65534\n"
    data = os.urandom(1 << 20)
    assert sb.run(["sha256sum"], stdin=data).stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    with pytest.raises(CommandError) as e:
        sb.run("echo nope >&2; exit 2", check=True)
    assert e.value.result.stderr == b"nope\n"
    with pytest.raises(ExecTimeout) as e:
        sb.run("echo early; exec sleep 30", timeout=0.5)
    assert e.value.result.stdout == b"early\n"
    with pytest.raises(GuestFileNotFoundError):
        sb.run(["/no/such/program"])
    r = sb.run(["sh", "-c", "kill -9 $$"])
    assert (r.exit_code, r.signal) == (137, 9)


def test_stream_and_stdin(sb):
    p = sb.stream(["sh", "-c", "while read l; do echo got $l; done; echo end >&2"], stdin=True)
    assert isinstance(p.next_event(), Started)
    p.write_stdin("a\n")
    got = b""
    while got != b"got a\n":
        ev = p.next_event(timeout=10)
        assert ev is not None
        got += ev.data
    p.close_stdin()
    r = p.wait()
    assert (r.stdout, r.stderr, r.exit_code) == (b"", b"end\n", 0)
    assert p.exited == Exited(0)
    # next_event with a timeout returns None while the process is quiet.
    p = sb.stream(["sleep", "30"])
    assert isinstance(p.next_event(), Started)
    assert p.next_event(timeout=0.2) is None and p.exited is None
    p.signal(signal.SIGTERM)
    assert p.wait().signal == signal.SIGTERM


def test_files(sb, work):
    path = os.path.join(work, "sub", "f.txt")
    sb.files.write(path, "hello\n", mode=0o640)
    assert open(path).read() == "hello\n" and os.stat(path).st_mode & 0o777 == 0o640
    st = sb.files.stat(path)
    assert (st.kind, st.size, st.mode, st.st_mode & 0o170000) == ("file", 6, 0o640, 0o100000)
    assert [f.name for f in sb.files.list(work)] == ["sub"]
    big = os.urandom(5 << 20)
    buf = io.BytesIO(big)
    sb.files.write_from(os.path.join(work, "big"), buf)
    out = io.BytesIO()
    assert sb.files.read_into(os.path.join(work, "big"), out) == len(big) and out.getvalue() == big
    sb.files.remove(os.path.join(work, "sub"), recursive=True)
    assert not os.path.exists(os.path.join(work, "sub"))
    with pytest.raises(FileNotFoundError):
        sb.files.stat(os.path.join(work, "sub"))
    with pytest.raises(ValueError):
        sb.files.read("relative/path")


def test_blocking_runs_release_the_interpreter(sb, ticker):
    with ticker:
        sb.run(["sleep", "1"])
    assert ticker.count >= 20, ticker.count


def test_ctrl_c_kills_the_command(sb, work):
    pidfile = os.path.join(work, "pid")
    main = threading.main_thread().ident
    assert threading.get_ident() == main

    def interrupt():
        while not os.path.exists(pidfile) or not open(pidfile).read().strip():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        sb.run("echo $$ > %s; exec sleep 30" % pidfile)
    assert wait_gone(int(open(pidfile).read())), "the interrupted command still runs"


def test_async(agent_socket, work):
    async def main():
        sb = AsyncSandbox(Sandbox._from_agent_socket(agent_socket))
        results = await asyncio.gather(*(sb.run(["sh", "-c", "sleep 0.2; echo %d" % i]) for i in range(16)))
        assert [r.stdout for r in results] == [b"%d\n" % i for i in range(16)]
        proc = await sb.stream("echo one; echo two")
        out = b"".join([e.data async for e in proc if isinstance(e, Stdout)])
        assert out == b"one\ntwo\n"
        await sb.files.write(os.path.join(work, "a"), b"async")
        assert await sb.files.read(os.path.join(work, "a")) == b"async"
        pidfile = os.path.join(work, "apid")
        task = asyncio.create_task(sb.run("echo $$ > %s; exec sleep 30" % pidfile))
        while not (os.path.exists(pidfile) and open(pidfile).read().strip()):
            await asyncio.sleep(0.01)
        pid = int(open(pidfile).read())
        assert alive(pid)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert wait_gone(pid), "the cancelled command still runs"
        with pytest.raises(ExecTimeout):
            await sb.run(["sleep", "30"], timeout=0.3)
        await sb.close()

    asyncio.run(main())
