"""The blocking API: Sandbox, Process, Files."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import IO, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from . import _native
from ._types import (
    Cmd,
    Event,
    Exited,
    FileInfo,
    Network,
    PathLike,
    RunResult,
    Secret,
    Stderr,
    Stdout,
    argv_of,
    env_of,
    event_of,
    native_network,
    timeout_of,
    tty_of,
)
from .errors import ConfigError, ExecTimeout, SandboxError, SetupError


def _guest_path(p: PathLike) -> Union[str, bytes]:
    p = os.fspath(p)
    if (p[:1] if isinstance(p, str) else p[:1]) not in ("/", b"/"):
        raise ConfigError("guest path %r: use an absolute path" % (p,))
    return p


def _check_size(name: str, v: int, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError("%s %r: use a whole number of at least %d" % (name, v, lo))
    return v


class Process:
    """A command running in a sandbox. Iterate it for events (Started, Stdout, Stderr,
    Exited); ``wait()`` collects the rest into a RunResult. Leaving a ``with`` block kills
    it if it still runs."""

    def __init__(self, native: "_native.Process", argv: Tuple[Union[str, bytes], ...]) -> None:
        self._native = native
        self._argv = argv
        self._exited: Optional[Exited] = None

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        ev = self.next_event()
        if ev is None:
            raise StopIteration
        return ev

    def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event; ``None`` after Exited, or when ``timeout`` seconds passed first
        (check ``exited`` to tell them apart)."""
        if self._exited is not None:
            return None
        raw = self._native.next_event(timeout)
        if raw is None or raw == ():
            return None
        ev = event_of(raw)
        if isinstance(ev, Exited):
            self._exited = ev
        return ev

    @property
    def exited(self) -> Optional[Exited]:
        """The Exited event once it was seen."""
        return self._exited

    def write_stdin(self, data: Union[bytes, str]) -> None:
        """Feeds the process's stdin (start it with ``stdin=True``)."""
        self._native.write_stdin(data.encode() if isinstance(data, str) else data)

    def close_stdin(self) -> None:
        self._native.close_stdin()

    def signal(self, sig: int) -> None:
        """Sends signal ``sig`` (e.g. ``signal.SIGTERM``) to the process group."""
        self._native.signal(int(sig))

    def kill(self) -> None:
        """Kills the process group (SIGKILL)."""
        self._native.kill()

    def resize(self, rows: int, cols: int) -> None:
        """Resizes the terminal of a process started with ``tty``."""
        self._native.resize(rows, cols)

    def wait(self, *, check: bool = False) -> RunResult:
        """Collects the remaining output and the exit status."""
        out: List[bytes] = []
        err: List[bytes] = []
        for ev in self:
            if isinstance(ev, Stdout):
                out.append(ev.data)
            elif isinstance(ev, Stderr):
                err.append(ev.data)
        ex = self._exited
        if ex is None:
            raise SandboxError("the process ended without an exit status")
        r = RunResult(ex.exit_code, b"".join(out), b"".join(err), ex.signal, ex.timed_out, self._argv,
                      ex.oom_killed)
        if r.timed_out:
            raise ExecTimeout("command %s timed out" % (_show(self._argv),), r)
        return r.check() if check else r

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._exited is None:
            try:
                self.kill()
            except Exception:
                pass


def _show(argv: Sequence[Union[str, bytes]]) -> str:
    from ._types import _show as show

    return show(argv)


class Files:
    """A sandbox's files, through its agent (any guest path, not only shared ones)."""

    def __init__(self, native: "_native.Sandbox") -> None:
        self._native = native

    def read(self, path: PathLike) -> bytes:
        return self._native.read_file(_guest_path(path))

    def read_text(self, path: PathLike, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: PathLike, data: Union[bytes, str], mode: int = 0o644) -> None:
        """Writes a file, creating its parent directories."""
        if isinstance(data, str):
            data = data.encode()
        self._native.write_file(_guest_path(path), bytes(data), _mode(mode))

    def read_into(self, path: PathLike, file: IO[bytes]) -> int:
        """Streams a guest file into a binary file object; returns the bytes copied."""
        return self._native.read_file_into(_guest_path(path), file)

    def write_from(self, path: PathLike, file: IO[bytes], mode: int = 0o644) -> None:
        """Streams a binary file object into a guest file."""
        self._native.write_file_from(_guest_path(path), file, _mode(mode))

    def download(self, path: PathLike, host_path: PathLike) -> int:
        """Copies a guest file to a host path; returns its size."""
        with open(host_path, "wb") as f:
            return self.read_into(path, f)

    def upload(self, host_path: PathLike, path: PathLike, mode: Optional[int] = None) -> None:
        """Copies a host file into the guest, with its permission bits unless ``mode``."""
        if mode is None:
            mode = os.stat(host_path).st_mode & 0o7777
        with open(host_path, "rb") as f:
            self.write_from(path, f, mode)

    def stat(self, path: PathLike) -> FileInfo:
        p = _guest_path(path)
        return FileInfo(_text(p), *self._native.stat(p))

    def exists(self, path: PathLike) -> bool:
        try:
            self.stat(path)
            return True
        except FileNotFoundError:
            return False

    def list(self, path: PathLike) -> List[FileInfo]:
        """A directory's entries, sorted by name."""
        p = _text(_guest_path(path)).rstrip("/")
        return sorted(
            (FileInfo(p + "/" + name.decode("utf-8", "surrogateescape"), *st) for name, st in self._native.list_dir(_guest_path(path))),
            key=lambda f: f.path,
        )

    def remove(self, path: PathLike, recursive: bool = False) -> None:
        self._native.remove(_guest_path(path), recursive)


def _text(p: Union[str, bytes]) -> str:
    return p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else p


def _mode(mode: int) -> int:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ConfigError("mode %r: use permission bits such as 0o644" % (mode,))
    return mode


class Sandbox:
    """A hardware-isolated sandbox.

    ``with Sandbox.create(...) as sb:`` boots one in this process and powers it off when the
    block ends (also on an exception or Ctrl-C). ``Sandbox.start(name=...)`` starts a named
    one that outlives this process, as ``msb-vmm start`` does; ``Sandbox.connect(name)``
    reaches a named one."""

    def __init__(self, native: "_native.Sandbox", *, env: Optional[Mapping[str, str]] = None,
                 workdir: Optional[str] = None, user: Optional[str] = None, owns_named: bool = False) -> None:
        self._native = native
        self._env = dict(env or {})
        self._workdir = workdir
        self._user = user
        self._owns_named = owns_named
        self.files = Files(native)

    @classmethod
    def create(
        cls,
        *,
        cpus: int = 1,
        memory_mib: int = 512,
        volumes: Sequence[str] = (),
        network: Union[Network, str, bool, None] = None,
        env: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        user: Optional[str] = None,
        secrets: Optional[Mapping[str, Union[str, Sequence[str], Secret]]] = None,
        timeout: Optional[float] = None,
        image: Optional[str] = None,
        rootfs: Optional[PathLike] = None,
        tmpfs: Optional[Mapping[str, int]] = None,
        hostname: Optional[str] = None,
        kernel: Optional[PathLike] = None,
        boot_timeout: Optional[float] = None,
        insecure_registries: Sequence[str] = (),
        console: bool = False,
    ) -> "Sandbox":
        """Boots a sandbox in this process and returns once it runs commands.

        ``volumes``: ``HOST_DIR:/GUEST/PATH[:ro]`` shares. ``network``: a Network, a preset
        name, or False for none. ``env``, ``workdir``, ``user``: defaults for every command.
        ``secrets``: ``{NAME: hosts or Secret}``. ``timeout``: the sandbox's lifetime in
        seconds (it powers off then). ``image``: an OCI image (registry reference,
        ``oci:DIR[:TAG]``, ``docker-archive:FILE``) as the root instead of the default.
        ``tmpfs``: ``{guest_path: max_bytes}`` (0: half the memory)."""
        if isinstance(volumes, str):
            raise ConfigError("volumes: give a list of HOST:GUEST specs, not one string")
        net = Network.of(network)
        env_of(env, None)
        native = _native.Sandbox.create(
            cpus=_check_size("cpus", cpus, 1),
            memory_mib=_check_size("memory_mib", memory_mib, 1),
            kernel=os.fsdecode(kernel) if kernel is not None else None,
            rootfs=os.fsdecode(rootfs) if rootfs is not None else None,
            image=image,
            insecure_registries=list(insecure_registries),
            volumes=list(volumes),
            tmpfs=[(p, _check_size("tmpfs size", s, 0)) for p, s in (tmpfs or {}).items()],
            hostname=hostname,
            network=native_network(net, secrets),
            boot_timeout=timeout_of("boot_timeout", boot_timeout),
            lifetime=timeout_of("timeout", timeout),
            console=console,
        )
        return cls(native, env=env, workdir=workdir, user=user)

    @classmethod
    def connect(cls, name: str, *, env: Optional[Mapping[str, str]] = None,
                workdir: Optional[str] = None, user: Optional[str] = None) -> "Sandbox":
        """Reaches the running named sandbox ``name``. Leaving a ``with`` block only
        disconnects; ``stop()`` ends it."""
        return cls(_native.Sandbox.connect(name), env=env, workdir=workdir, user=user)

    @classmethod
    def start(
        cls,
        name: str,
        *,
        cpus: int = 1,
        memory_mib: int = 512,
        volumes: Sequence[str] = (),
        network: Union[Network, str, bool, None] = None,
        env: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        user: Optional[str] = None,
        secrets: Optional[Mapping[str, Union[str, Sequence[str], Secret]]] = None,
        timeout: Optional[float] = None,
        image: Optional[str] = None,
        rootfs: Optional[PathLike] = None,
        hostname: Optional[str] = None,
        kernel: Optional[PathLike] = None,
    ) -> "Sandbox":
        """Starts the named sandbox ``name`` in a process of its own (``msb-vmm start``), so
        it outlives this one and the CLI sees it; returns it connected. Leaving a ``with``
        block stops it."""
        args = ["start", "--name", name, "--cpus", str(_check_size("cpus", cpus, 1)),
                "--memory", str(_check_size("memory_mib", memory_mib, 1))]
        child_env = dict(os.environ)
        if kernel is not None:
            args += ["--kernel", os.fsdecode(kernel)]
        if hostname is not None:
            args += ["--hostname", hostname]
        if image is not None:
            args += ["--image", image]
        if rootfs is not None:
            args += ["--rootfs", os.fsdecode(rootfs)]
        if isinstance(volumes, str):
            raise ConfigError("volumes: give a list of HOST:GUEST specs, not one string")
        for v in volumes:
            args += ["--volume", v]
        net = Network.of(network)
        if net.preset is not None:
            args += ["--net", net.preset]
        for r in net.allow:
            args += ["--allow", r]
        for r in net.deny:
            args += ["--deny", r]
        if net.policy_file is not None:
            args += ["--policy", os.fsdecode(net.policy_file)]
        for p in net.publish:
            args += ["--publish", p]
        if net.audit_log is not None:
            args += ["--net-log", os.fsdecode(net.audit_log)]
        args += ["--mtu", str(net.mtu), "--max-flows", str(net.max_flows)]
        secret_list: List[Tuple[str, str, Optional[bytes]]] = native_network(net, secrets)["secrets"]  # type: ignore[assignment]
        for sname, hosts, value in secret_list:
            args += ["--secret", "%s=%s" % (sname, hosts)]
            if value is not None:
                # Values travel in the child's environment, never on its command line.
                child_env[sname] = value.decode("utf-8", "surrogateescape")
        if timeout is not None:
            args += ["--max-lifetime", str(timeout_of("timeout", timeout))]
        run_cli(args, env=child_env)
        sb = cls.connect(name, env=env, workdir=workdir, user=user)
        sb._owns_named = True
        return sb

    @classmethod
    def _from_agent_socket(cls, path: PathLike, **kwargs: object) -> "Sandbox":
        """The agent served on a Unix socket by ``msb-init agent --listen PATH`` (a host
        process, no VM): how the SDK's host-transport tests and benchmark run at full speed."""
        return cls(_native.Sandbox._connect_agent_socket(os.fspath(path)), **kwargs)  # type: ignore[arg-type]

    @property
    def name(self) -> Optional[str]:
        """The name of a named sandbox; None for one this process runs."""
        return self._native.name

    @property
    def alive(self) -> bool:
        return self._native.alive

    def stream(
        self,
        cmd: Cmd,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        stdin: bool = False,
        timeout: Optional[float] = None,
        tty: Union[bool, Tuple[int, int]] = False,
    ) -> Process:
        """Starts ``cmd`` and returns the running Process (iterate it for events)."""
        argv = argv_of(cmd)
        native = self._native.exec(
            list(argv),
            env=env_of(self._env, env),
            cwd=cwd if cwd is not None else self._workdir,
            user=user if user is not None else self._user,
            stdin=bool(stdin) or tty_of(tty) is not None,
            tty=tty_of(tty),
            timeout=timeout_of("timeout", timeout),
        )
        return Process(native, argv)

    def run(
        self,
        cmd: Cmd,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        stdin: Union[bytes, str, None] = None,
        timeout: Optional[float] = None,
        tty: Union[bool, Tuple[int, int]] = False,
        check: bool = False,
    ) -> RunResult:
        """Runs ``cmd`` to its end and returns its RunResult. ``stdin``: bytes fed to it.
        ``timeout``: kill it after this many seconds and raise ExecTimeout. ``check``: raise
        CommandError unless it exits 0."""
        argv = argv_of(cmd)
        if isinstance(stdin, str):
            stdin = stdin.encode()
        code, sig, timed_out, oom_killed, out, err = self._native.run(
            list(argv),
            env=env_of(self._env, env),
            cwd=cwd if cwd is not None else self._workdir,
            user=user if user is not None else self._user,
            stdin=stdin,
            tty=tty_of(tty),
            timeout=timeout_of("timeout", timeout),
        )
        r = RunResult(code if code is not None else 128 + (sig or 0), out, err, sig, timed_out, argv,
                      oom_killed)
        if timed_out:
            raise ExecTimeout("command %s timed out after %s s" % (_show(argv), timeout), r)
        return r.check() if check else r

    def run_python(self, code: str, *, python: str = "python3", **kwargs: object) -> RunResult:
        """Runs Python source ``code`` in the guest (``python3 -c``); keywords as for run."""
        return self.run([python, "-c", code], **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Powers the sandbox off and releases everything it held; a named sandbox is
        stopped as ``msb-vmm stop`` does. Idempotent."""
        name = self._native.name
        self._native.close()
        if name is not None:
            run_cli(["stop", name])

    def close(self) -> None:
        """Disconnects from a named sandbox (it keeps running); stops one this process runs."""
        self._native.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._native.name is None or self._owns_named:
            self.stop()
        else:
            self.close()

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return "<msb_vmm.Sandbox %s%s>" % (("%s " % self.name) if self.name else "", state)


def cli_path() -> str:
    """The msb-vmm binary for named sandboxes: ``$MSB_VMM_BIN``, the one in this wheel, or
    ``msb-vmm`` on PATH."""
    env = os.environ.get("MSB_VMM_BIN")
    if env:
        return env
    bundled = os.path.join(os.path.dirname(__file__), "bin", "msb-vmm")
    if os.access(bundled, os.X_OK):
        return bundled
    found = shutil.which("msb-vmm")
    if found:
        return found
    raise SetupError("no msb-vmm binary for named sandboxes: install the wheel with its bundled binary, put msb-vmm on PATH, or set MSB_VMM_BIN")


def run_cli(args: List[str], env: Optional[Mapping[str, str]] = None) -> None:
    """Runs the CLI; its one-line error becomes a SandboxError (ConfigError for usage)."""
    p = subprocess.run([cli_path(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env=dict(env) if env is not None else None)
    if p.returncode != 0:
        lines = [l for l in p.stderr.decode("utf-8", "replace").strip().splitlines() if l.strip()]
        msg = lines[-1] if lines else "msb-vmm %s exited %d" % (args[0], p.returncode)
        msg = msg.removeprefix("error: ").removeprefix("msb-vmm: ")
        raise (ConfigError if p.returncode == 2 else SandboxError)(msg)
