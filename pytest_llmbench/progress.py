"""A live progress line for long network phases, written through pytest's terminal writer,
and what such a phase adds up to (:class:`PrefetchStats`), for the controller to print."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest


class Progress:
    """done/total, requests per second (against the limit), 429s, retries and an ETA.

    On a terminal the line is rewritten in place about 4 times a second; otherwise a line
    is written every ``every`` seconds so CI logs stay short.
    """

    def __init__(
        self,
        config: pytest.Config,
        label: str,
        *,
        total: int,
        rpm: int | None = None,
        every: float = 5.0,
    ) -> None:
        self.label = label
        self.total = total
        self.rpm = rpm
        self.done = 0
        self.open_ended = False  # more work may still be planned
        self.failed = 0
        self.retries = 0
        self.rate_limited = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self._last = 0.0
        self._tr: pytest.TerminalReporter | None = config.pluginmanager.get_plugin(
            "terminalreporter"
        )
        self._tty = bool(self._tr is not None and self._tr.isatty())
        self._every = 0.25 if self._tty else every

    def advance(self, retries: int = 0, rate_limited: int = 0, tokens: int = 0) -> None:
        self.done += 1
        self.retries += retries
        self.rate_limited += rate_limited
        self.tokens += tokens
        self._maybe_show()

    def fail(self, exc: BaseException | None = None) -> None:
        self.failed += 1
        self._maybe_show()

    def line(self) -> str:
        elapsed = max(1e-9, time.perf_counter() - self.started)
        finished = self.done + self.failed
        rps = finished / elapsed
        limit = f" (limit {self.rpm / 60:.0f}/s)" if self.rpm else ""
        left = self.total - finished
        eta = f"{left / rps:.0f}s" if rps > 0 and left > 0 and not self.open_ended else "-"
        tpm = self.tokens / elapsed * 60
        return (
            f"{self.label}: {finished}/{self.total}{'+' if self.open_ended else ''}"
            f" ({self.failed} failed), {rps:.1f} req/s"
            f"{limit}, {tpm:,.0f} tok/min, 429s {self.rate_limited}, retries {self.retries},"
            f" ETA {eta}"
        )

    def _maybe_show(self, force: bool = False) -> None:
        if self._tr is None:
            return
        now = time.perf_counter()
        if not force and now - self._last < self._every:
            return
        self._last = now
        if self._tty:
            self._tr.rewrite(self.line(), erase=True)
        else:
            self._tr.write_line(self.line())

    def finish(self) -> None:
        if self._tr is None:
            return
        if self._tty:
            self._tr.rewrite(self.line(), erase=True)
            self._tr.write_line("")
        else:
            self._tr.write_line(self.line())


@dataclass(frozen=True)
class PrefetchStats:
    """What the prefetch stage did (the controller prints and reports it)."""

    planned: int
    fetched: int
    failed: int
    rate_limited: int
    retries: int
    plan_lead_s: float  # the wait before the first request could be sent
    plan_s: float  # until planning ended; with streaming it overlaps the fetch
    fetch_s: float

    @classmethod
    def of(
        cls, progress: Progress, plan_lead_s: float, plan_s: float, wall: float
    ) -> PrefetchStats:
        done, failed, limited = progress.done, progress.failed, progress.rate_limited
        planned = progress.total
        return cls(planned, done, failed, limited, progress.retries, plan_lead_s, plan_s, wall)
