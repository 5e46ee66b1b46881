"""Tier 1 for the Python SDK: no VM. Argument checks, the exception hierarchy and the
mapping of native errors, the stubs against the native module, and the interpreter lock
released during blocking calls."""

import ast
import asyncio
import inspect
import os
import socket
import tempfile
import threading
import time

import pytest

import msb_vmm
from msb_vmm import _native
from msb_vmm import (
    AsyncSandbox,
    CommandError,
    ConfigError,
    ExecTimeout,
    GuestFileNotFoundError,
    MsbError,
    Network,
    PolicyError,
    RunResult,
    Sandbox,
    SandboxError,
    SetupError,
)


def test_hierarchy():
    for cls in (SetupError, ConfigError, PolicyError, SandboxError, ExecTimeout, CommandError, msb_vmm.ImageError):
        assert issubclass(cls, MsbError)
    assert issubclass(PolicyError, ConfigError) and issubclass(ConfigError, ValueError)
    assert issubclass(ExecTimeout, SandboxError)
    e = GuestFileNotFoundError(2, "/nope: No such file or directory")
    assert isinstance(e, FileNotFoundError) and isinstance(e, SandboxError) and e.errno == 2


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(cpus=0), "cpus 0"),
        (dict(memory_mib=-1), "memory_mib -1"),
        (dict(volumes="/tmp:/mnt"), "not one string"),
        (dict(network=3), "network"),
        (dict(timeout=0), "timeout 0"),
        (dict(boot_timeout=-1.0), "boot_timeout -1.0"),
        (dict(env={"A=B": "x"}), "invalid variable name"),
        (dict(tmpfs={"/scratch": -1}), "tmpfs size -1"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        Sandbox.create(**kwargs)
    assert fragment in str(e.value)


def test_bad_rules_name_the_rule_before_anything_boots():
    with pytest.raises(PolicyError) as e:
        Sandbox.create(network=Network(allow=["exa mple.com"]))
    assert "exa mple.com" in str(e.value)
    with pytest.raises(PolicyError) as e:
        Sandbox.create(network="everything")
    assert str(e.value).startswith("--net: ")
    with pytest.raises(ConfigError):
        Network(deny="10.0.0.0/8")
    with pytest.raises(PolicyError) as e:
        Sandbox.create(network=Network(policy_file="/nonexistent/policy.toml"))
    assert "/nonexistent/policy.toml" in str(e.value)
    with pytest.raises(PolicyError) as e:
        Sandbox.create(secrets={"MSB_TEST_SURELY_UNSET": "api.example.com"})
    assert "MSB_TEST_SURELY_UNSET" in str(e.value) and "not set" in str(e.value)
    with pytest.raises(ConfigError) as e:
        Sandbox.create(volumes=["/tmp:relative/mnt"])
    assert "/tmp:relative/mnt" in str(e.value)


def test_a_host_that_cannot_boot_is_a_setup_error(monkeypatch):
    # A missing kernel or a /dev/kvm that cannot run Linux (this host's PVM) are both
    # set-up problems with a fix, reported before anything runs.
    monkeypatch.delenv("MSB_ALLOW_PVM", raising=False)
    with pytest.raises(SetupError) as e:
        Sandbox.create(kernel="/nonexistent/vmlinux", rootfs="initramfs", network=False)
    msg = str(e.value)
    assert msg and "\n" not in msg
    assert ("vmlinux" in msg) or ("kvm" in msg.lower()), msg


def test_commands():
    from msb_vmm._types import argv_of

    assert argv_of("echo $HOME") == ("/bin/sh", "-c", "echo $HOME")
    assert argv_of(["ls", b"-l"]) == ("ls", b"-l")
    for bad in ([], [1], ["ls", None]):
        with pytest.raises(ConfigError):
            argv_of(bad)


def test_run_result_check():
    ok = RunResult(0, b"hi\n", b"")
    assert ok.check() is ok and ok.ok and ok.stdout_text == "hi\n"
    bad = RunResult(3, b"", b"warming up\nboom: disk full\n", argv=("make",))
    with pytest.raises(CommandError) as e:
        bad.check()
    assert e.value.result is bad
    assert "exited 3" in str(e.value) and "boom: disk full" in str(e.value)
    killed = RunResult(137, b"", b"", signal=9, argv=("sleep", "9"))
    with pytest.raises(CommandError, match="killed by signal 9"):
        killed.check()
    oom = RunResult(137, b"", b"", signal=9, argv=("python3",), oom_killed=True)
    with pytest.raises(CommandError, match="OOM killer.*memory_mib"):
        oom.check()


def test_async_errors_arrive_when_awaited():
    async def main():
        with pytest.raises(ConfigError):
            await AsyncSandbox.create(cpus=0)
        with pytest.raises(ConfigError):
            async with AsyncSandbox.create(memory_mib=0):
                pass

    asyncio.run(main())


def test_connect_to_nothing_names_the_sandbox(monkeypatch, tmp_path):
    monkeypatch.setenv("MSB_STATE_DIR", str(tmp_path))
    with pytest.raises(SandboxError, match="no running sandbox named ghost"):
        Sandbox.connect("ghost")
    with pytest.raises(ConfigError, match="invalid sandbox name"):
        Sandbox.connect("Not/A/Name")


def test_blocking_calls_release_the_interpreter(monkeypatch, ticker):
    """A named sandbox's socket that answers only after a second: the native connect blocks
    that long, and a Python thread must keep running meanwhile."""
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    monkeypatch.setenv("MSB_STATE_DIR", d)
    box = os.path.join(d, "slow")
    os.mkdir(box)
    open(os.path.join(box, "ready"), "w").close()
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(os.path.join(box, "vsock.sock"))
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        c.recv(64)
        time.sleep(1.0)
        c.sendall(b"NO such port\n")
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    with ticker:
        try:
            with pytest.raises(SandboxError, match="unexpected reply from the sandbox: NO such port"):
                Sandbox.connect("slow")
        finally:
            srv.close()
    # About 100 ticks fit in the second the call blocked; with the lock held there would be
    # none at all.
    assert ticker.count >= 20, ticker.count


def _stub_signatures():
    src = open(os.path.join(os.path.dirname(msb_vmm.__file__), "_native.pyi")).read()
    tree = ast.parse(src)
    out = {}

    def params(fn):
        a = fn.args
        names = [p.arg for p in a.posonlyargs + a.args if p.arg != "self"]
        return names, [p.arg for p in a.kwonlyargs]

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and not any(
                    isinstance(d, ast.Name) and d.id == "property" for d in f.decorator_list
                ):
                    out["%s.%s" % (node.name, f.name)] = params(f)
    return out


def test_stubs_match_the_native_module():
    stubs = _stub_signatures()
    assert stubs, "no stubs parsed"
    for key, (pos, kwonly) in stubs.items():
        obj = _native
        for part in key.split("."):
            obj = getattr(obj, part)
        sig = inspect.signature(obj)
        real_pos = [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "$self")
        ]
        real_kw = [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]
        assert (real_pos, real_kw) == (pos, kwonly), key
    # And nothing public in the native module lacks a stub.
    for cls in ("Sandbox", "Process"):
        for name, _ in inspect.getmembers(getattr(_native, cls)):
            if not name.startswith("_") and not isinstance(inspect.getattr_static(getattr(_native, cls), name), property):
                if callable(getattr(getattr(_native, cls), name)):
                    assert "%s.%s" % (cls, name) in stubs, "%s.%s has no stub" % (cls, name)


def test_the_wheel_is_typed_and_carries_the_cli():
    pkg = os.path.dirname(msb_vmm.__file__)
    assert os.path.exists(os.path.join(pkg, "py.typed"))
    cli = os.path.join(pkg, "bin", "msb-vmm")
    assert os.access(cli, os.X_OK), "the wheel lacks its msb-vmm binary"
    from msb_vmm._sync import cli_path

    monkey = os.environ.pop("MSB_VMM_BIN", None)
    try:
        assert cli_path() == cli
    finally:
        if monkey is not None:
            os.environ["MSB_VMM_BIN"] = monkey
