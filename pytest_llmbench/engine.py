"""Plan -> fetch -> replay: how a run reaches the account's rate limit.

pytest runs one test at a time per process, so ``-n 8`` alone keeps at most 8 requests in
flight. Instead, before any worker starts, the controlling process:

1. **plans**: runs the same pytest invocation in a subprocess with
   ``PYTEST_LLMBENCH_PHASE=plan`` (``plan.py``), which records each request that is not
   stored yet.
2. **fetches** every planned request concurrently, paced by the shared budget, saving each
   answer the moment it arrives (live), or through the Batch API (``batch.py``).
3. lets the real session **replay**: the tests find their answers stored. Calls the plan
   could not know (a second call that depends on the first answer) run live, through the
   same budget.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .cassettes import case_scope, fetch_cassette
from .errors import LLMCallError
from .plan import (
    PLAN_OK,
    PlannedRequest,
    SpoolReader,
    plan_command,
    plan_failed,
    run_plan,
    runs_tests,
)
from .progress import PrefetchStats, Progress
from .store import Failure

if TYPE_CHECKING:
    from .batch import BatchStats
    from .client import Answer
    from .runtime import RunState


def prefetch_enabled(config: pytest.Config, state: RunState) -> bool:
    """Whether the controller plans and fetches before the tests run."""
    if state.options.no_prefetch and not state.llm_config.batch.enabled:
        return False
    if state.record_mode == "none":
        return False  # every answer is in a cassette: each test replays its own at once
    return runs_tests(config)


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


def maybe_prefetch(
    config: pytest.Config,
    state: RunState,
    nodeids: list[str] | None,
    on_batch: Callable[[BatchStats], None],
) -> PrefetchStats | None:
    """Plan and fetch before the session runs (controller only); what the real-time
    prefetch did, or None (nothing to fetch, or the Batch API: its statistics go to
    ``on_batch``, also when the stage ends the session early)."""
    if not prefetch_enabled(config, state):
        return None
    # Batch mode always plans the whole selection: a case with some answers may still
    # have a dependent call to ask, or one in a job still open from an interrupted run;
    # skipping it would send that call live, at full price, or pay for it twice.
    only = None if state.llm_config.batch.enabled else unanswered(state, nodeids)
    if only is not None and not only:
        return None  # every selected case has its answers stored: a pure replay
    workdir = Path(tempfile.mkdtemp(prefix="llmbench-plan-"))
    try:
        if state.llm_config.batch.enabled:
            from .batch import run_rounds

            run_rounds(config, state, workdir, on_batch)
            return None
        if state.record_mode is not None:
            # cassettes load the planned cases' files up front: plan first, then fetch
            planned, plan_s = run_plan(config, state, workdir, only)
            if not planned:
                return None
            state.check_credentials()
            return fetch_live(config, state, planned, plan_s)
        return stream_prefetch(config, state, workdir, only)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fetch_live(
    config: pytest.Config, state: RunState, planned: list[PlannedRequest], plan_s: float
) -> PrefetchStats:
    """Send every planned request concurrently within the budget; store each answer."""
    todo = [p for p in planned if not state.is_answered(p.key)]
    progress = Progress(config, "llmbench prefetch", total=len(todo), rpm=state.llm_config.rpm)
    started = time.perf_counter()
    asyncio.run(_fetch_all(state, todo, progress))
    progress.finish()
    progress.total = len(planned)
    return PrefetchStats.of(progress, round(plan_s, 3), plan_s, time.perf_counter() - started)


class _Fetcher:
    """What the fetch stage does with each planned request's outcome: save the answer the
    moment it arrives, remember a refusal no retry can mend, move the progress line."""

    def __init__(self, state: RunState, progress: Progress) -> None:
        self.state = state
        self.progress = progress

    def answered(self, req: PlannedRequest, answer: Answer) -> None:
        self.state.store.save(
            req, answer, source="prefetch", replace=self.state.fresh_since is not None
        )
        usage = answer.body.get("usage") or {}
        tokens = int(usage.get("total_tokens") or 0)
        self.progress.advance(answer.attempts - 1, answer.rate_limited, tokens)

    def failed(self, req: PlannedRequest, exc: LLMCallError) -> None:
        """A request that no retry can mend (400, 401, 403, 404, 422, quota) fails its
        case in the run without being sent again; a retryable one is tried live."""
        if not exc.retryable:
            run = self.state.run_token
            failure = Failure(str(exc), "prefetch", run, exc.attempts, exc.rate_limited)
            self.state.store.record_failures({req.key: failure})
        self.progress.fail(exc)

    async def fetch(
        self, requests: Iterable[PlannedRequest] | AsyncIterable[PlannedRequest]
    ) -> None:
        # with cassettes each request is filed under its case's cassette
        await self.state.client.arun(
            requests, _body, self.answered, self.failed, scope=lambda r: case_scope(r.nodeid)
        )


def _body(req: PlannedRequest) -> dict[str, Any]:
    return req.body


async def _fetch_all(state: RunState, todo: list[PlannedRequest], progress: Progress) -> None:
    # with cassettes: one in-memory cassette of all planned cases, saved split per case
    with fetch_cassette(state, [r.nodeid for r in todo]):
        await _Fetcher(state, progress).fetch(todo)


def stream_prefetch(
    config: pytest.Config, state: RunState, workdir: Path, only: Iterable[str] | None
) -> PrefetchStats | None:
    """Plan and fetch at once: requests are sent while the plan subprocess still finds
    more, so planning costs little more than the subprocess's start-up."""
    progress = Progress(config, "llmbench prefetch", total=0, rpm=state.llm_config.rpm)
    progress.open_ended = True
    started = time.perf_counter()
    stream = _PlanStream(config, state, workdir, only, progress)
    asyncio.run(stream.run())
    if stream.status not in PLAN_OK:
        plan_failed(config, state, stream.log, stream.status)
    if not progress.total:
        return None
    progress.finish()
    wall = time.perf_counter() - started
    return PrefetchStats.of(progress, stream.plan_lead_s, stream.plan_s, wall)


class _PlanStream:
    """The plan subprocess, and the requests it finds as an async iterable: the spool is
    read every 50 ms while the subprocess runs (a real wait on it, woken to read)."""

    def __init__(
        self,
        config: pytest.Config,
        state: RunState,
        workdir: Path,
        only: Iterable[str] | None,
        progress: Progress,
    ) -> None:
        self.config, self.state, self.progress = config, state, progress
        self.cmd, self.env, spool, self.log = plan_command(config, state, workdir, only)
        self.reader = SpoolReader(spool)
        self.started = time.perf_counter()
        self.plan_s = 0.0
        self.plan_lead_s = 0.0
        self.status = 0

    async def run(self) -> None:
        with self.log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *self.cmd,
                cwd=self.config.invocation_params.dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                await _Fetcher(self.state, self.progress).fetch(self.requests(proc))
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        self.status = int(proc.returncode or 0)

    async def requests(self, proc: asyncio.subprocess.Process) -> AsyncIterator[PlannedRequest]:
        exited = False
        while not exited:
            try:
                await asyncio.wait_for(proc.wait(), timeout=0.05)
                exited = True
            except asyncio.TimeoutError:
                pass
            for req in self.reader.read_new():
                if self.state.is_answered(req.key):
                    continue
                if not self.progress.total:
                    self.state.check_credentials()
                    self.plan_lead_s = round(time.perf_counter() - self.started, 3)
                self.progress.total += 1
                yield req
        self.plan_s = time.perf_counter() - self.started
        self.progress.open_ended = False
