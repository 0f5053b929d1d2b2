"""The Batch API fetcher: one job for the run's planned requests, resumable, half price.

Job records live in the response store's state table the moment a job is created, so a
crash, Ctrl-C or ``--llm-batch-detach`` never loses a job: the next identical invocation
finds it, resumes polling and never submits the same request again. Results are joined
on ``custom_id``, which *is* the store key (sha256 of node id, ordinal, endpoint, body).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from .errors import LLMCallError
from .retry import BackoffPolicy, describe, is_retryable

if TYPE_CHECKING:
    import openai

    from .engine import PlannedRequest
    from .runtime import RunState
    from .store import ResponseStore

JOBS_STATE = "batch:jobs"
ERROR_PREFIX = "batch:error:"
ATTEMPTS_PREFIX = "batch:attempts:"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: API limits per input file (shared/reference/openai-api.md, Batch API)
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024
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


def split_requests(
    requests: Sequence[PlannedRequest], limits: Limits
) -> list[list[PlannedRequest]]:
    """Group by (endpoint, model), then chunk so each file fits the API's limits."""
    groups: dict[tuple[str, str], list[PlannedRequest]] = {}
    for r in requests:
        groups.setdefault((r.endpoint, str(r.body.get("model"))), []).append(r)
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


class BatchRunner:
    """Submits, tracks, resumes and collects the jobs of one run."""

    def __init__(
        self,
        state: RunState,
        client: openai.OpenAI,
        store: ResponseStore,
        progress_factory: Callable[[int], Any],
        limits: Limits | None = None,
    ) -> None:
        self.state = state
        self.settings = state.llm_config.batch
        self.client = client
        self.store = store
        self.progress_factory = progress_factory
        self.limits = limits or Limits()
        self.policy = BackoffPolicy(base=0.5, cap=10.0)
        self.waited = 0.0
        self.job_ids: list[str] = []

    # -- persistence
    def jobs(self) -> list[dict[str, Any]]:
        return list(self.store.get_state(JOBS_STATE) or [])

    def _save_jobs(self, jobs: list[dict[str, Any]]) -> None:
        self.store.set_state(JOBS_STATE, jobs)

    def _update_job(self, batch_id: str, **changes: Any) -> None:
        jobs = self.jobs()
        for job in jobs:
            if job["batch_id"] == batch_id:
                job.update(changes)
        self._save_jobs(jobs)

    def open_jobs(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs() if not j.get("collected")]

    def pending_keys(self) -> set[str]:
        return {k for j in self.open_jobs() for k in j["requests"]}

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

    def _retrieve(self, batch_id: str) -> Any:
        return self._api(lambda: self.client.batches.retrieve(batch_id))

    # -- submit
    def submit(self, requests: Sequence[PlannedRequest]) -> list[str]:
        ids = []
        for chunk in split_requests(requests, self.limits):
            ids.append(self._submit_one(chunk))
        return ids

    def _submit_one(self, chunk: Sequence[PlannedRequest]) -> str:
        data = ("\n".join(input_line(r) for r in chunk) + "\n").encode()
        upload = self._api(
            lambda: self.client.files.create(
                file=("llmbench-batch.jsonl", io.BytesIO(data)), purpose="batch"
            )
        )
        endpoint = chunk[0].endpoint
        batch = self._api(
            lambda: self.client.batches.create(
                input_file_id=upload.id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=self.settings.completion_window,
                metadata={"created_by": "pytest-llmbench", "requests": str(len(chunk))},
            )
        )
        job = {
            "batch_id": batch.id,
            "input_file_id": upload.id,
            "model": str(chunk[0].body.get("model")),
            "created_at": time.time(),
            "requests": {r.key: [r.nodeid, r.ordinal, r.endpoint, r.body] for r in chunk},
            "status": batch.status,
            "collected": False,
        }
        # saved before the first poll: a crash from here on resumes this job
        self._save_jobs([*self.jobs(), job])
        self.job_ids.append(batch.id)
        return batch.id

    # -- wait and collect
    def wait_all(self, deadline: float | None) -> list[Any]:
        """Poll every open job until all are terminal; returns the final batch objects."""
        open_jobs = self.open_jobs()
        total = sum(len(j["requests"]) for j in open_jobs)
        progress = self.progress_factory(total)
        started = time.monotonic()
        finals: dict[str, Any] = {}
        while True:
            done = failed = 0
            statuses = []
            for job in open_jobs:
                bid = job["batch_id"]
                if bid not in finals:
                    b = self._retrieve(bid)
                    self._update_job(bid, status=b.status)
                    if b.status in TERMINAL:
                        finals[bid] = b
                    current = b
                else:
                    current = finals[bid]
                counts = current.request_counts
                done += counts.completed if counts else 0
                failed += counts.failed if counts else 0
                statuses.append(current.status)
            progress.update(done, failed, statuses, time.monotonic() - started)
            if len(finals) == len(open_jobs):
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.waited += time.monotonic() - started
                progress.finish()
                ids = ", ".join(j["batch_id"] for j in open_jobs)
                raise pytest.exit(
                    f"llmbench: batch job(s) {ids} not finished after --llm-batch-timeout; "
                    "they are saved: run the same command again to resume (nothing is "
                    "submitted twice)",
                    returncode=1,
                )
            # waiting for a remote job is the real wait here: poll at the configured pace
            time.sleep(min(self.settings.poll_interval, 60.0))
        self.waited += time.monotonic() - started
        progress.finish()
        return [finals[j["batch_id"]] for j in open_jobs]

    def collect(self, batch: Any) -> tuple[int, list[str]]:
        """Store a finished job's results; returns (stored, keys to retry)."""
        job = next(j for j in self.jobs() if j["batch_id"] == batch.id)
        requests: dict[str, list[Any]] = job["requests"]
        stored = 0
        seen: set[str] = set()
        retry: list[str] = []
        if batch.output_file_id:
            text = self._api(lambda: self.client.files.content(batch.output_file_id).text)
            for row in _jsonl(text):
                key = row.get("custom_id")
                if key not in requests:
                    continue
                seen.add(key)
                resp = row.get("response") or {}
                if resp.get("status_code") == 200 and isinstance(resp.get("body"), dict):
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
                    self.store.delete_state(ERROR_PREFIX + key)
                    stored += 1
                else:
                    retry += self._line_error(key, resp, None)
        if batch.error_file_id:
            text = self._api(lambda: self.client.files.content(batch.error_file_id).text)
            for row in _jsonl(text):
                key = row.get("custom_id")
                if key not in requests or key in seen:
                    continue
                seen.add(key)
                retry += self._line_error(key, row.get("response"), row.get("error"))
        if batch.status == "failed":
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            reason = "; ".join(f"{e.code}: {e.message}" for e in errors) or "batch failed"
            token_limit = any(e.code == "token_limit_exceeded" for e in errors)
            for key in requests:
                if key not in seen:
                    if token_limit:
                        retry.append(key)
                    else:
                        self._record_error(key, f"batch {batch.id} failed validation: {reason}")
            if token_limit:
                self.limits.max_requests = max(1, len(requests) // 2)
        elif batch.status in ("cancelled", "expired"):
            for key in requests:
                if key not in seen:
                    if batch.status == "expired":
                        retry.append(key)
                    else:
                        self._record_error(key, f"batch {batch.id} was cancelled")
        self._update_job(batch.id, collected=True, status=batch.status)
        return stored, retry

    def _line_error(self, key: str, response: Any, error: Any) -> list[str]:
        if error and not response:
            code = error.get("code", "error")
            reason = f"{code}: {error.get('message', '')}".strip()
            retryable = code in ("batch_expired", "server_error", "rate_limit_exceeded")
        else:
            status = int((response or {}).get("status_code") or 0)
            err = ((response or {}).get("body") or {}).get("error") or {}
            reason = f"HTTP {status} {err.get('code') or err.get('type') or ''}: "
            reason += str(err.get("message", ""))
            retryable = status == 429 or status >= 500
        attempts = int(self.store.get_state(ATTEMPTS_PREFIX + key) or 0) + 1
        self.store.set_state(ATTEMPTS_PREFIX + key, attempts)
        if retryable and attempts < self.settings.max_attempts:
            return [key]
        self._record_error(key, f"Batch API error: {reason.strip()} (after {attempts} attempt(s))")
        return []

    def _record_error(self, key: str, reason: str) -> None:
        self.store.set_state(ERROR_PREFIX + key, reason)


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

    def update(self, done: int, failed: int, statuses: list[str], elapsed: float) -> None:
        finished = done + failed
        eta = "-"
        if 0 < finished < self.total and elapsed > 0:
            eta = f"{(self.total - finished) * elapsed / finished:.0f}s"
        status = ",".join(sorted(set(statuses)))
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


def fetch_batch(
    config: pytest.Config,
    state: RunState,
    planned: Sequence[PlannedRequest],
    deadline: float | None,
) -> tuple[int, set[str]]:
    """One round: submit what is neither stored nor in an open job, wait, collect.

    Returns (responses stored, keys that still need a follow-up job).
    """
    store = state.store
    client = state.client._shared.sync_client()
    runner = BatchRunner(
        state, client, store, lambda total: BatchProgress(config, total), limits=_limits(state)
    )
    in_flight = runner.pending_keys()
    todo = [p for p in planned if not state.is_answered(p.key) and p.key not in in_flight]
    resumed = [j["batch_id"] for j in runner.open_jobs()]
    if resumed:
        _note(config, f"llmbench batch: resuming job(s) {', '.join(resumed)}")
    pending = list(todo)
    stored = 0
    retry_keys: set[str] = set()
    while pending or runner.open_jobs():
        if pending:
            ids = runner.submit(pending)
            _note(
                config, f"llmbench batch: submitted {len(pending)} request(s) as {', '.join(ids)}"
            )
            pending = []
            if state.llm_config.batch.detach:
                raise pytest.exit(
                    f"llmbench: batch job(s) {', '.join(ids)} submitted; run the same command "
                    "again (without --llm-batch-detach) to collect the results",
                    returncode=0,
                )
        for b in runner.wait_all(deadline):
            n, retry = runner.collect(b)
            stored += n
            if b.status == "failed" and retry:
                # token_limit_exceeded: resubmit at once in smaller jobs
                by_key = {p.key: p for p in planned}
                pending += [by_key[k] for k in retry if k in by_key]
            else:
                retry_keys.update(retry)
            _note(
                config, f"llmbench batch: job {b.id} {b.status}: {n} stored, {len(retry)} to retry"
            )
    state.report_meta.setdefault("batch", {"jobs": [], "waited_s": 0.0})
    state.report_meta["batch"]["jobs"] += [*resumed, *runner.job_ids]
    state.report_meta["batch"]["waited_s"] += round(runner.waited, 3)
    return stored, retry_keys


def _limits(state: RunState) -> Limits:
    # lowered limits are a test-only knob (see tests/test_batch.py)
    raw = state.settings.get("llm_batch_max_requests")
    return Limits(max_requests=int(raw)) if raw else Limits()


def _note(config: pytest.Config, line: str) -> None:
    tr: Any = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line)


def stored_error(store: ResponseStore, key: str) -> str | None:
    """The Batch API's reason for a request that failed for good, if any."""
    value = store.get_state(ERROR_PREFIX + key)
    return str(value) if value else None


__all__ = ["BatchRunner", "LLMCallError", "Limits", "fetch_batch", "split_requests", "stored_error"]
