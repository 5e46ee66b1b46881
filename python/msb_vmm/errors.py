"""The exceptions msb-vmm raises: one hierarchy under MsbError, each carrying the same one-line
message as the CLI prints. Missing, forbidden or existing guest files are also the matching
built-in OSError kinds, so ``except FileNotFoundError`` works as for local files."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from ._types import RunResult


class MsbError(Exception):
    """Anything msb-vmm raises."""


class SetupError(MsbError):
    """The host cannot run sandboxes yet: no usable /dev/kvm, a missing guest kernel or
    msb-init (``./x setup`` builds them), a missing tool. The message names the fix."""


class ConfigError(MsbError, ValueError):
    """A bad argument: an out-of-range size, a malformed volume, an empty command."""


class PolicyError(ConfigError):
    """A bad egress rule, preset, policy file or secret; the message names it."""


class ImageError(MsbError):
    """An OCI image could not be pulled, verified or unpacked."""


class SandboxError(MsbError):
    """The sandbox failed or is gone: the guest stopped, did not boot in time, its agent
    closed the connection. ``console_tail`` holds the guest console's last lines when the guest
    itself failed."""

    console_tail: Sequence[str] = ()


class ExecTimeout(SandboxError):
    """A command ran past its ``timeout`` and was killed; ``result`` holds what it wrote."""

    def __init__(self, message: str, result: Optional["RunResult"] = None) -> None:
        super().__init__(message)
        self.result = result


class CommandError(SandboxError):
    """``check=True`` and the command exited non-zero; ``result`` holds its output."""

    def __init__(self, message: str, result: "RunResult") -> None:
        super().__init__(message)
        self.result = result


class GuestFileNotFoundError(SandboxError, FileNotFoundError):
    """A guest path (or a command's program) does not exist."""


class GuestPermissionError(SandboxError, PermissionError):
    """The guest refused access to a path."""


class GuestFileExistsError(SandboxError, FileExistsError):
    """A guest path is in the way."""


__all__ = [
    "MsbError",
    "SetupError",
    "ConfigError",
    "PolicyError",
    "ImageError",
    "SandboxError",
    "ExecTimeout",
    "CommandError",
    "GuestFileNotFoundError",
    "GuestPermissionError",
    "GuestFileExistsError",
]
