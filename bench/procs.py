"""Process plumbing the benchmarks share (a module, not a benchmark).

Each benchmark runs its servers and clients in spawned processes, driven by (command, *args)
tuples over a pipe: `Child` is the parent's end, `serve_commands` the child's loop (`dispatch`
makes its handler from a table of functions). Every child
ignores SIGINT, dies with its parent (PR_SET_PDEATHSIG) and exits when its pipe closes.
`start_py_spy` and `stop_py_spy` record one child's stacks during a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

Handler = Callable[[tuple[Any, ...]], Awaitable[Any]]


def dispatch(commands: Mapping[str, Callable[..., Any]]) -> Handler:
    """The handler of a child whose commands are functions: `(name, *args)` runs
    `commands[name](*args)` (awaited if it is a coroutine) and answers what it returns;
    "stop" answers "stopped"; an unknown name is a ValueError."""

    async def handle(message: tuple[Any, ...]) -> Any:
        command, *args = message
        if command == "stop":
            return "stopped"
        run = commands.get(command)
        if run is None:
            raise ValueError(f"unknown command {command!r}")
        result = run(*args)
        return await result if inspect.isawaitable(result) else result

    return handle


def child_setup() -> None:
    """Leave Ctrl-C to the parent, die with it, and allow thousands of sockets."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    raise_fd_limit()


def raise_fd_limit() -> int:
    """Raise the soft limit on open files as far as allowed; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def serve_commands(conn: Connection, handle: Handler) -> None:
    """Answer the parent's (command, *args) tuples one at a time until "stop" or EOF."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

    def readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(None)

    loop.add_reader(conn.fileno(), readable)
    try:
        while (message := await inbox.get()) is not None:
            reply = await handle(message)
            try:
                conn.send(reply)
            except OSError:  # the parent is gone or gave up on us
                return
            if message[0] == "stop":
                return
    finally:
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(conn.fileno())


class Child:
    """A spawned process and the parent's end of its command pipe."""

    def __init__(self, ctx: Any, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.conn, child_conn = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(target=target, args=(child_conn, *args), name=name, daemon=True)
        self.process.start()
        child_conn.close()
        self._late = 0  # asks that timed out: their replies may still come

    def send(self, *message: Any) -> None:
        self.conn.send(message)

    def recv(self, limit: float) -> Any:
        if not self.conn.poll(limit):
            raise TimeoutError(f"{self.name}: no answer within {limit:.0f} s")
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(1)
            raise RuntimeError(f"{self.name} exited (code {self.process.exitcode}); see its traceback above") from None

    def ask(self, *message: Any, limit: float) -> Any:
        # A reply that came too late to an earlier ask is still in the pipe: drop it first, or
        # every later ask would get the answer to the one before it.
        while self._late:
            self.recv(limit)
            self._late -= 1
        self.send(*message)
        try:
            return self.recv(limit)
        except TimeoutError:
            self._late += 1
            raise

    def close(self, stop_limit: float = 10) -> None:
        """Ask the child to stop, then terminate and kill it if it does not; safe to call twice."""
        if self.process.is_alive() and not self.conn.closed:
            with contextlib.suppress(OSError, TimeoutError, EOFError, RuntimeError):
                self.ask("stop", limit=stop_limit)
        self.conn.close()
        self.process.join(3)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start_py_spy(
    pid: int,
    out: Path,
    *,
    rate: int,
    native: bool = False,
    options: Sequence[str] = (),
    attach_wait: float = 0.0,
) -> subprocess.Popen[bytes]:
    """`py-spy record` of `pid` into `out` (raw, collapsed stacks) until `stop_py_spy`, or its --duration."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Native frames (gRPC core, Cython) need py-spy to pause the process at every sample, which
    # slows it down; Python frames alone do not.
    mode = ["--native"] if native else ["--nonblocking"]
    spy = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", *mode, *options, "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if attach_wait > 0:
        time.sleep(attach_wait)  # attaching takes a moment
    return spy


def stop_py_spy(
    spy: subprocess.Popen[bytes], log: Callable[[str], None], *, finish: float = 0.0, limit: float = 30.0
) -> None:
    """Let py-spy end within `finish` s, else SIGINT it (it then writes what it has); kill it after `limit` s."""
    err: bytes | None = None
    if finish > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _, err = spy.communicate(timeout=finish)
    if err is None:
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    lines = err.decode(errors="replace").strip().splitlines()
    log(f"  py-spy: {lines[-1] if lines else 'done'}")
