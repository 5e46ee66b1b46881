"""The asyncio API: the same surface as the blocking one, each call awaited. Blocking native
calls run on a thread pool of this module (the native layer releases the interpreter lock), so
many sandboxes and commands run at once; cancelling an awaited command kills it in the guest."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from typing import IO, Any, Awaitable, Callable, Generator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

from . import _native
from ._sync import Files, Process, Sandbox
from ._types import Cmd, Event, FileInfo, Network, PathLike, RunResult, Secret, Stderr, Stdout, argv_of

T = TypeVar("T")

# Threads mostly wait on the guest; many commands may be in flight at once.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="msb-vmm")


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))


# How long one pooled wait for output lasts: a cancelled command's thread is free again
# within this.
_WAIT = 0.2


class AsyncProcess:
    """A running command: ``async for event in proc``; ``await proc.wait()``. Cancelling a
    task awaiting it kills the process."""

    def __init__(self, proc: Process) -> None:
        self._proc = proc

    def __aiter__(self) -> "AsyncProcess":
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._proc.exited is not None:
                raise StopAsyncIteration
            try:
                ev = await _call(self._proc.next_event, _WAIT)
            except asyncio.CancelledError:
                self._kill_quietly()
                raise
            if ev is not None:
                return ev

    @property
    def exited(self):  # type: ignore[no-untyped-def]
        return self._proc.exited

    async def wait(self, *, check: bool = False) -> RunResult:
        cancel = threading.Event()

        def collect() -> RunResult:
            while self._proc.exited is None and not cancel.is_set():
                ev = self._proc.next_event(_WAIT)
                if ev is not None:
                    self._out(ev)
            return self._result(check)

        self._chunks: Tuple[List[bytes], List[bytes]] = ([], [])
        try:
            return await _call(collect)
        except asyncio.CancelledError:
            cancel.set()
            self._kill_quietly()
            raise

    def _out(self, ev: Event) -> None:
        if isinstance(ev, Stdout):
            self._chunks[0].append(ev.data)
        elif isinstance(ev, Stderr):
            self._chunks[1].append(ev.data)

    def _result(self, check: bool) -> RunResult:
        from .errors import ExecTimeout

        ex = self._proc.exited
        if ex is None:
            raise asyncio.CancelledError()
        r = RunResult(ex.exit_code, b"".join(self._chunks[0]), b"".join(self._chunks[1]),
                      ex.signal, ex.timed_out, self._proc._argv, ex.oom_killed)
        if r.timed_out:
            raise ExecTimeout("command timed out", r)
        return r.check() if check else r

    def _kill_quietly(self) -> None:
        if self._proc.exited is None:
            try:
                self._proc.kill()
            except Exception:
                pass

    async def write_stdin(self, data: Union[bytes, str]) -> None:
        await _call(self._proc.write_stdin, data)

    async def close_stdin(self) -> None:
        await _call(self._proc.close_stdin)

    def signal(self, sig: int) -> None:
        self._proc.signal(sig)

    def kill(self) -> None:
        self._proc.kill()

    def resize(self, rows: int, cols: int) -> None:
        self._proc.resize(rows, cols)


class AsyncFiles:
    """``Files`` with every call awaited."""

    def __init__(self, files: Files) -> None:
        self._f = files

    async def read(self, path: PathLike) -> bytes:
        return await _call(self._f.read, path)

    async def read_text(self, path: PathLike, encoding: str = "utf-8") -> str:
        return await _call(self._f.read_text, path, encoding)

    async def write(self, path: PathLike, data: Union[bytes, str], mode: int = 0o644) -> None:
        await _call(self._f.write, path, data, mode)

    async def read_into(self, path: PathLike, file: IO[bytes]) -> int:
        return await _call(self._f.read_into, path, file)

    async def write_from(self, path: PathLike, file: IO[bytes], mode: int = 0o644) -> None:
        await _call(self._f.write_from, path, file, mode)

    async def download(self, path: PathLike, host_path: PathLike) -> int:
        return await _call(self._f.download, path, host_path)

    async def upload(self, host_path: PathLike, path: PathLike, mode: Optional[int] = None) -> None:
        await _call(self._f.upload, host_path, path, mode)

    async def stat(self, path: PathLike) -> FileInfo:
        return await _call(self._f.stat, path)

    async def exists(self, path: PathLike) -> bool:
        return await _call(self._f.exists, path)

    async def list(self, path: PathLike) -> List[FileInfo]:
        return await _call(self._f.list, path)

    async def remove(self, path: PathLike, recursive: bool = False) -> None:
        await _call(self._f.remove, path, recursive)


class _Opening:
    """What ``AsyncSandbox.create`` returns: await it, or use it in ``async with``."""

    def __init__(self, make: Callable[[], Sandbox]) -> None:
        self._make = make
        self._sb: Optional[AsyncSandbox] = None

    async def _open(self) -> "AsyncSandbox":
        self._sb = AsyncSandbox(await _call(self._make))
        return self._sb

    def __await__(self) -> Generator[Any, None, "AsyncSandbox"]:
        return self._open().__await__()

    async def __aenter__(self) -> "AsyncSandbox":
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        if self._sb is not None:
            await self._sb.__aexit__(*exc)


class AsyncSandbox:
    """A sandbox driven from asyncio: ``async with AsyncSandbox.create(...) as sb:``."""

    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb
        self.files = AsyncFiles(sb.files)

    @classmethod
    def create(cls, **kwargs: Any) -> _Opening:
        """As ``Sandbox.create``."""
        return _Opening(lambda: Sandbox.create(**kwargs))

    @classmethod
    def start(cls, name: str, **kwargs: Any) -> _Opening:
        """As ``Sandbox.start``."""
        return _Opening(lambda: Sandbox.start(name, **kwargs))

    @classmethod
    def connect(cls, name: str, **kwargs: Any) -> _Opening:
        """As ``Sandbox.connect``."""
        return _Opening(lambda: Sandbox.connect(name, **kwargs))

    @property
    def name(self) -> Optional[str]:
        return self._sb.name

    @property
    def alive(self) -> bool:
        return self._sb.alive

    @property
    def sync(self) -> Sandbox:
        """The blocking Sandbox underneath."""
        return self._sb

    async def stream(self, cmd: Cmd, **kwargs: Any) -> AsyncProcess:
        """As ``Sandbox.stream``: ``async for event in await sb.stream(...)``."""
        return AsyncProcess(await _call(self._sb.stream, cmd, **kwargs))

    async def run(self, cmd: Cmd, *, stdin: Union[bytes, str, None] = None, check: bool = False,
                  **kwargs: Any) -> RunResult:
        """As ``Sandbox.run``; cancelling the awaiting task kills the command in the guest."""
        argv_of(cmd)
        proc = await self.stream(cmd, stdin=stdin is not None, **kwargs)
        if stdin is not None:
            data = stdin.encode() if isinstance(stdin, str) else stdin

            def feed() -> None:
                try:
                    proc._proc.write_stdin(data)
                    proc._proc.close_stdin()
                except Exception:
                    pass

            threading.Thread(target=feed, daemon=True).start()
        return await proc.wait(check=check)

    async def run_python(self, code: str, *, python: str = "python3", **kwargs: Any) -> RunResult:
        return await self.run([python, "-c", code], **kwargs)

    async def stop(self) -> None:
        await _call(self._sb.stop)

    async def close(self) -> None:
        await _call(self._sb.close)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Shielded: a cancelled task still powers its sandbox off.
        await asyncio.shield(_call(self._sb.__exit__, *exc))

    def __repr__(self) -> str:
        return "<msb_vmm.AsyncSandbox %r>" % (self._sb,)


__all__ = ["AsyncSandbox", "AsyncProcess", "AsyncFiles", "Network", "Secret"]
