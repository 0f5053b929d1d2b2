"""The Batch API machinery of one invocation, without pytest: split, submit, resume, wait,
collect.

Two callers drive it: the plugin's ``--batch-api`` stage (``batch.py``: rounds of plans,
the terminal, ``pytest.exit``) and a client on its own (``batch_client.py``:
``LLMClient.batch_generate(..., use_batch_api=True)`` in a script). Both need the same
guarantees (one job unless the API's limits split it, the job ids saved before the first
poll, a rerun that resumes polling instead of paying again), so both go through
:meth:`BatchRunner.fetch`; what differs (where notes and the progress line go, how a
detach or a timeout ends the process) is handed in.

What a runner needs of its run is :class:`BatchContext`: the plugin passes its
``RunState``, a standalone client a small dataclass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from .batch_api import BatchApi
from .batch_collect import (
    Collected,
    JobLines,
    Verdict,
    line_verdict,
    read_errors,
    read_output,
    settle_unseen,
)
from .batch_ledger import JobLedger, model_of, record_errors
from .batch_rounds import FetchLog
from .batch_wait import JobWaiter
from .errors import LLMCallError
from .response import Answer
from .store import PlannedRequest

if TYPE_CHECKING:
    import openai

    from .config import LLMConfig
    from .store import ResponseStore

#: API limits per input file (shared/reference/openai-api.md, Batch API)
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024


class BatchContext(Protocol):
    """What a :class:`BatchRunner` needs of the run it works for (``RunState`` is one)."""

    @property
    def llm_config(self) -> LLMConfig: ...

    @property
    def run_token(self) -> str:
        """Failures recorded in the store carry it."""
        ...

    @property
    def fresh_since(self) -> float | None:
        """Not None: a stored answer is replaced by the Batch API's (``--llm-fresh``)."""
        ...

    def add_batch_cost(self, request: Mapping[str, Any], answer: Mapping[str, Any]) -> None:
        """A Batch API answer arrived (the cost cap counts it, at half price)."""
        ...


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
    """Submits, tracks, resumes and collects the jobs of one invocation (every round).

    ``progress_factory(total)`` makes the progress line of one wait (see
    ``batch_wait.BatchProgress``); ``note(line)`` writes one line of news.
    """

    def __init__(
        self,
        state: BatchContext,
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

    # -- one round
    def fetch(self, planned: Sequence[PlannedRequest], is_answered: Callable[[str], bool]) -> int:
        """Resume the saved jobs, submit what is neither answered nor in an open job,
        wait, collect, and resubmit what the API asks to (expired lines, 5xx/429 lines,
        token-limit splits, the requests of jobs the API lost).

        Returns the number of responses stored. Raises ``batch_wait.BatchWaitError`` on
        a detach or a timeout (the jobs stay saved) and :class:`LLMCallError` when a Batch
        API call fails for good or a line is refused for a reason every request shares.
        """
        resumed = [i for i in self.resume() if i not in self.log.submitted]
        if resumed:
            self.note(f"llmbench batch: resuming job(s) {', '.join(resumed)}")
        in_flight = self.pending_keys()
        todo = [p for p in planned if p.key not in in_flight and not is_answered(p.key)]
        queue = self.chunks(todo)
        stored = 0
        while queue or self.open_jobs():
            now, queue = self.take(queue)
            if now:
                ids = self.submit(now)
                count = sum(len(c) for c in now)
                self.note(f"llmbench batch: submitted {count} request(s) as {', '.join(ids)}")
            for b in self.wait_all(detach=self.settings.detach):
                got = self.collect(b)
                stored += got.stored
                queue += self.chunks(got.resubmit)
                self.note(got.line)
            lost = [p for p in self.take_requeue() if not is_answered(p.key)]
            queue += self.chunks(lost)
        return stored

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


__all__ = [
    "MAX_BYTES",
    "MAX_REQUESTS",
    "BatchContext",
    "BatchRunner",
    "Limits",
    "TokenLimits",
    "input_line",
    "split_requests",
]
