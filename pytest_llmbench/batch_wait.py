"""Waiting for Batch API jobs: poll at the configured pace, show progress, stop on time.

Waiting is the one long step of a batch run, and the step a user cuts short. Every way
out of it leaves the jobs saved in the ledger and says how to resume:
``--llm-batch-detach`` (exit 0 after one look), ``--llm-batch-timeout`` (exit 1; one clock
from the first wait of the invocation across every later one) and Ctrl-C. A saved job the
API does not know (another account, a simulator that has stopped) is dropped from the
ledger and its requests are queued again, rather than waited for forever.

Nothing here needs pytest: a detach or a timeout raises :class:`BatchWaitError` (the
plugin turns it into ``pytest.exit``, a standalone client lets it propagate), and the
progress line is written through whatever :class:`LineWriter` the caller hands in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .errors import LLMBenchError

if TYPE_CHECKING:
    from .batch_api import BatchApi
    from .batch_ledger import Job, JobLedger
    from .batch_rounds import FetchLog
    from .config import BatchSettings
    from .plan import PlannedRequest

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: the longest pause between two polls, whatever --llm-batch-poll says
MAX_PAUSE = 60.0


class BatchWaitError(LLMBenchError):
    """The wait ended before every job was final: ``detach`` (after one look) or
    ``timeout``; the jobs keep running at the API and stay saved, so the next identical
    invocation resumes them. ``pending`` holds their ids; ``returncode`` is the exit status
    the plugin ends pytest with (0 for a detach)."""

    def __init__(
        self, kind: Literal["detach", "timeout"], pending: str, timeout: float | None
    ) -> None:
        self.kind = kind
        self.pending = pending
        self.timeout = timeout
        self.returncode = 0 if kind == "detach" else 1
        if kind == "detach":
            text = f"batch job(s) {pending} submitted and running (batch.detach)"
        else:
            text = f"batch job(s) {pending} not finished after the batch timeout of {timeout:g}s"
        super().__init__(
            f"{text}; they are saved in the run directory: the same call again waits for "
            "them and collects the results (nothing is submitted twice)"
        )


class LineWriter(Protocol):
    """Where a progress line goes: ``progress.LiveLine`` (pytest's terminal), or a
    standalone client's stderr line."""

    def show(self, text: str, force: bool = False) -> None: ...

    def finish(self, text: str | None = None) -> None: ...


@dataclass
class _Watch:
    """One wait: the jobs waited for, their final objects so far, the progress line."""

    jobs: list[Job]
    progress: Any
    started: float
    finals: dict[str, Any] = field(default_factory=dict)  # batch id -> object; None: lost

    def done(self) -> bool:
        return len(self.finals) == len(self.jobs)

    def pending(self) -> str:
        return ", ".join(j["batch_id"] for j in self.jobs if j["batch_id"] not in self.finals)

    def results(self) -> list[Any]:
        return [b for b in (self.finals[j["batch_id"]] for j in self.jobs) if b is not None]


class JobWaiter:
    """Polls the open jobs of the ledger until each is final (or lost)."""

    def __init__(
        self,
        api: BatchApi,
        ledger: JobLedger,
        settings: BatchSettings,
        progress_factory: Callable[[int], Any],
        note: Callable[[str], None],
        log: FetchLog,
        base_url: str | None,
    ) -> None:
        self.api = api
        self.ledger = ledger
        self.settings = settings
        self.progress_factory = progress_factory
        self.note = note
        self.log = log  # waited seconds and lost jobs go here
        self.base_url = base_url
        self.deadline: float | None = None  # --llm-batch-timeout, from the first wait
        self.requeue: list[PlannedRequest] = []  # the requests of lost jobs

    def wait_all(self, *, detach: bool = False) -> list[Any]:
        """Poll every open job until all are terminal; returns the final batch objects.

        With ``detach``, look once and exit unless every job is finished already.
        """
        open_jobs = self.ledger.open_jobs()
        if not open_jobs:
            return []
        if self.deadline is None and self.settings.timeout is not None:
            self.deadline = time.monotonic() + self.settings.timeout
        total = sum(int(j.get("count", 0)) for j in open_jobs)
        watch = _Watch(open_jobs, self.progress_factory(total), time.monotonic())
        try:
            return self._wait(watch, detach)
        except KeyboardInterrupt:
            watch.progress.finish()
            self.note(
                f"llmbench batch: interrupted; job(s) {watch.pending()} keep running at the API "
                "and are saved: run the same command again to resume (nothing is submitted "
                "twice)"
            )
            raise

    def _wait(self, watch: _Watch, detach: bool) -> list[Any]:
        while True:
            self._show(watch, self._poll(watch))
            if watch.done():
                break
            now = time.monotonic()
            if detach:
                self._detach(watch)
            if self.deadline is not None and now >= self.deadline:
                self._time_out(watch, now)
            # waiting for a remote job is the real wait here: poll at the configured pace
            time.sleep(self._pause(now))
        self.log.waited_s += time.monotonic() - watch.started
        watch.progress.finish()
        return watch.results()

    def _pause(self, now: float) -> float:
        pause = min(self.settings.poll_interval, MAX_PAUSE)
        if self.deadline is not None:
            pause = max(0.0, min(pause, self.deadline - now))
        return pause

    def _poll(self, watch: _Watch) -> list[Any]:
        """Retrieve every job not final yet; returns the current objects (None = lost)."""
        current: list[Any] = []
        for job in watch.jobs:
            bid = job["batch_id"]
            current.append(watch.finals[bid] if bid in watch.finals else self._look(job, watch))
        return current

    def _look(self, job: Job, watch: _Watch) -> Any | None:
        b = self.api.retrieve(job["batch_id"])
        if b is None:
            self._lose(job)
            watch.finals[job["batch_id"]] = None
            return None
        if b.status != job.get("status"):
            job["status"] = b.status
            self.ledger.update(job["input_file_id"], status=b.status)
        if b.status in TERMINAL:
            watch.finals[job["batch_id"]] = b
        return b

    @staticmethod
    def _show(watch: _Watch, current: list[Any]) -> None:
        live = [b for b in current if b is not None]
        if not live:
            return
        done = sum(b.request_counts.completed for b in live if b.request_counts)
        failed = sum(b.request_counts.failed for b in live if b.request_counts)
        statuses = [b.status for b in live]
        watch.progress.update(done, failed, statuses, time.monotonic() - watch.started)

    def _lose(self, job: Job) -> None:
        bid = job["batch_id"]
        self.log.lost.append(bid)
        self.requeue += self.ledger.planned_of(job)
        self.ledger.forget(job["input_file_id"])
        self.note(
            f"llmbench batch: job {bid} is unknown to the API at "
            f"{self.base_url or 'api.openai.com'} (another account, or a "
            "simulator that has stopped); its requests are submitted again"
        )

    @staticmethod
    def _detach(watch: _Watch) -> None:
        watch.progress.finish()
        raise BatchWaitError("detach", watch.pending(), None)

    def _time_out(self, watch: _Watch, now: float) -> None:
        self.log.waited_s += now - watch.started
        watch.progress.finish()
        raise BatchWaitError("timeout", watch.pending(), self.settings.timeout)


class BatchProgress:
    """status, completed/failed/total, elapsed and an ETA, through one progress writer
    (``progress.LiveLine`` in pytest); a change of status is shown at once."""

    def __init__(self, out: LineWriter, total: int) -> None:
        self.total = total
        self._out = out
        self._status = ""
        self._first: int | None = None  # lines finished when this wait began

    def update(self, done: int, failed: int, statuses: list[str], elapsed: float) -> None:
        finished = done + failed
        if self._first is None:
            self._first = finished
        eta = "-"
        gained = finished - self._first
        if gained > 0 and finished < self.total and elapsed > 0:
            eta = f"{(self.total - finished) * elapsed / gained:.0f}s"
        status = ",".join(sorted(set(statuses))) or "-"
        line = (
            f"llmbench batch: {status} {done}/{self.total} done, {failed} failed, "
            f"{elapsed:.0f}s elapsed, ETA {eta}"
        )
        self._out.show(line, force=status != self._status)
        self._status = status

    def finish(self) -> None:
        self._out.finish()
