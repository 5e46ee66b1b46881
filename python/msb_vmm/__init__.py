"""msb-vmm: hardware-isolated sandboxes (microVMs) for untrusted code, from Python.

    from msb_vmm import Sandbox
    with Sandbox.create() as sb:
        print(sb.run("echo hello from $(uname -n)").stdout_text)

Sandboxes boot with the guest kernel, msb-init and default root that msb-vmm's set-up
caches (``./x setup`` in a checkout; ``$MSB_CACHE_DIR`` or ``~/.cache/msb-vmm``)."""

from ._async import AsyncFiles, AsyncProcess, AsyncSandbox
from ._native import version as _native_version
from ._sync import Files, Process, Sandbox
from ._types import Event, Exited, FileInfo, Network, RunResult, Secret, Started, Stderr, Stdout
from .errors import *  # noqa: F401,F403 (the exception classes)
from .errors import __all__ as _errors

__version__ = _native_version()

__all__ = [
    "Sandbox",
    "AsyncSandbox",
    "Process",
    "AsyncProcess",
    "Files",
    "AsyncFiles",
    "Network",
    "Secret",
    "RunResult",
    "FileInfo",
    "Event",
    "Started",
    "Stdout",
    "Stderr",
    "Exited",
    *_errors,
]
