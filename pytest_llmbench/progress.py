"""A live progress line for long network phases, written through pytest's terminal writer,
and what such a phase adds up to (:class:`PrefetchStats`), for the controller to print."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest


class LiveLine:
    """The one writer of a long phase's progress (the prefetch's, the Batch API's): on a
    terminal one line rewritten in place, at most 4 times a second; otherwise a line every
    ``every`` seconds, or at once when ``force``d, so CI logs stay short."""

    def __init__(self, config: pytest.Config | None, every: float = 5.0) -> None:
        # no config: a silent line (the tests' own progress has the terminal)
        self._tr: pytest.TerminalReporter | None = (
            None if config is None else config.pluginmanager.get_plugin("terminalreporter")
        )
        self._tty = bool(self._tr is not None and self._tr.isatty())
        self._every = 0.25 if self._tty else every
        self._shown_at = float("-inf")
        self._text = ""

    def show(self, text: str, force: bool = False) -> None:
        if self._tr is None or text == self._text:
            return
        now = time.perf_counter()
        if not force and now - self._shown_at < self._every:
            return
        self._shown_at, self._text = now, text
        if self._tty:
            self._tr.rewrite(text, erase=True)
        else:
            self._tr.write_line(text)

    def finish(self, text: str | None = None) -> None:
        """The last state (if any), and the line ended on a terminal."""
        if self._tr is None:
            return
        if self._tty:
            if text is not None:
                self._tr.rewrite(text, erase=True)
            self._tr.write_line("")
        elif text is not None:
            self._tr.write_line(text)


def note(config: pytest.Config, line: str, **markup: bool) -> None:
    """One line of a stage's news (a job submitted, planning failed) in the terminal."""
    tr: pytest.TerminalReporter | None = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line, **markup)


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
        live: bool = True,
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
        self._out = LiveLine(config if live else None, every)

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

    def _maybe_show(self) -> None:
        self._out.show(self.line())

    def finish(self) -> None:
        self._out.finish(self.line())


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
    concurrency: int = 0  # the requests in flight it settled on
    concurrency_adaptive: bool = True
    concurrency_max: int = 0  # --llm-concurrency

    @classmethod
    def of(
        cls,
        progress: Progress,
        plan_lead_s: float,
        plan_s: float,
        wall: float,
        concurrency: tuple[int, bool, int] = (0, True, 0),
    ) -> PrefetchStats:
        """``concurrency``: the limit settled on, whether it adapted, and its maximum."""
        done, failed, limited = progress.done, progress.failed, progress.rate_limited
        planned = progress.total
        return cls(
            planned, done, failed, limited, progress.retries, plan_lead_s, plan_s, wall,
            *concurrency,
        )  # fmt: skip

    def concurrency_text(self) -> str:
        """``settled at 2 in flight (adaptive, at most --llm-concurrency 64)``, or ``64 in
        flight (--llm-concurrency-fixed)``."""
        if not self.concurrency_adaptive:
            return f"{self.concurrency} in flight (--llm-concurrency-fixed)"
        return (
            f"settled at {self.concurrency} in flight (adaptive, at most --llm-concurrency "
            f"{self.concurrency_max})"
        )
