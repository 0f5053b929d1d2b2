"""Plan -> fetch -> replay: how a run reaches the account's rate limit.

pytest runs one test at a time per process, so ``-n 8`` alone keeps at most 8 requests in
flight. Instead the controlling process:

1. **plans**: runs the same pytest invocation in a second process with
   ``PYTEST_LLMBENCH_PHASE=plan`` (``plan.py``), which records each request that is not
   stored yet: a fork of this process made at configure time (``plan_fork.py``), or a
   subprocess where forking is not safe;
2. **fetches** every planned request concurrently, paced by the shared budget, saving each
   answer the moment it arrives (live, :class:`Fetch`), or through the Batch API
   (``batch.py``);
3. lets the real session **replay**: the tests find their answers stored. Calls the plan
   could not know (a second call that depends on the first answer) run live, through the
   same budget.

The three overlap. Planning streams into fetching, and the fetch runs in a thread of the
controlling process while the tests run: a test whose answer has not arrived yet waits
for it (the fetch journal, ``journal.py``), and the fetch sends requests in the order
the tests will ask for them. ``--llm-no-overlap`` waits for the whole fetch first.

A fatal refusal (``LLMCallError.fatal``) stops the fetch at once: nothing new is sent,
what is in flight is stored, and the run's stop file tells every process. An interrupt
(:meth:`Fetch.stop`) does the same and then waits a bounded time for what is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .cassettes import case_scope, fetch_cassette
from .concurrency import Concurrency
from .errors import LLMCallError, StoreError
from .journal import JournalWriter, journal_path
from .plan import (
    PLAN_OK,
    PlannedRequest,
    SpoolReader,
    plan_command,
    plan_failed,
    run_plan,
    runs_tests,
)
from .plan_fork import ForkedPlan, ForkUnavailable
from .progress import PrefetchStats, Progress
from .saver import GroupSaver, Pair
from .store import GAVE_UP, Failure, ensure_run_dir

if TYPE_CHECKING:
    from .batch import BatchStats
    from .client import Answer, LLMClient
    from .plan_fork import PlanFork
    from .runtime import RunState


def prefetch_enabled(config: pytest.Config, state: RunState) -> bool:
    """Whether the controller plans and fetches before the tests run."""
    if state.options.estimate:
        return False  # --llm-estimate plans, sends nothing (estimate.py)
    if state.options.no_prefetch and not state.llm_config.batch.enabled:
        return False
    if state.record_mode == "none":
        return False  # every answer is in a cassette: each test replays its own at once
    return runs_tests(config)


def streams(config: pytest.Config, state: RunState) -> bool:
    """Whether the prefetch streams while the tests run (not the Batch API, not
    cassettes, which plan first and fetch before the tests)."""
    batch = state.llm_config.batch.enabled
    return prefetch_enabled(config, state) and not batch and state.record_mode is None


def unanswered(state: RunState, nodeids: list[str] | None) -> list[str] | None:
    """The node ids that have no stored answer at all: only those need planning.

    A case with an answer (a resumed or --lf run) replays; a call of it that is new
    anyway (an edited prompt, a dependent call) runs live through the shared budget.
    None means "plan the whole selection" (the selection is unknown).
    """
    if nodeids is None:
        return None
    answered = state.store.nodeids(since=state.fresh_since)
    return [n for n in nodeids if n not in answered]


def run_staged(
    config: pytest.Config,
    state: RunState,
    nodeids: list[str] | None,
    on_batch: Callable[[BatchStats], None],
) -> Fetch | None:
    """The stages that finish before any test runs: the Batch API (its statistics go to
    ``on_batch``), or with cassettes plan then fetch (returned, to be joined)."""
    # Batch mode always plans the whole selection: a case with some answers may still
    # have a dependent call to ask, or one in a job still open from an interrupted run;
    # skipping it would send that call live, at full price, or pay for it twice.
    batch = state.llm_config.batch.enabled
    only = None if batch else unanswered(state, nodeids)
    if only is not None and not only:
        return None  # every selected case has its answers stored: a pure replay
    workdir = Path(tempfile.mkdtemp(prefix="llmbench-plan-"))
    try:
        if batch:
            from .batch import run_rounds

            run_rounds(config, state, workdir, on_batch)
            return None
        # cassettes load the planned cases' files up front: plan first, then fetch
        planned, plan_s = run_plan(config, state, workdir, only)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    todo = [p for p in planned if not state.is_answered(p.key)]
    if not todo:
        return None
    state.check_credentials()
    fetch = Fetch(config, state, live_line=True)
    fetch.plan_s = fetch.plan_lead_s = round(plan_s, 3)
    fetch.progress.total = len(todo)
    fetch.start(lambda: fetch.fetch_planned(todo))
    return fetch


def start_stream(
    config: pytest.Config,
    state: RunState,
    only: Iterable[str] | None,
    *,
    live_line: bool,
    fork: PlanFork | None = None,
) -> Fetch:
    """Start planning and fetching in a thread; the tests may run meanwhile. The plan
    runs in ``fork`` when given (``plan_fork.py``), else in a subprocess."""
    fetch = Fetch(config, state, live_line=live_line)
    run_dir = ensure_run_dir(state.llm_config.run_dir)
    fetch.journal = JournalWriter(journal_path(run_dir, state.run_token))
    fetch.start(lambda: fetch.stream(only, fork))
    return fetch


class Fetch:
    """One prefetch, run in a thread of the controlling process with its own event loop
    and client (the budget is shared through its file or Redis as usual)."""

    def __init__(self, config: pytest.Config, state: RunState, *, live_line: bool) -> None:
        from .client import LLMClient

        self.config, self.state = config, state
        rpm = state.llm_config.rpm
        self.progress = Progress(config, "llmbench prefetch", total=0, rpm=rpm, live=live_line)
        self.client: LLMClient = LLMClient(state.llm_config)
        cap = state.cost_cap(on_stop=self.cap_reached)
        if cap is not None:  # else the transport is made at the first send, not here,
            self.client.shared.cost_cap = cap  # before the plan subprocess is started
        cfg = state.llm_config
        self.gate = Concurrency(cfg.max_concurrency, adaptive=not cfg.fixed_concurrency)
        self.stopping = threading.Event()  # no new request starts
        self.under_way = threading.Event()  # the first request is planned, or none will be
        self.journal: JournalWriter | None = None
        self.fatal: LLMCallError | None = None
        self.interrupted = False
        self.notes: list[str] = []  # lines for the main thread to print
        self.plan_lead_s = 0.0
        self.plan_s = 0.0
        self.started = time.perf_counter()
        self.wall = 0.0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- the thread
    def start(self, work: Callable[[], Any]) -> None:
        def main() -> None:
            try:
                asyncio.run(self._guarded(work))
            except BaseException as exc:
                if not self.interrupted:
                    self.notes.append(f"llmbench prefetch stopped: {type(exc).__name__}: {exc}")
            finally:
                self.under_way.set()
                self.wall = time.perf_counter() - self.started
                if self.journal is not None:
                    self.journal.end("interrupted" if self.interrupted else "done")
                self.client.close()

        self._thread = threading.Thread(target=main, name="llmbench-prefetch", daemon=True)
        self._thread.start()

    async def _guarded(self, work: Callable[[], Any]) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        await work()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the fetch to end; True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def stop(self, *, interrupted: bool = False) -> None:
        """Send nothing new; what is in flight finishes and is stored."""
        self.interrupted = self.interrupted or interrupted
        self.stopping.set()
        if interrupted and self.journal is not None:
            self.journal.end("interrupted")

    def abort(self) -> None:
        """Cancel what is still in flight (its answers are lost)."""
        self.stop(interrupted=True)
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                loop.call_soon_threadsafe(task.cancel)

    def stats(self) -> PrefetchStats | None:
        if not self.progress.total:
            return None
        gate = self.gate
        settled = (gate.settled, gate.adaptive, gate.maximum)
        return PrefetchStats.of(self.progress, self.plan_lead_s, self.plan_s, self.wall, settled)

    # ---------------------------------------------------------------- the outcomes
    @functools.cached_property
    def saver(self) -> GroupSaver:
        """The answers of one turn of the event loop, saved in one commit (saver.py)."""
        replace = self.state.fresh_since is not None
        store = self.state.store
        return GroupSaver(
            store, source="prefetch", replace=replace, saved=self.saved, unsaved=self.unsaved
        )

    def answered(self, req: PlannedRequest, answer: Answer) -> None:
        self.saver.add(req, answer)

    def saved(self, batch: list[Pair]) -> None:
        """Answers are durable: wake the tests waiting for them, count them."""
        if self.journal is not None:
            self.journal.settled_many([req.key for req, _ in batch])
        for _, answer in batch:
            usage = answer.body.get("usage") or {}
            tokens = int(usage.get("total_tokens") or 0)
            self.progress.advance(answer.attempts - 1, answer.rate_limited, tokens)

    def unsaved(self, batch: list[Pair], exc: StoreError) -> None:
        """A full disk, a read-only or broken store: every later answer would be paid
        for and lost the same way, so the run stops here (also for an empty batch: the
        answers were written, but the disk would not sync them)."""
        if not batch and self.fatal is None:
            self._stop_fatal(LLMCallError(f"cannot save answers: {exc}", status=200, fatal=True))
        for req, answer in batch:
            error = LLMCallError(f"cannot save answers: {exc}", status=200, fatal=True)
            error.attempts = answer.attempts
            self.failed(req, error)

    def failed(self, req: PlannedRequest, exc: LLMCallError) -> None:
        """A request that no retry can mend (400, 401, 403, 404, 422, quota) fails its
        case in the run without being sent again; a retryable one is tried live. A fatal
        one stops the whole run."""
        first_fatal = exc.fatal and self.fatal is None
        if first_fatal:
            self.fatal = exc
            self.stopping.set()  # nothing new is sent from now on
        if exc.attempts or not exc.retryable:
            # a refusal fails its case; a request given up on is tried live by its test,
            # whose figures then count these attempts too. Recorded before the stop is
            # announced: a test woken by the stop finds its case's failure
            source = GAVE_UP if exc.retryable else "prefetch"
            run = self.state.run_token
            failure = Failure(str(exc), source, run, exc.attempts, exc.rate_limited)
            try:
                self.state.store.record_failures({req.key: failure})
            except StoreError:
                if not exc.fatal:  # a store that cannot save answers has stopped the run
                    raise
        if first_fatal:
            self._stop_fatal(exc)
        if self.journal is not None:
            self.journal.settled(req.key)
        self.progress.fail(exc)

    def _stop_fatal(self, exc: LLMCallError) -> None:
        """Stop the run for ``exc``, an error every later request would meet too."""
        self.fatal = exc
        self.stopping.set()
        self.state.stop.trip(str(exc))
        if self.journal is not None:
            self.journal.end("fatal", str(exc))

    def cap_reached(self, reason: str) -> None:
        """``--llm-max-cost``: send nothing more; tests waiting for an answer that will
        not come are skipped, and the run exits with status 6 (the stop file)."""
        self.state.stop.trip(reason)
        self.stopping.set()
        if self.journal is not None:
            self.journal.end("stopped", reason)

    async def _send(
        self, requests: Iterable[PlannedRequest] | AsyncIterable[PlannedRequest]
    ) -> None:
        # with cassettes each request is filed under its case's cassette (and goes through
        # the SDK, whose httpx2 traffic vcrpy records); without, the scope is left out
        cassettes = self.state.record_mode is not None
        try:
            await self.client.arun(
                requests,
                _body,
                self.answered,
                self.failed,
                scope=(lambda r: case_scope(r.nodeid)) if cassettes else None,
                stop=self.stopping,
                gate=self.gate,
                prompt_tokens=_prompt_tokens,
            )
        finally:
            self.saver.flush()  # what the last turn queued

    async def fetch_planned(self, todo: list[PlannedRequest]) -> None:
        # with cassettes: one in-memory cassette of all planned cases, saved split per case
        with fetch_cassette(self.state, [r.nodeid for r in todo]):
            await self._send(todo)
        self.progress.finish()

    async def stream(self, only: Iterable[str] | None, fork: PlanFork | None = None) -> None:
        """Plan and fetch at once: requests are sent while the plan process still finds
        more, so planning costs little more than that process's start-up."""
        workdir = Path(tempfile.mkdtemp(prefix="llmbench-plan-"))
        try:
            stream = _PlanStream(self, workdir, only, fork)
            await stream.run()
            if stream.status not in PLAN_OK and not self.stopping.is_set():
                self.notes.append(plan_failed(self.state, stream.log, stream.status))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if self.progress.total:
            self.progress.finish()


def _body(req: PlannedRequest) -> dict[str, Any]:
    return req.body


def _prompt_tokens(req: PlannedRequest) -> int | None:
    return req.prompt_tokens  # counted by the plan subprocess


SPOOL_POLL_S = 0.02  # the spool is read this often while the plan subprocess runs


class _PlanStream:
    """The plan process, and the requests it finds as an async iterable: the spool is
    read every 20 ms while the process runs (a real wait on it, woken to read)."""

    def __init__(
        self, fetch: Fetch, workdir: Path, only: Iterable[str] | None, fork: PlanFork | None
    ) -> None:
        self.fetch, self.state, self.fork = fetch, fetch.state, fork
        self.args, self.env, spool, self.log = plan_command(fetch.config, self.state, workdir, only)
        self.cwd = fetch.config.invocation_params.dir
        self.reader = SpoolReader(spool)
        self.started = time.perf_counter()
        self.status = 0

    async def run(self) -> None:
        proc = await self.start()
        try:
            await self.fetch._send(self.requests(proc))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        self.status = int(proc.returncode or 0)

    async def start(self) -> asyncio.subprocess.Process | ForkedPlan:
        """The plan process: the waiting fork made into it, or a subprocess."""
        if self.fork is not None:
            with contextlib.suppress(ForkUnavailable):
                return self.fork.spawn(self.args, self.env, self.cwd, self.log)
        with self.log.open("wb") as out:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pytest",
                *self.args,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is the controller's
            )

    async def requests(
        self, proc: asyncio.subprocess.Process | ForkedPlan
    ) -> AsyncIterator[PlannedRequest]:
        fetch, progress, exited = self.fetch, self.fetch.progress, False
        while not exited and not fetch.stopping.is_set():
            try:
                await asyncio.wait_for(proc.wait(), timeout=SPOOL_POLL_S)
                exited = True
            except asyncio.TimeoutError:
                pass
            new = [r for r in self.reader.read_new() if not self.state.is_answered(r.key)]
            if new and not progress.total:
                fetch.plan_lead_s = round(time.perf_counter() - self.started, 3)
                fetch.under_way.set()
            if fetch.journal is not None:
                fetch.journal.planned(r.key for r in new)
            progress.total += len(new)
            for req in new:
                yield req
        fetch.plan_s = time.perf_counter() - self.started
        fetch.under_way.set()
        progress.open_ended = False
        if fetch.journal is not None:
            fetch.journal.planning_done()
