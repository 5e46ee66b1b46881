"""Plain data the API takes and returns."""

from __future__ import annotations

import os
import stat as _stat
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from .errors import CommandError, ConfigError

#: A command: a list of arguments (``str`` or ``bytes``), or one string run by ``/bin/sh -c``.
Cmd = Union[str, Sequence[Union[str, bytes]]]
#: A guest or host path.
PathLike = Union[str, bytes, "os.PathLike[str]"]


@dataclass(frozen=True)
class RunResult:
    """What a finished command left: its exit code (128 + N when killed by signal N, as
    shells report it), the signal if any, and its output. ``oom_killed``: the guest's OOM
    killer ended it (give the sandbox more ``memory_mib``)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: Optional[int] = None
    timed_out: bool = False
    argv: Tuple[Union[str, bytes], ...] = ()
    oom_killed: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def check(self) -> "RunResult":
        """Raises CommandError unless the command exited 0; returns self otherwise."""
        if self.exit_code != 0:
            if self.oom_killed:
                what = "was ended by the sandbox's OOM killer (give it more memory_mib)"
            elif self.signal:
                what = "killed by signal %d" % self.signal
            else:
                what = "exited %d" % self.exit_code
            tail = self.stderr_text.strip().splitlines()[-1:] or [""]
            msg = "command %s %s" % (_show(self.argv), what)
            if tail[0]:
                msg += ": " + tail[0]
            raise CommandError(msg, self)
        return self


def _show(argv: Sequence[Union[str, bytes]]) -> str:
    parts = [a.decode("utf-8", "replace") if isinstance(a, bytes) else a for a in argv]
    text = " ".join(parts)
    return repr(text if len(text) <= 80 else text[:77] + "...")


@dataclass(frozen=True)
class Started:
    """The process started with this guest pid."""

    pid: int


@dataclass(frozen=True)
class Stdout:
    """A chunk of standard output (of the terminal's output, with ``tty``)."""

    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class Stderr:
    """A chunk of standard error."""

    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class Exited:
    """The process ended: ``exit_code`` and ``oom_killed`` as RunResult has them."""

    exit_code: int
    signal: Optional[int] = None
    timed_out: bool = False
    oom_killed: bool = False


Event = Union[Started, Stdout, Stderr, Exited]


def event_of(raw: tuple) -> Event:
    kind = raw[0]
    if kind == "stdout":
        return Stdout(raw[1])
    if kind == "stderr":
        return Stderr(raw[1])
    if kind == "started":
        return Started(raw[1])
    code, sig, timed_out, oom_killed = raw[1], raw[2], raw[3], raw[4]
    return Exited(code if code is not None else 128 + sig, sig, timed_out, oom_killed)


_KINDS = {
    "file": _stat.S_IFREG,
    "dir": _stat.S_IFDIR,
    "symlink": _stat.S_IFLNK,
    "char_device": _stat.S_IFCHR,
    "block_device": _stat.S_IFBLK,
    "fifo": _stat.S_IFIFO,
    "socket": _stat.S_IFSOCK,
}


@dataclass(frozen=True)
class FileInfo:
    """A guest path's metadata. ``kind`` is one of file, dir, symlink, char_device,
    block_device, fifo, socket; ``mode`` the permission bits; ``mtime`` seconds since the
    epoch."""

    path: str
    kind: str
    mode: int
    size: int
    uid: int
    gid: int
    mtime: int

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1] or "/"

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def st_mode(self) -> int:
        """``mode`` with the file-type bits, as ``os.stat`` gives it."""
        return _KINDS[self.kind] | self.mode


@dataclass(frozen=True)
class Secret:
    """A secret the guest holds only as a placeholder: the real value is sent only to
    ``hosts`` (domains, ``*.suffix``), inside TLS the sandbox intercepts. Without ``value`` it
    is read from this process's environment variable of the secret's name."""

    hosts: Sequence[str]
    value: Optional[Union[str, bytes]] = None


@dataclass(frozen=True)
class Network:
    """The sandbox's network and egress policy, as the CLI's flags have it.

    ``preset``: none, public (the default: the public internet only), all, non-local or
    learn. ``allow``/``deny``: rules by domain, ``*.suffix``, IP, CIDR, with ``:PORT`` and
    ``/udp``. ``policy_file``: a policy TOML file. ``publish``: ``[HOSTIP:]HOSTPORT:GUESTPORT``
    host ports forwarded into the guest. ``audit_log``: a file that gets one JSON line per
    flow and DNS decision."""

    preset: Optional[str] = None
    allow: Sequence[str] = ()
    deny: Sequence[str] = ()
    policy_file: Optional[PathLike] = None
    publish: Sequence[str] = ()
    audit_log: Optional[PathLike] = None
    mtu: int = 1500
    max_flows: int = 1024

    def __post_init__(self) -> None:
        for name in ("allow", "deny", "publish"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)):
                raise ConfigError("network %s: give a list of rules, not one string" % name)

    @classmethod
    def of(cls, value: Union["Network", str, bool, None]) -> "Network":
        """``None``/``True``: the default (public); ``False``: none; a string: a preset."""
        if isinstance(value, Network):
            return value
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(preset="none")
        if isinstance(value, str):
            return cls(preset=value)
        raise ConfigError("network: give a Network, a preset name, True or False, not %r" % (value,))


def native_network(net: Network, secrets: Optional[Mapping[str, Union[str, Sequence[str], Secret]]]) -> Dict[str, object]:
    """The keyword arguments the native module takes for a network."""
    secret_list = []
    for name, spec in (secrets or {}).items():
        if not isinstance(name, str) or not name:
            raise ConfigError("secrets: names must be non-empty strings, not %r" % (name,))
        if isinstance(spec, str):
            spec = Secret(hosts=[spec])
        elif not isinstance(spec, Secret):
            spec = Secret(hosts=list(spec))
        value = spec.value.encode() if isinstance(spec.value, str) else spec.value
        secret_list.append((name, ",".join(spec.hosts), value))
    return {
        "preset": net.preset,
        "allow": list(net.allow),
        "deny": list(net.deny),
        "policy_file": os.fspath(net.policy_file) if net.policy_file is not None else None,
        "publish": list(net.publish),
        "audit_log": os.fspath(net.audit_log) if net.audit_log is not None else None,
        "mtu": net.mtu,
        "max_flows": net.max_flows,
        "secrets": secret_list,
    }


def argv_of(cmd: Cmd) -> Tuple[Union[str, bytes], ...]:
    """A command's argv: a string is a shell command line."""
    if isinstance(cmd, (str, bytes)):
        return ("/bin/sh", "-c", cmd)
    argv = tuple(cmd)
    if not argv:
        raise ConfigError("an empty command: give at least the program")
    for a in argv:
        if not isinstance(a, (str, bytes)):
            raise ConfigError("command arguments must be str or bytes, not %s" % type(a).__name__)
    return argv


def env_of(base: Optional[Mapping[str, str]], extra: Optional[Mapping[str, str]]) -> list:
    merged: Dict[str, str] = dict(base or {})
    merged.update(extra or {})
    for k, v in merged.items():
        if not isinstance(k, (str, bytes)) or not k or ("=" in k if isinstance(k, str) else b"=" in k):
            raise ConfigError("env: invalid variable name %r" % (k,))
        if not isinstance(v, (str, bytes)):
            raise ConfigError("env %s: values must be str or bytes, not %s" % (k, type(v).__name__))
    return list(merged.items())


def tty_of(tty: Union[bool, Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    if tty is True:
        try:
            size = os.get_terminal_size()
            return (size.lines, size.columns)
        except OSError:
            return (24, 80)
    if tty is False or tty is None:
        return None
    rows, cols = tty
    return (int(rows), int(cols))


def timeout_of(name: str, t: Optional[float]) -> Optional[float]:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ConfigError("%s %r: use a positive number of seconds" % (name, t))
    return float(t)
