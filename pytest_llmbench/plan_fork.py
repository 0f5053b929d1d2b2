"""The plan process as a fork of the controlling process, made before any thread starts.

A plan subprocess (``python -m pytest ...``) spends about 0.8 s of CPU starting: the
interpreter, pytest's and this package's imports, pydantic's models. That is on the
critical path of every run: no request goes out before planning finds it. The
controlling process has all of it loaded already, so at configure time, while it has no
thread but its main one, it forks a child that waits on a pipe (:class:`PlanFork`).
When the fetch is ready to plan, it sends the child the plan's arguments, environment,
directory and log file, and the child becomes the plan process: it runs ``pytest.main``
with them, exactly what the subprocess would run, in its own session (a Ctrl-C in the
terminal is the controller's), and leaves with ``os._exit`` once its session ends (the
controller's inherited objects are never finalised twice; atexit handlers of the plan
do not run).

Forking is used only on Linux and only while the process has a single thread (a fork
of a process with other threads may copy a lock some thread holds). Otherwise, and when
``PYTEST_LLMBENCH_PLAN_FORK=0`` is set, the plan runs as a subprocess as before. A fork that
is never used exits when the pipe closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import NoReturn

FORK_ENV = "PYTEST_LLMBENCH_PLAN_FORK"  # "0": always a subprocess


def can_fork() -> bool:
    """Whether a fork is safe here: Linux, one thread, not turned off. The threads are
    counted by the kernel (``/proc/self/task``): ``threading`` does not see those
    started with ``_thread`` (execnet's, in an xdist worker that runs pytest inline)."""
    if os.environ.get(FORK_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not hasattr(os, "fork") or threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class PlanFork:
    """A forked child waiting to become the plan process (see the module docstring)."""

    def __init__(self, pid: int, pipe: int) -> None:
        self.pid = pid
        self._pipe: int | None = pipe

    @classmethod
    def start(cls) -> PlanFork | None:
        """Fork the waiting child, or None where forking is not safe."""
        if not can_fork():
            return None
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # else the child would write the parent's buffered output
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError:  # no memory or process left for it: a subprocess, as before
            os.close(read_end)
            os.close(write_end)
            return None
        if pid == 0:  # the child: never returns
            os.close(write_end)
            _wait_then_plan(read_end)
        os.close(read_end)
        return cls(pid, write_end)

    def spawn(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> ForkedPlan:
        """Make the child the plan process: ``pytest.main(args)`` in ``cwd`` with ``env``,
        its output in ``log``. One use only."""
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            raise RuntimeError("the plan fork was used already")
        message = json.dumps({"args": args, "env": env, "cwd": str(cwd), "log": str(log)})
        try:
            with open(pipe, "wb") as out:  # closes the pipe: the child reads to the end
                out.write(message.encode("utf-8"))
        except OSError as exc:  # the child died: the caller runs a subprocess instead
            _reap(self.pid)
            raise ForkUnavailable(str(exc)) from None
        return ForkedPlan(self.pid)

    def close(self) -> None:
        """Let an unused child go (it exits at the pipe's end) and reap it."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            os.close(pipe)
            _reap(self.pid)


class ForkUnavailable(Exception):
    """The waiting child is gone; plan in a subprocess instead."""


class ForkedPlan:
    """The plan process made from the fork, awaited like an asyncio subprocess (its exit
    is waited for in the loop's executor; ``returncode`` is negative for a signal)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.get_running_loop().run_in_executor(None, self._wait)

    def _wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _wait_then_plan(pipe: int) -> NoReturn:
    """The child: wait for the plan's arguments, then run it; leave with ``os._exit``."""
    status = 70  # EX_SOFTWARE: the child failed before pytest ran
    try:
        os.setsid()  # its own session, like the subprocess's start_new_session
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        chunks = []
        while chunk := os.read(pipe, 65536):
            chunks.append(chunk)
        os.close(pipe)
        status = _plan(json.loads(b"".join(chunks))) if chunks else 0
    except BaseException:  # nothing may reach the controller's code
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)


def _plan(message: dict[str, object]) -> int:
    """Run the plan session as ``python -m pytest`` would, in this (forked) process."""
    os.chdir(str(message["cwd"]))
    env = message["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update(env)
    log = os.open(str(message["log"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null, 0), (log, 1), (log, 2)):
        os.dup2(fd, target)
    os.close(log)
    os.close(null)
    # the interpreter's own streams over fds 0-2 (the controller's may be pytest's capture)
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__
    import pytest

    args = message["args"]
    assert isinstance(args, list)
    return int(pytest.main([str(a) for a in args]))
