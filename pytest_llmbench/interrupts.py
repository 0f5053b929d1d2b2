"""Ctrl-C and SIGTERM while the prefetch runs: keep what is in flight.

The first signal stops the fetch from sending anything new and waits up to
``--llm-drain-timeout`` seconds for the requests in flight, whose answers are stored as
they arrive; then the session ends with one line, ``interrupted: N of M answers stored;
run the same command to resume``, and pytest's interrupted status (2). A second signal
during that wait gives up on what is still in flight and ends the session at once.
Neither prints a traceback. Outside the fetch both signals behave as they would without
the plugin (SIGINT: pytest's KeyboardInterrupt; SIGTERM: the default, termination).

The handlers are installed from the main thread (only it may) when the fetch starts,
and removed at the end of the session.
"""

from __future__ import annotations

import os
import signal
import sysconfig
from types import FrameType
from typing import TYPE_CHECKING, Any

import pytest

from .errors import RunInterrupted

if TYPE_CHECKING:
    from .engine import Fetch

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: where the standard library's modules live (their frames say nothing of who called them)
_STDLIB = os.path.join(sysconfig.get_paths()["stdlib"], "")
ABORT_JOIN_S = 2.0  # after cancelling what was in flight: the thread's own wind-down


class Interrupts:
    """The signal handlers of one fetch (see the module docstring)."""

    def __init__(self, fetch: Fetch, session: pytest.Session, drain_s: float) -> None:
        self.fetch = fetch
        self.session = session
        self.drain_s = drain_s
        self.draining = False
        self.message: str | None = None  # the line the session ended with, if it did
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self.handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def line(self, *, aborted: bool = False) -> str:
        progress = self.fetch.progress
        stored, total = progress.done, progress.total
        if aborted:
            return (
                f"interrupted twice: {stored} of {total} answers stored, those in flight "
                f"abandoned; run the same command to resume"
            )
        return f"interrupted: {stored} of {total} answers stored; run the same command to resume"

    def handle(self, signum: int, frame: FrameType | None) -> None:
        fetch = self.fetch
        if self.draining:  # the second signal: give up on what is in flight
            fetch.abort()
            fetch.join(ABORT_JOIN_S)
            self.message = self.line(aborted=True)
            raise RunInterrupted(self.message)
        if not fetch.running:
            self._default(signum, frame)
            return
        self.draining = True
        fetch.stop(interrupted=True)
        if not fetch.join(self.drain_s):
            fetch.abort()
            fetch.join(ABORT_JOIN_S)
        self.message = self.line()
        self.session.shouldstop = self.message  # also if a test swallows the exception
        if in_pytest(frame) and not self.session.config.pluginmanager.hasplugin("dsession"):
            # (xdist's controller runs no test, and stops on its own flag, not this one)
            # pytest's own code between the phases of a test: an exception raised there
            # can leave a hook wrapper half-run (its generator, closed later by the
            # garbage collector once capturing has ended, prints an unraisable traceback);
            # pytest stops after this test instead, with the same line and status, and a
            # test that waits for an answer meanwhile is told the run was interrupted
            return
        raise RunInterrupted(self.message)

    def _default(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)  # SIGINT: pytest's KeyboardInterrupt
            return
        if previous == signal.SIG_IGN:
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def in_pytest(frame: FrameType | None) -> bool:
    """Whether ``frame`` (where a signal found the main thread) runs pytest's or pluggy's
    own code, or the standard library on their behalf, rather than a test's or this
    plugin's."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] in ("_pytest", "pluggy"):
            return True
        filename = frame.f_code.co_filename
        if not filename.startswith(_STDLIB) or "-packages" in filename:
            return False
        frame = frame.f_back
    return False
