"""The Batch API fetcher: the run's planned requests as few jobs as the API allows, resumable,
at half price.

A batch run is a state machine that may span several pytest invocations: plan, upload,
create, wait (for hours, or not at all with ``--llm-batch-detach``), collect, resubmit
what the API asks to, and plan again for calls that depend on the first answers. Every
step that could be lost to a crash is saved first, so the next identical invocation
resumes where this one stopped and never submits the same request twice. Results are
joined on ``custom_id``, which *is* the store key (sha256 of node id, ordinal, endpoint,
body), so the order of output lines does not matter.

The parts, each in its own module so it can be read (and tested) alone:

- ``batch_ledger``: the job records saved in the store, and failures (:class:`JobLedger`);
- ``batch_api``: the Batch API calls with their retry policy (:class:`BatchApi`);
- ``batch_wait``: polling until jobs are final, the progress line, detach and timeout;
- ``batch_collect``: settling each request of a finished job, and the per-line retry
  verdict (:func:`~pytest_llmbench.batch_collect.line_verdict`);
- ``batch_rounds``: the rounds of dependent calls (:class:`Rounds`) and the stage's
  statistics (:class:`BatchStats`, the report's ``run.batch``).

This module ties them together: :class:`BatchRunner` submits and collects the jobs of
one invocation, :func:`fetch_batch` runs one round, :func:`run_rounds` the whole stage,
and :func:`summary_lines` writes the summary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .batch_api import BatchApi, NoBatchApi
from .batch_collect import (
    Collected,
    JobLines,
    Verdict,
    line_verdict,
    read_errors,
    read_output,
    settle_unseen,
)
from .batch_ledger import (
    JOBS_STATE,
    REQUESTS_PREFIX,
    JobLedger,
    clear_errors,
    model_of,
    record_errors,
)
from .batch_rounds import BatchCost, BatchStats, FetchLog, Rounds
from .batch_wait import TERMINAL, BatchProgress, JobWaiter
from .errors import FATAL_EXIT_STATUS, LLMCallError
from .plan import run_plan
from .progress import note
from .response import Answer
from .runtime import stop_message
from .store import PlannedRequest

if TYPE_CHECKING:
    import openai

    from .pricing import PriceTable
    from .results import CaseResult
    from .runtime import RunState
    from .store import ResponseStore

#: API limits per input file (shared/reference/openai-api.md, Batch API)
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024


@dataclass
class Limits:
    max_requests: int = MAX_REQUESTS
    max_bytes: int = MAX_BYTES


def input_line(req: PlannedRequest) -> str:
    return json.dumps(
        {"custom_id": req.key, "method": "POST", "url": req.endpoint, "body": req.body},
        sort_keys=True,
        separators=(",", ":"),
    )


def split_requests(
    requests: Sequence[PlannedRequest], limits: Limits
) -> list[list[PlannedRequest]]:
    """Group by (endpoint, model), then chunk so each file fits the API's limits."""
    groups: dict[tuple[str, str], list[PlannedRequest]] = {}
    for r in requests:
        groups.setdefault((r.endpoint, model_of(r)), []).append(r)
    chunks: list[list[PlannedRequest]] = []
    for group in groups.values():
        current: list[PlannedRequest] = []
        size = 0
        for r in group:
            n = len(input_line(r).encode()) + 1
            if current and (len(current) >= limits.max_requests or size + n > limits.max_bytes):
                chunks.append(current)
                current, size = [], 0
            current.append(r)
            size += n
        if current:
            chunks.append(current)
    return chunks


class TokenLimits:
    """Models that hit ``token_limit_exceeded``: their jobs run one at a time, each half
    the size of the one that failed, until one fits."""

    def __init__(self) -> None:
        self.sequential: set[str] = set()
        self.caps: dict[str, int] = {}  # model -> requests per job

    def cap(self, model: str, limit: int) -> int:
        return min(limit, self.caps.get(model, MAX_REQUESTS))

    def halve(self, model: str, size: int) -> bool:
        """A job of ``size`` requests of ``model`` hit the limit; False when it was
        already a single request run alone (it can never fit)."""
        alone = model in self.sequential and size <= 1
        self.sequential.add(model)
        self.caps[model] = max(1, size // 2)
        return not alone

    def take(
        self, queue: list[list[PlannedRequest]], busy: set[str]
    ) -> tuple[list[list[PlannedRequest]], list[list[PlannedRequest]]]:
        """The chunks to submit now, and the rest: one job at a time for a limited model
        (``busy``: the models of the jobs still open)."""
        now: list[list[PlannedRequest]] = []
        later: list[list[PlannedRequest]] = []
        busy = set(busy)
        for chunk in queue:
            model = model_of(chunk[0])
            if model in self.sequential and model in busy:
                later.append(chunk)
            else:
                now.append(chunk)
                if model in self.sequential:
                    busy.add(model)
        return now, later


class BatchRunner:
    """Submits, tracks, resumes and collects the jobs of one invocation (every round)."""

    def __init__(
        self,
        state: RunState,
        client: openai.OpenAI,
        store: ResponseStore,
        progress_factory: Callable[[int], Any],
        limits: Limits | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.state = state
        self.settings = state.llm_config.batch
        self.store = store
        self.limits = limits or Limits()
        self.note = note or (lambda line: None)
        self.api = BatchApi(client, state.llm_config.model)
        self.ledger = JobLedger(store)
        self.log = FetchLog()
        self.waiter = JobWaiter(
            self.api,
            self.ledger,
            self.settings,
            progress_factory,
            self.note,
            self.log,
            state.llm_config.base_url,
        )
        self.token_limits = TokenLimits()
        self.attempts: dict[str, int] = {}  # key -> lines run, across the invocation's jobs

    # -- resuming
    def resume(self) -> list[str]:
        """Settle interrupted submissions; returns the ids of the jobs still open."""
        ids = self.ledger.resume(self.api.find_created)
        log = self.log
        log.resumed += [i for i in ids if i not in log.resumed and i not in log.submitted]
        return ids

    def pending_keys(self) -> set[str]:
        return self.ledger.pending_keys()

    def open_jobs(self) -> list[dict[str, Any]]:
        return self.ledger.open_jobs()

    # -- submit
    def chunks(self, requests: Sequence[PlannedRequest]) -> list[list[PlannedRequest]]:
        out: list[list[PlannedRequest]] = []
        by_model: dict[str, list[PlannedRequest]] = {}
        for r in requests:
            by_model.setdefault(model_of(r), []).append(r)
        for model, group in by_model.items():
            cap = self.token_limits.cap(model, self.limits.max_requests)
            out += split_requests(group, Limits(cap, self.limits.max_bytes))
        return out

    def take(
        self, queue: list[list[PlannedRequest]]
    ) -> tuple[list[list[PlannedRequest]], list[list[PlannedRequest]]]:
        """The chunks to submit now, and the rest: one at a time for token-limited models."""
        return self.token_limits.take(queue, {j["model"] for j in self.open_jobs()})

    def submit(self, chunks: Sequence[Sequence[PlannedRequest]]) -> list[str]:
        return [self._submit_one(chunk) for chunk in chunks]

    def _submit_one(self, chunk: Sequence[PlannedRequest]) -> str:
        data = ("\n".join(input_line(r) for r in chunk) + "\n").encode()
        file_id = self.api.upload(data)
        # saved before the batch exists: a crash between upload and create is found again
        self.ledger.uploaded(file_id, chunk, self.state.llm_config.base_url)
        window = self.settings.completion_window
        batch = self.api.create(file_id, chunk[0].endpoint, window, len(chunk))
        # saved before the first poll: a crash from here on resumes this job
        self.ledger.update(file_id, batch_id=batch.id, status=batch.status)
        self.log.submitted.append(batch.id)
        return str(batch.id)

    # -- wait and collect
    def wait_all(self, *, detach: bool = False) -> list[Any]:
        """Poll every open job until all are terminal; returns the final batch objects."""
        return self.waiter.wait_all(detach=detach)

    def take_requeue(self) -> list[PlannedRequest]:
        """The requests of jobs the API turned out not to know, to submit again."""
        lost, self.waiter.requeue = self.waiter.requeue, []
        return lost

    def collect(self, batch: Any) -> Collected:
        """Store a finished job's results; say what needs another job."""
        job = self.ledger.job_of(batch.id)
        lines = JobLines(self.ledger.requests_of(job), self._verdict)
        if batch.output_file_id:
            text = self.api.text(batch.output_file_id)
            read_output(lines, text, partial(self._store, lines, batch.id))
        if batch.error_file_id:
            read_errors(lines, self.api.text(batch.error_file_id))
        settle_unseen(lines, batch, partial(self.token_limits.halve, job["model"]))
        record_errors(self.store, lines.errors, self.state.run_token)
        self.log.failed |= set(lines.errors)
        self.log.failed -= set(lines.retry)
        if lines.problem:
            self.log.problems.append(lines.problem)
        self.ledger.update(job["input_file_id"], collected=True, status=batch.status)
        if lines.fatal is not None:
            # what the job answered is stored; nothing more is sent (run_rounds exits)
            raise LLMCallError(lines.fatal, fatal=True)
        return lines.collected(batch.id, batch.status, live=self.settings.fallback == "live")

    def _verdict(self, key: str, response: Any, error: Any) -> Verdict:
        attempts = self.attempts[key] = self.attempts.get(key, 0) + 1
        return line_verdict(
            response,
            error,
            attempts,
            max_attempts=self.settings.max_attempts,
            live=self.settings.fallback == "live",
        )

    def _store(self, lines: JobLines, batch_id: str, key: str, response: dict[str, Any]) -> None:
        nodeid, ordinal, endpoint, body = lines.requests[key]
        request = PlannedRequest(key, nodeid, ordinal, endpoint, body)
        headers = {"x-request-id": str(response.get("request_id", ""))}
        answer = Answer(response["body"], headers, latency=0.0, attempts=1)
        replace = self.state.fresh_since is not None
        self.store.save(request, answer, source="batch", replace=replace, batch_id=batch_id)
        self.state.add_batch_cost(body, answer.body)  # --llm-max-cost counts it (half price)


def make_runner(config: pytest.Config, state: RunState) -> BatchRunner:
    # input files reach 200 MB: uploads and downloads get more time than a chat call
    client = state.client.openai_client()
    client = client.with_options(timeout=max(state.llm_config.timeout, 600.0))
    return BatchRunner(
        state,
        client,
        state.store,
        lambda total: BatchProgress(config, total),
        limits=_limits(state),
        note=lambda line: note(config, line),
    )


def fetch_batch(
    config: pytest.Config,
    state: RunState,
    planned: Sequence[PlannedRequest],
    runner: BatchRunner | None = None,
) -> int:
    """One round: submit what is neither stored nor in an open job, wait, collect, and
    resubmit what the API asks to (expired lines, 5xx/429 lines, token-limit splits).

    Returns the number of responses stored.
    """
    runner = runner or make_runner(config, state)
    resumed = [i for i in runner.resume() if i not in runner.log.submitted]
    if resumed:
        note(config, f"llmbench batch: resuming job(s) {', '.join(resumed)}")
    in_flight = runner.pending_keys()
    todo = [p for p in planned if p.key not in in_flight and not state.is_answered(p.key)]
    queue = runner.chunks(todo)
    stored = 0
    while queue or runner.open_jobs():
        now, queue = runner.take(queue)
        if now:
            ids = runner.submit(now)
            count = sum(len(c) for c in now)
            note(config, f"llmbench batch: submitted {count} request(s) as {', '.join(ids)}")
        for b in runner.wait_all(detach=state.llm_config.batch.detach):
            got = runner.collect(b)
            stored += got.stored
            queue += runner.chunks(got.resubmit)
            note(config, got.line)
        lost = [p for p in runner.take_requeue() if not state.is_answered(p.key)]
        queue += runner.chunks(lost)
    return stored


def run_rounds(
    config: pytest.Config,
    state: RunState,
    workdir: Path,
    publish: Callable[[BatchStats], None],
) -> BatchStats:
    """Plan, batch, and plan again with the first answers until nothing new is asked.

    Each round is one plan subprocess and (when it found unanswered requests) one fetch
    through the Batch API; a test with a call that depends on an earlier answer needs one
    round per level, at most ``--llm-batch-max-rounds``. Requests still unanswered then,
    and requests whose body changed between rounds (a prompt that is not reproducible),
    fail with that reason instead of being sent again and again. The statistics go to
    ``publish`` (the controller) however the stage ends (a timeout or detach exits pytest).
    """
    # failures of earlier invocations are asked again, as a live run would
    clear_errors(state.store)
    stage = _BatchStage(config, state, workdir)
    stats: BatchStats | None = None
    try:
        stage.run()
        stats = stage.settle()
    except NoBatchApi as exc:  # the server has none: one line, no "fix it and rerun"
        pytest.exit(f"llmbench: {exc}", FATAL_EXIT_STATUS)
    except LLMCallError as exc:
        if exc.fatal:  # a wrong key, no quota...: every other call would fail the same way
            pytest.exit(stop_message(f"the Batch API refused the run: {exc}"), FATAL_EXIT_STATUS)
        pytest.exit(f"llmbench: a Batch API call failed: {exc}", returncode=1)
    finally:
        if stats is None:  # stopped early: what is known so far
            stats = BatchStats.of(stage.rounds, stage.log)
        publish(stats)
    return stats


class _BatchStage:
    """One invocation's rounds, and the runner made at the first round that sends anything
    (making it needs credentials, which a pure replay does not)."""

    def __init__(self, config: pytest.Config, state: RunState, workdir: Path) -> None:
        self.config = config
        self.state = state
        self.workdir = workdir
        self.rounds = Rounds(state.llm_config.batch.max_rounds)
        self.runner: BatchRunner | None = None

    @property
    def log(self) -> FetchLog:
        return self.runner.log if self.runner is not None else FetchLog()

    def run(self) -> None:
        config, state, rounds = self.config, self.state, self.rounds
        while True:
            planned, plan_s = run_plan(config, state, self.workdir, rounds.only)
            fresh = rounds.plan(planned, plan_s, state.is_answered)
            if not fresh or rounds.exhausted(fresh):
                return
            state.check_credentials()
            if self.runner is None:
                self.runner = make_runner(config, state)
            rounds.start(fresh)
            fetch_batch(config, state, fresh, self.runner)

    def settle(self) -> BatchStats:
        """The statistics of a stage that ran to its end; its unsent requests fail."""
        record_errors(self.state.store, self.rounds.errors, self.state.run_token)
        live = self.state.llm_config.batch.fallback == "live"
        log = self.log
        return BatchStats.of(self.rounds, log).settle(self.rounds, log, live)


def _limits(state: RunState) -> Limits:
    # lowered limits are a test-only knob (see tests/test_batch.py)
    raw = state.options.batch_max_requests
    return Limits(max_requests=raw) if raw else Limits()


def summary_lines(stats: BatchStats, cases: Sequence[CaseResult], prices: PriceTable) -> list[str]:
    """The batch lines of the summary (jobs, waiting, rounds, saving, problems); also
    adds the cost figures to ``stats`` (the report's ``run.batch``)."""
    stats.cost = BatchCost.of(cases, prices)
    return stats.summary_lines(any(c.batch for c in cases))


__all__ = [
    "JOBS_STATE",
    "REQUESTS_PREFIX",
    "TERMINAL",
    "BatchRunner",
    "BatchStats",
    "Collected",
    "JobLedger",
    "LLMCallError",
    "Limits",
    "Rounds",
    "TokenLimits",
    "clear_errors",
    "fetch_batch",
    "make_runner",
    "record_errors",
    "run_rounds",
    "split_requests",
    "summary_lines",
]
