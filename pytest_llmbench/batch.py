"""The Batch API fetcher: one job for the run's planned requests, resumable, half price.

Job records live in the response store's state table from the moment a file is uploaded,
so a crash, Ctrl-C, ``kill -9`` or ``--llm-batch-detach`` never loses a job: the next
identical invocation finds it, resumes polling and never submits the same request again.
Results are joined on ``custom_id``, which *is* the store key (sha256 of node id, ordinal,
endpoint, body), so the order of output lines does not matter.

State entries (``ResponseStore.set_state``):

``batch:jobs``
    a list of small job records (batch id, input file id, model, status, collected ...).
    A record without a batch id is an upload whose ``batches.create`` may or may not have
    happened (a crash between the two): the next run looks it up by input file id among
    the account's batches before planning anything again.
``batch:requests:<input_file_id>``
    ``{key: [nodeid, ordinal, endpoint, body]}`` of one job, written once before the job
    is created, so results can be stored with their request.
``batch:error:<key>``
    why a request failed for good in this invocation; the client raises
    :class:`LLMCallError` with it in the replay (unless ``--llm-batch-fallback live``).
    Cleared when the next invocation starts: like a live API error, a batch error is never
    an answer, and the next run asks again.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import pytest

from .errors import LLMCallError
from .retry import BackoffPolicy, describe, is_retryable

if TYPE_CHECKING:
    import openai

    from .plan import PlannedRequest
    from .pricing import PriceTable
    from .results import CaseResult
    from .runtime import RunState
    from .store import ResponseStore

JOBS_STATE = "batch:jobs"
REQUESTS_PREFIX = "batch:requests:"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: per-line error codes without an HTTP response that are worth another job
RETRY_CODES = frozenset(
    {"batch_expired", "missing_result", "server_error", "rate_limit_exceeded", "timeout"}
)
RETRY_STATUSES = frozenset({408, 409, 429})
#: API limits per input file (shared/reference/openai-api.md, Batch API)
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024
#: how many of a failed job's error lines are shown
SHOWN_ERRORS = 5
T = TypeVar("T")


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


def _model(req: PlannedRequest) -> str:
    return str(req.body.get("model"))


def split_requests(
    requests: Sequence[PlannedRequest], limits: Limits
) -> list[list[PlannedRequest]]:
    """Group by (endpoint, model), then chunk so each file fits the API's limits."""
    groups: dict[tuple[str, str], list[PlannedRequest]] = {}
    for r in requests:
        groups.setdefault((r.endpoint, _model(r)), []).append(r)
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


@dataclass
class Collected:
    """What collecting one finished job gave."""

    stored: int = 0
    resubmit: list[PlannedRequest] = field(default_factory=list)
    failed: int = 0  # requests that failed for good
    token_limit: bool = False
    line: str = ""


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
        self.client = client
        self.store = store
        self.progress_factory = progress_factory
        self.limits = limits or Limits()
        self.note = note or (lambda line: None)
        self.policy = BackoffPolicy(base=0.5, cap=10.0)
        self.waited = 0.0
        self.deadline: float | None = None  # --llm-batch-timeout, from the first wait
        self.job_ids: list[str] = []  # submitted by this invocation
        self.resumed: list[str] = []  # found open at the start of a round
        self.lost: list[str] = []  # saved jobs the API does not know (any more)
        self.requeue: list[PlannedRequest] = []  # the requests of lost jobs
        self.problems: list[str] = []  # failed / cancelled jobs, for the summary
        self.failed_keys: set[str] = set()  # requests that failed for good
        self.live_keys: set[str] = set()  # left to --llm-batch-fallback live
        self.attempts: dict[str, int] = {}
        self.sequential: set[str] = set()  # models hit by token_limit_exceeded
        self.model_limits: dict[str, int] = {}

    # -- persistence
    def jobs(self) -> list[dict[str, Any]]:
        return list(self.store.get_state(JOBS_STATE) or [])

    def _save_jobs(self, jobs: list[dict[str, Any]]) -> None:
        self.store.set_state(JOBS_STATE, jobs)

    def _update_job(self, input_file_id: str, **changes: Any) -> None:
        jobs = self.jobs()
        for job in jobs:
            if job["input_file_id"] == input_file_id:
                job.update(changes)
        self._save_jobs(jobs)

    def _forget_job(self, input_file_id: str) -> None:
        self._save_jobs([j for j in self.jobs() if j["input_file_id"] != input_file_id])
        self.store.delete_state(REQUESTS_PREFIX + input_file_id)

    def open_jobs(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs() if j.get("batch_id") and not j.get("collected")]

    def requests_of(self, job: dict[str, Any]) -> dict[str, list[Any]]:
        return dict(self.store.get_state(REQUESTS_PREFIX + job["input_file_id"]) or {})

    def pending_keys(self) -> set[str]:
        return {k for j in self.open_jobs() for k in self.requests_of(j)}

    # -- API calls, with the one retry policy (no budget: batches use their own pool)
    def _api(self, fn: Callable[[], T]) -> T:
        for attempt in range(1, 7):
            try:
                return fn()
            except Exception as exc:
                if not is_retryable(exc) or attempt == 6:
                    raise describe(
                        exc, model=self.state.llm_config.model, attempts=attempt
                    ) from None
                time.sleep(self.policy.wait(exc, attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _retrieve(self, batch_id: str) -> Any | None:
        """The batch object, or None when the API does not know the id (404)."""
        try:
            return self._api(lambda: self.client.batches.retrieve(batch_id))
        except LLMCallError as exc:
            if exc.status == 404:
                return None
            raise

    # -- resuming
    def resume(self) -> list[str]:
        """Settle interrupted submissions; returns the ids of the jobs still open."""
        for job in self.jobs():
            if job.get("batch_id") or job.get("collected"):
                continue
            found = self._find_created(job)
            if found is None:
                # the upload never became a batch: its requests are simply planned again
                self._forget_job(job["input_file_id"])
            else:
                self._update_job(job["input_file_id"], batch_id=found.id, status=found.status)
        ids = [j["batch_id"] for j in self.open_jobs()]
        self.resumed += [i for i in ids if i not in self.resumed and i not in self.job_ids]
        return ids

    def _find_created(self, job: dict[str, Any]) -> Any | None:
        """A batch created from ``job``'s input file before a crash, if any."""

        def page_after(after: str | None) -> Any:
            if after is None:
                return self.client.batches.list(limit=100)
            return self.client.batches.list(limit=100, after=after)

        after: str | None = None
        oldest = float(job.get("created_at", 0.0)) - 3600.0
        for _ in range(20):  # the newest 2,000 batches at most
            page = self._api(partial(page_after, after))
            data = list(page.data)
            for b in data:
                if b.input_file_id == job["input_file_id"]:
                    return b
            if not data or not page.has_more or data[-1].created_at < oldest:
                return None
            after = data[-1].id
        return None

    # -- submit
    def chunks(self, requests: Sequence[PlannedRequest]) -> list[list[PlannedRequest]]:
        out: list[list[PlannedRequest]] = []
        by_model: dict[str, list[PlannedRequest]] = {}
        for r in requests:
            by_model.setdefault(_model(r), []).append(r)
        for model, group in by_model.items():
            cap = min(self.limits.max_requests, self.model_limits.get(model, MAX_REQUESTS))
            out += split_requests(group, Limits(cap, self.limits.max_bytes))
        return out

    def take(
        self, queue: list[list[PlannedRequest]]
    ) -> tuple[list[list[PlannedRequest]], list[list[PlannedRequest]]]:
        """The chunks to submit now, and the rest: one at a time for token-limited models."""
        now: list[list[PlannedRequest]] = []
        later: list[list[PlannedRequest]] = []
        busy = {j["model"] for j in self.open_jobs()}
        for chunk in queue:
            model = _model(chunk[0])
            if model in self.sequential and model in busy:
                later.append(chunk)
            else:
                now.append(chunk)
                if model in self.sequential:
                    busy.add(model)
        return now, later

    def submit(self, chunks: Sequence[Sequence[PlannedRequest]]) -> list[str]:
        return [self._submit_one(chunk) for chunk in chunks]

    def _submit_one(self, chunk: Sequence[PlannedRequest]) -> str:
        data = ("\n".join(input_line(r) for r in chunk) + "\n").encode()
        upload = self._api(
            lambda: self.client.files.create(
                file=("llmbench-batch.jsonl", io.BytesIO(data)), purpose="batch"
            )
        )
        # saved before the batch exists: a crash between upload and create is found again
        self.store.set_state(
            REQUESTS_PREFIX + upload.id,
            {r.key: [r.nodeid, r.ordinal, r.endpoint, r.body] for r in chunk},
        )
        job: dict[str, Any] = {
            "batch_id": None,
            "input_file_id": upload.id,
            "model": _model(chunk[0]),
            "endpoint": chunk[0].endpoint,
            "count": len(chunk),
            "created_at": time.time(),
            "base_url": self.state.llm_config.base_url,
            "status": "uploaded",
            "collected": False,
        }
        self._save_jobs([*self.jobs(), job])
        endpoint = chunk[0].endpoint
        batch = self._api(
            lambda: self.client.batches.create(
                input_file_id=upload.id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=self.settings.completion_window,
                metadata={"created_by": "pytest-llmbench", "requests": str(len(chunk))},
            )
        )
        # saved before the first poll: a crash from here on resumes this job
        self._update_job(upload.id, batch_id=batch.id, status=batch.status)
        self.job_ids.append(batch.id)
        return str(batch.id)

    # -- wait and collect
    def poll(self, open_jobs: list[dict[str, Any]], finals: dict[str, Any]) -> list[Any]:
        """Retrieve every job not final yet; returns the current objects (None = lost)."""
        current: list[Any] = []
        for job in open_jobs:
            bid = job["batch_id"]
            if bid in finals:
                current.append(finals[bid])
                continue
            b = self._retrieve(bid)
            if b is None:
                self._lose(job)
                finals[bid] = None
            else:
                if b.status != job.get("status"):
                    job["status"] = b.status
                    self._update_job(job["input_file_id"], status=b.status)
                if b.status in TERMINAL:
                    finals[bid] = b
            current.append(b)
        return current

    def _lose(self, job: dict[str, Any]) -> None:
        bid = job["batch_id"]
        self.lost.append(bid)
        self.requeue += [_planned(k, row) for k, row in self.requests_of(job).items()]
        self._forget_job(job["input_file_id"])
        self.note(
            f"llmbench batch: job {bid} is unknown to the API at "
            f"{self.state.llm_config.base_url or 'api.openai.com'} (another account, or a "
            "simulator that has stopped); its requests are submitted again"
        )

    def wait_all(self, *, detach: bool = False) -> list[Any]:
        """Poll every open job until all are terminal; returns the final batch objects.

        With ``detach``, look once and exit unless every job is finished already. The
        ``--llm-batch-timeout`` clock starts at the first wait of the invocation and
        covers every later one (follow-up jobs, further rounds).
        """
        open_jobs = self.open_jobs()
        if not open_jobs:
            return []
        if self.deadline is None and self.settings.timeout is not None:
            self.deadline = time.monotonic() + self.settings.timeout
        deadline = self.deadline
        total = sum(int(j.get("count", 0)) for j in open_jobs)
        progress = self.progress_factory(total)
        started = time.monotonic()
        finals: dict[str, Any] = {}
        try:
            return self._wait(open_jobs, finals, progress, started, deadline, detach)
        except KeyboardInterrupt:
            progress.finish()
            ids = ", ".join(j["batch_id"] for j in open_jobs if j["batch_id"] not in finals)
            self.note(
                f"llmbench batch: interrupted; job(s) {ids} keep running at the API and are "
                "saved: run the same command again to resume (nothing is submitted twice)"
            )
            raise

    def _wait(
        self,
        open_jobs: list[dict[str, Any]],
        finals: dict[str, Any],
        progress: Any,
        started: float,
        deadline: float | None,
        detach: bool,
    ) -> list[Any]:
        while True:
            current = self.poll(open_jobs, finals)
            live = [b for b in current if b is not None]
            done = sum(b.request_counts.completed for b in live if b.request_counts)
            failed = sum(b.request_counts.failed for b in live if b.request_counts)
            if live:
                statuses = [b.status for b in live]
                progress.update(done, failed, statuses, time.monotonic() - started)
            if len(finals) == len(open_jobs):
                break
            now = time.monotonic()
            ids = ", ".join(j["batch_id"] for j in open_jobs if j["batch_id"] not in finals)
            if detach:
                progress.finish()
                self._exit(
                    f"llmbench: batch job(s) {ids} submitted and running; run the same "
                    "command again without --llm-batch-detach to wait for them and collect "
                    "the results (nothing is submitted twice)",
                    returncode=0,
                )
            if deadline is not None and now >= deadline:
                self.waited += now - started
                progress.finish()
                self._exit(
                    f"llmbench: batch job(s) {ids} not finished after --llm-batch-timeout "
                    f"{self.settings.timeout:g}s; they are saved in the run directory: run "
                    "the same command again to resume waiting (nothing is submitted twice)",
                    returncode=1,
                )
            pause = min(self.settings.poll_interval, 60.0)
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - now))
            # waiting for a remote job is the real wait here: poll at the configured pace
            time.sleep(pause)
        self.waited += time.monotonic() - started
        progress.finish()
        return [b for b in (finals[j["batch_id"]] for j in open_jobs) if b is not None]

    @staticmethod
    def _exit(message: str, returncode: int) -> NoReturn:
        pytest.exit(message, returncode=returncode)

    def collect(self, batch: Any) -> Collected:
        """Store a finished job's results; say what needs another job."""
        job = next(j for j in self.jobs() if j.get("batch_id") == batch.id)
        requests = self.requests_of(job)
        result = Collected()
        seen: set[str] = set()
        errors: dict[str, str] = {}
        retry: list[str] = []

        def line_error(key: str, response: Any, error: Any) -> None:
            seen.add(key)
            verdict = self._line_error(key, response, error)
            if verdict is None:
                retry.append(key)
            else:
                errors[key] = verdict

        if batch.output_file_id:
            text = self._api(lambda: self.client.files.content(batch.output_file_id).text)
            for row in _jsonl(text):
                key = row.get("custom_id")
                if not isinstance(key, str) or key not in requests or key in seen:
                    continue
                resp = row.get("response") or {}
                if resp.get("status_code") == 200 and isinstance(resp.get("body"), dict):
                    seen.add(key)
                    nodeid, ordinal, endpoint, body = requests[key]
                    self.store.put(
                        key,
                        nodeid=nodeid,
                        ordinal=ordinal,
                        endpoint=endpoint,
                        request=body,
                        response=resp["body"],
                        headers={"x-request-id": str(resp.get("request_id", ""))},
                        latency_s=0.0,
                        source="batch",
                        batch_id=batch.id,
                        replace=self.state.fresh_since is not None,
                    )
                    result.stored += 1
                else:
                    line_error(key, resp, row.get("error"))
        if batch.error_file_id:
            text = self._api(lambda: self.client.files.content(batch.error_file_id).text)
            for row in _jsonl(text):
                key = row.get("custom_id")
                if isinstance(key, str) and key in requests and key not in seen:
                    line_error(key, row.get("response"), row.get("error"))
        unseen = [k for k in requests if k not in seen]
        status = batch.status
        if status == "failed":
            found = getattr(getattr(batch, "errors", None), "data", None) or []
            shown = [_api_error_line(e) for e in found[:SHOWN_ERRORS]]
            if len(found) > SHOWN_ERRORS:
                shown.append(f"... and {len(found) - SHOWN_ERRORS} more")
            reason = "; ".join(shown) or "no reason given"
            if any(getattr(e, "code", None) == "token_limit_exceeded" for e in found):
                result.token_limit = True
                retry += self._token_limited(job["model"], len(requests), unseen, errors, reason)
            else:
                for key in unseen:
                    errors[key] = f"Batch API rejected job {batch.id}: {reason}"
                self.problems.append(f"job {batch.id} failed validation: {reason}")
        elif status == "cancelled":
            for key in unseen:
                errors[key] = f"Batch API job {batch.id} was cancelled before this request ran"
            self.problems.append(f"job {batch.id} was cancelled (not by pytest-llmbench)")
        else:
            # expired: lines never run; completed: a line missing from both files (should
            # not happen) -- both are worth another job
            code = "batch_expired" if status == "expired" else "missing_result"
            for key in unseen:
                line_error(key, None, {"code": code, "message": f"not run (job {status})"})
        self._record_errors(errors)
        result.failed = len(errors)
        self.failed_keys |= set(errors)
        self.failed_keys -= set(retry)
        result.resubmit = [_planned(k, requests[k]) for k in retry]
        self._update_job(job["input_file_id"], collected=True, status=status)
        detail = f"{result.stored} stored"
        if result.resubmit:
            detail += f", {len(result.resubmit)} to resubmit"
        if errors:
            live = self.settings.fallback == "live"
            detail += f", {len(errors)} failed" + (" (left to the live API)" if live else "")
            if live:
                self.live_keys |= set(errors)
        result.line = f"llmbench batch: job {batch.id} {status}: {detail}"
        if status == "failed":
            result.line += f" -- {reason}"
        return result

    def _token_limited(
        self, model: str, size: int, keys: list[str], errors: dict[str, str], reason: str
    ) -> list[str]:
        """token_limit_exceeded: submit this model's jobs one at a time, halving until
        one fits; a single request that alone exceeds the limit fails for good."""
        alone = model in self.sequential and size <= 1
        self.sequential.add(model)
        self.model_limits[model] = max(1, size // 2)
        if alone:
            for key in keys:
                errors[key] = f"Batch API: {reason} (even as the only request of a job)"
            return []
        return keys

    def _line_error(self, key: str, response: Any, error: Any) -> str | None:
        """None: submit again; else the reason the request failed for good."""
        response = response if isinstance(response, dict) else None
        error = error if isinstance(error, dict) else None
        expired = False
        if response is None:
            code = str((error or {}).get("code") or "error")
            reason = f"{code}: {(error or {}).get('message', '')}".strip()
            retryable = code in RETRY_CODES
            expired = code == "batch_expired"
        else:
            status = int(response.get("status_code") or 0)
            body = response.get("body")
            err = (body.get("error") if isinstance(body, dict) else None) or {}
            label = err.get("code") or err.get("type") or ""
            reason = f"HTTP {status} {label}: {err.get('message', '')}".strip()
            retryable = status in RETRY_STATUSES or status >= 500
        attempts = self.attempts.get(key, 0) + 1
        self.attempts[key] = attempts
        to_live = self.settings.fallback == "live" and not expired
        if retryable and not to_live and attempts < self.settings.max_attempts:
            return None
        plural = "s" if attempts != 1 else ""
        return f"Batch API error: {reason} (after {attempts} attempt{plural})"

    def _record_errors(self, errors: dict[str, str]) -> None:
        record_errors(self.store, errors, self.state.run_token)


def record_errors(store: ResponseStore, errors: dict[str, str], run: str) -> None:
    """Save why requests failed for good; the replay fails their calls with it."""
    from .store import Failure

    if errors:
        store.record_failures({key: Failure(r, "batch", run) for key, r in errors.items()})


def clear_errors(store: ResponseStore) -> None:
    """Forget the failures of earlier invocations: they are asked again."""
    store.clear_failures("batch")


def _planned(key: str, row: list[Any]) -> PlannedRequest:
    from .plan import PlannedRequest

    nodeid, ordinal, endpoint, body = row
    return PlannedRequest(key, nodeid, int(ordinal), endpoint, body)


def _api_error_line(e: Any) -> str:
    code = getattr(e, "code", None) or "error"
    text = f"{code}: {getattr(e, 'message', '') or ''}".strip()
    line = getattr(e, "line", None)
    return f"{text} (line {line})" if line else text


def _jsonl(text: str) -> Iterable[dict[str, Any]]:
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row


class BatchProgress:
    """status, completed/failed/total, elapsed and an ETA, through the terminal writer."""

    def __init__(self, config: pytest.Config, total: int) -> None:
        self.total = total
        self._tr: Any = config.pluginmanager.get_plugin("terminalreporter")
        self._last = ""
        self._tty = bool(self._tr is not None and self._tr.isatty())
        self._shown_at = 0.0
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
        if self._tr is None or line == self._last:
            return
        now = time.monotonic()
        if self._tty:
            self._tr.rewrite(line, erase=True)
        elif now - self._shown_at >= 5.0 or status != self._status:
            self._tr.write_line(line)
            self._shown_at = now
        self._last = line
        self._status = status

    def finish(self) -> None:
        if self._tr is not None and self._tty:
            self._tr.write_line("")


def make_runner(config: pytest.Config, state: RunState) -> BatchRunner:
    # input files reach 200 MB: uploads and downloads get more time than a chat call
    client = state.client._shared.sync_client()
    client = client.with_options(timeout=max(state.llm_config.timeout, 600.0))
    return BatchRunner(
        state,
        client,
        state.store,
        lambda total: BatchProgress(config, total),
        limits=_limits(state),
        note=lambda line: _note(config, line),
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
    settings = state.llm_config.batch
    resumed = [i for i in runner.resume() if i not in runner.job_ids]
    if resumed:
        _note(config, f"llmbench batch: resuming job(s) {', '.join(resumed)}")
    in_flight = runner.pending_keys()
    todo = [p for p in planned if p.key not in in_flight and not state.is_answered(p.key)]
    queue = runner.chunks(todo)
    stored = 0
    while queue or runner.open_jobs():
        now, queue = runner.take(queue)
        if now:
            ids = runner.submit(now)
            count = sum(len(c) for c in now)
            _note(config, f"llmbench batch: submitted {count} request(s) as {', '.join(ids)}")
        for b in runner.wait_all(detach=settings.detach):
            got = runner.collect(b)
            stored += got.stored
            if got.resubmit:
                queue += runner.chunks(got.resubmit)
            _note(config, got.line)
        if runner.requeue:
            lost = [p for p in runner.requeue if not state.is_answered(p.key)]
            runner.requeue = []
            queue += runner.chunks(lost)
    return stored


def _limits(state: RunState) -> Limits:
    # lowered limits are a test-only knob (see tests/test_batch.py)
    raw = state.settings.get("llm_batch_max_requests")
    return Limits(max_requests=max(1, int(raw))) if raw else Limits()


def _note(config: pytest.Config, line: str) -> None:
    tr: Any = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line)


def summary_lines(state: RunState, cases: Sequence[CaseResult], prices: PriceTable) -> list[str]:
    """The batch lines of the summary (jobs, waiting, rounds, saving, problems); also
    fills ``report_meta["batch"]`` with the cost figures. Empty outside ``--batch-api``."""
    if not state.llm_config.batch.enabled:
        return []
    meta = state.report_meta.setdefault("batch", {"jobs": [], "waited_s": 0.0, "rounds": 0})
    batch_cost = realtime = 0.0
    priced = True
    for c in cases:
        if not c.batch or (c.prompt_tokens == 0 and c.completion_tokens == 0):
            continue
        half = prices.cost(c.model, c.prompt_tokens, c.completion_tokens, batch=True)
        full = prices.cost(c.model, c.prompt_tokens, c.completion_tokens)
        if half is None or full is None:
            priced = False
            continue
        batch_cost += half
        realtime += full
    meta.update(
        {
            "cost_usd": round(batch_cost, 6) if priced else None,
            "realtime_cost_usd": round(realtime, 6) if priced else None,
            "saved_usd": round(realtime - batch_cost, 6) if priced else None,
        }
    )
    from .results import format_cost

    jobs = list(meta.get("jobs", []))
    rounds = int(meta.get("rounds", 0))
    lines = [
        f"llmbench batch: {rounds} round(s), {len(jobs)} job(s)"
        + (f" ({', '.join(jobs)})" if jobs else " (every answer was stored already)")
        + f", waited {float(meta.get('waited_s', 0.0)):.1f}s for the Batch API"
    ]
    if any(c.batch for c in cases):
        if priced:
            pct = f" ({(realtime - batch_cost) / realtime:.0%})" if realtime > 0 else ""
            lines.append(
                f"llmbench batch: estimated cost {format_cost(batch_cost)} at batch prices vs "
                f"{format_cost(realtime)} for the same tokens in real time: saved "
                f"{format_cost(realtime - batch_cost)}{pct}"
            )
        else:
            lines.append("llmbench batch: saving unknown (a model has no price; see --llm-prices)")
    lines += [f"llmbench batch: {note}" for note in meta.get("notes", [])]
    return lines


__all__ = [
    "BatchRunner",
    "LLMCallError",
    "Limits",
    "clear_errors",
    "fetch_batch",
    "make_runner",
    "record_errors",
    "split_requests",
    "summary_lines",
]
