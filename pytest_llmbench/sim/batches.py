"""Files and the Batch API: upload, validation, phased progress, output and error files.

One asyncio task per batch drives its phases and sleeps between them (no polling):
``validating`` (``batch_validating_seconds``) → ``in_progress`` (lines finish one by one at
``batch_requests_per_second``; ``request_counts`` and ``usage`` are computed from the clock
on each retrieve) → ``finalizing`` (``batch_finalizing_seconds``) → ``completed``. A file that
fails validation ends ``failed`` with ``errors.data``; a change of ``batch_validating_seconds``
(``Simulator.configure``, ``POST /_sim/config``) reaches the jobs still validating at
once (a test can hold a job open across runs, then let it go); a batch still running
``batch_expire_after`` seconds after creation ends ``expired`` (finished lines in the output
file, the rest as ``batch_expired`` in the error file); cancel gives ``cancelling`` for
``batch_cancelling_seconds``, then ``cancelled`` with the lines finished so far (lines never
run are left out). Output lines come in a shuffled order, seeded by the simulator seed and
the input file's hash. Batch lines never touch the real-time RPM/TPM buckets or faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .answers import prompt_tokens as count_prompt_tokens
from .chat import answer_chat, completion_object, request_id, usage_object, validate_chat
from .files import FileStore
from .state import SimState

CHAT_ENDPOINT = "/v1/chat/completions"
ENDPOINTS = [
    "/v1/responses",
    CHAT_ENDPOINT,
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
]
MAX_REPORTED_ERRORS = 1000
_ACTIVE = ("validating", "in_progress", "finalizing")


@dataclass
class LineResult:
    """One executed line, in processing order."""

    custom_id: str
    ok: bool
    record: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Batch:
    """One batch and its progress."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    created_mono: float
    expires_at: int
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    results: list[LineResult] = field(default_factory=list)
    enqueued_tokens: int = 0
    progress_start: float | None = None
    rate: float | None = None
    frozen: int | None = None  # lines finished when in_progress ended
    output_file_id: str | None = None
    error_file_id: str | None = None
    task: asyncio.Task[None] | None = None

    def processed(self, now: float) -> int:
        if self.frozen is not None:
            return self.frozen
        if self.progress_start is None:
            return 0
        if self.rate is None:
            return len(self.results)
        return min(len(self.results), int((now - self.progress_start) * self.rate + 1e-9))


class BatchManager:
    """All batches of one simulator."""

    def __init__(self, state: SimState, files: FileStore) -> None:
        self.state = state
        self.files = files
        self.batches: dict[str, Batch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, from create()
        self._reconfigured: asyncio.Event | None = None  # set at the next configure
        state.on_configure(self._configured)

    # -- API operations ------------------------------------------------------------------

    def create(self, params: Any) -> Batch:
        if not isinstance(params, dict):
            raise errors.invalid_type("body", "an object", params)
        for name in ("input_file_id", "endpoint", "completion_window"):
            if params.get(name) is None:
                raise errors.missing_param(name)
        endpoint = params["endpoint"]
        if endpoint not in ENDPOINTS:
            raise errors.invalid_value("endpoint", endpoint, ENDPOINTS)
        if endpoint != CHAT_ENDPOINT:
            raise errors.SimAPIError(
                400,
                f"The simulator supports only '{CHAT_ENDPOINT}' batches.",
                param="endpoint",
                code="unsupported_value",
            )
        if params["completion_window"] != "24h":
            raise errors.invalid_value("completion_window", params["completion_window"], ["24h"])
        metadata = _metadata(params.get("metadata"))
        source = self.files.get(str(params["input_file_id"]))
        if source.purpose != "batch":
            raise errors.SimAPIError(
                400,
                f"Invalid file purpose '{source.purpose}' for {source.id}: expected 'batch'.",
                param="input_file_id",
            )
        now = time.time()
        batch = Batch(
            id=f"batch_{uuid.uuid4().hex}",
            input_file_id=source.id,
            endpoint=endpoint,
            completion_window="24h",
            metadata=metadata,
            created_at=int(now),
            created_mono=time.monotonic(),
            expires_at=int(now + self.state.config.batch_expire_after + 0.999),
        )
        self.batches[batch.id] = batch
        self.state.count("batches_created")
        self._loop = asyncio.get_running_loop()
        batch.task = self._loop.create_task(self._run(batch, source.data))
        return batch

    def get(self, batch_id: str) -> Batch:
        try:
            return self.batches[batch_id]
        except KeyError:
            raise errors.not_found_object("Batch", batch_id) from None

    def cancel(self, batch_id: str) -> Batch:
        batch = self.get(batch_id)
        if batch.status not in _ACTIVE:
            raise errors.SimAPIError(
                400, f"Cannot cancel a batch with status '{batch.status}'.", param=None
            )
        self._freeze(batch, batch.processed(time.monotonic()))
        if batch.task is not None:
            batch.task.cancel()
        self._set(batch, "cancelling")
        batch.task = asyncio.get_running_loop().create_task(self._finish_cancel(batch))
        return batch

    def listing(self, limit: int, after: str | None) -> dict[str, Any]:
        ordered = sorted(self.batches.values(), key=lambda b: b.created_mono, reverse=True)
        if after is not None:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        page = ordered[:limit]
        data = [self.to_json(b) for b in page]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(ordered) > limit,
        }

    async def close(self) -> None:
        tasks = [b.task for b in self.batches.values() if b.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the object ----------------------------------------------------------------------

    def to_json(self, b: Batch) -> dict[str, Any]:
        done = b.results[: b.processed(time.monotonic())]
        completed = sum(1 for r in done if r.ok)
        failed = len(done) - completed
        total = len(b.lines)
        if b.status == "expired":
            failed = total - completed
        prompt = sum(r.prompt_tokens for r in done if r.ok)
        output = sum(r.completion_tokens for r in done if r.ok)
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "model": b.model,
            "errors": {"object": "list", "data": b.errors} if b.errors else None,
            "input_file_id": b.input_file_id,
            "completion_window": b.completion_window,
            "status": b.status,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "created_at": b.created_at,
            "in_progress_at": b.times.get("in_progress"),
            "expires_at": b.expires_at,
            "finalizing_at": b.times.get("finalizing"),
            "completed_at": b.times.get("completed"),
            "failed_at": b.times.get("failed"),
            "expired_at": b.times.get("expired"),
            "cancelling_at": b.times.get("cancelling"),
            "cancelled_at": b.times.get("cancelled"),
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + output,
            },
            "metadata": b.metadata,
        }

    # -- the phases ----------------------------------------------------------------------

    def _set(self, b: Batch, status: str) -> None:
        b.status = status
        b.times[status] = int(time.time())

    async def _run(self, b: Batch, data: bytes) -> None:
        cfg = self.state.config
        deadline = b.created_mono + cfg.batch_expire_after
        b.lines, b.errors, b.model = self._validate(data)
        if not b.errors:
            self._check_enqueued(b)
        if not await self._validated(b, deadline):
            return self._expire(b)
        if b.errors:
            b.enqueued_tokens = 0
            return self._set(b, "failed")
        self._set(b, "in_progress")
        await self._execute(b, data)
        b.progress_start = time.monotonic()
        b.rate = self.state.config.batch_requests_per_second
        end = b.progress_start + (len(b.results) / b.rate if b.rate else 0.0)
        if not await _wait(end, deadline):
            return self._expire(b)
        self._freeze(b, len(b.results))
        self._set(b, "finalizing")
        finalizing = self.state.config.batch_finalizing_seconds
        if not await _wait(time.monotonic() + finalizing, deadline):
            return self._expire(b)
        self._write_files(b, [])
        self._set(b, "completed")

    async def _validated(self, b: Batch, deadline: float) -> bool:
        """Wait until ``batch_validating_seconds`` after the job's creation, as configured
        at each moment (a change wakes the wait), or until ``deadline`` (False: the job
        expires)."""
        while True:
            end = b.created_mono + self.state.config.batch_validating_seconds
            if self._reconfigured is None:
                self._reconfigured = asyncio.Event()
            changed = self._reconfigured
            timeout = max(0.0, min(end, deadline) - time.monotonic())
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except asyncio.TimeoutError:  # 3.10: not the builtin TimeoutError
                return end <= deadline

    def _configured(self) -> None:
        """The configuration changed (in any thread): the jobs validating look again."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the server has stopped: nobody waits
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        changed, self._reconfigured = self._reconfigured, None
        if changed is not None:
            changed.set()

    async def _finish_cancel(self, b: Batch) -> None:
        await asyncio.sleep(self.state.config.batch_cancelling_seconds)
        self._write_files(b, [])
        self._set(b, "cancelled")

    def _freeze(self, b: Batch, finished: int) -> None:
        """End the in_progress phase: count the lines run, free the enqueued tokens."""
        if b.frozen is None:
            b.frozen = finished
            self.state.count("batch_lines_processed", finished)
        b.enqueued_tokens = 0

    def _expire(self, b: Batch) -> None:
        self._freeze(b, b.processed(time.monotonic()))
        finished = {r.custom_id for r in b.results[: b.frozen]}
        expired = [
            {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": line["custom_id"],
                "response": None,
                "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion "
                    "window expired.",
                },
            }
            for line in b.lines
            if line["custom_id"] not in finished
        ]
        self._write_files(b, expired)
        self._set(b, "expired")

    def _write_files(self, b: Batch, extra_errors: list[dict[str, Any]]) -> None:
        done = b.results[: b.frozen or 0]
        out = [r.record for r in done if r.ok]
        err = [r.record for r in done if not r.ok] + extra_errors
        if out:
            name = f"batch_{b.id}_output.jsonl"
            b.output_file_id = self.files.add(name, "batch_output", _jsonl(out)).id
        if err:
            name = f"batch_{b.id}_error.jsonl"
            b.error_file_id = self.files.add(name, "batch_output", _jsonl(err)).id

    # -- validation and execution --------------------------------------------------------

    def _validate(
        self, data: bytes
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
        cfg = self.state.config
        errs: list[dict[str, Any]] = []

        def fail(code: str, message: str, line: int | None, param: str | None = None) -> None:
            errs.append({"code": code, "message": message, "param": param, "line": line})

        if len(data) > cfg.batch_max_bytes:
            fail(
                "file_too_large",
                f"The input file is larger than {cfg.batch_max_bytes} bytes.",
                None,
            )
            return [], errs, None
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        model: str | None = None
        for lineno, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = None
            if not isinstance(line, dict):
                fail("invalid_json_line", "This line is not parseable as valid JSON.", lineno)
                continue
            problem = _line_problem(line)
            if problem is not None:
                code, message, param = problem
                fail(code, message, lineno, param)
                continue
            if line["custom_id"] in seen:
                fail(
                    "duplicate_custom_id",
                    "The custom_id for this request is a duplicate of another request. The "
                    "custom_id parameter must be unique for each request in a batch.",
                    lineno,
                    "custom_id",
                )
                continue
            seen.add(line["custom_id"])
            line_model = line["body"].get("model")
            if model is None:
                model = line_model
            elif line_model != model:
                fail(
                    "model_mismatch",
                    f"The model '{line_model}' differs from '{model}' used earlier in the file: "
                    "each batch input file may target only one model.",
                    lineno,
                    "body.model",
                )
                continue
            lines.append(line)
        if not lines and not errs:
            fail("empty_file", "The batch input file is empty.", None)
        if len(lines) > cfg.batch_max_requests:
            fail(
                "too_many_tasks",
                f"The batch input file has {len(lines)} requests; the limit is "
                f"{cfg.batch_max_requests}.",
                None,
            )
        return lines, errs[:MAX_REPORTED_ERRORS], model

    def _check_enqueued(self, b: Batch) -> None:
        cfg = self.state.config
        b.enqueued_tokens = sum(
            count_prompt_tokens(m, body.get("model"), cfg.tokenizer)
            for body in (line["body"] for line in b.lines)
            if isinstance(m := body.get("messages"), list)
        )
        limit = cfg.batch_enqueued_token_limit
        if limit is None:
            return
        pending = sum(
            o.enqueued_tokens
            for o in self.batches.values()
            if o is not b and o.model == b.model and o.status in _ACTIVE
        )
        if pending + b.enqueued_tokens > limit:
            b.errors = [
                {
                    "code": "token_limit_exceeded",
                    "message": f"Enqueued token limit reached for {b.model} in organization "
                    f"{cfg.organization}. Limit: {limit:,} enqueued tokens. Please try again "
                    "once some in_progress batches have been completed.",
                    "param": None,
                    "line": None,
                }
            ]
            b.enqueued_tokens = 0

    async def _execute(self, b: Batch, data: bytes) -> None:
        cfg = self.state.config
        order = list(range(len(b.lines)))
        random.Random(f"{cfg.seed}|{hashlib.sha256(data).hexdigest()}").shuffle(order)
        fail_ids = set(cfg.batch_fail_custom_ids)
        for position, i in enumerate(order):
            if position % 500 == 499:
                await asyncio.sleep(0)  # let other requests in while a big file is answered
            b.results.append(self._line(b.lines[i], fail_ids))

    def _line(self, line: dict[str, Any], fail_ids: set[str]) -> LineResult:
        cfg = self.state.config
        custom_id = line["custom_id"]
        record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id}
        digest = hashlib.sha256(f"{cfg.seed}|line-error|{custom_id}".encode()).digest()
        injected = int.from_bytes(digest[:8], "big") / 2.0**64 < cfg.batch_line_error_rate
        try:
            req = validate_chat(line["body"], cfg)
            if custom_id in fail_ids or injected:
                raise _injected_error(cfg.batch_line_error_status)
        except errors.SimAPIError as exc:
            record["response"] = {
                "status_code": exc.status,
                "request_id": request_id(),
                "body": exc.body(),
            }
            record["error"] = None
            return LineResult(custom_id, False, record)
        answer = answer_chat(req, self.state.index, cfg, self.state.next_draw(req.hash))
        body = completion_object(req, answer, int(time.time()))
        body["usage"] = usage_object(
            answer.prompt_tokens, answer.completion_tokens, answer.reasoning_tokens
        )
        record["response"] = {"status_code": 200, "request_id": request_id(), "body": body}
        record["error"] = None
        return LineResult(custom_id, True, record, answer.prompt_tokens, answer.completion_tokens)


def _injected_error(status: int) -> errors.SimAPIError:
    if status == 400:
        return errors.SimAPIError(400, "The request was rejected by the simulator (injected).")
    return errors.SimAPIError(500, errors.SERVER_ERROR, "server_error")


def _line_problem(line: dict[str, Any]) -> tuple[str, str, str] | None:
    """(code, message, param) of a structurally bad request line, or None."""
    for name in ("custom_id", "method", "url", "body"):
        if line.get(name) is None:
            return "missing_required_parameter", f"Missing required parameter: '{name}'.", name
    if not isinstance(line["custom_id"], str) or not line["custom_id"]:
        return "invalid_type", "The custom_id must be a non-empty string.", "custom_id"
    if line["method"] != "POST":
        return "invalid_value", f"Invalid value: '{line['method']}'. Supported: 'POST'.", "method"
    if line["url"] != CHAT_ENDPOINT:
        return (
            "url_mismatch",
            f"The url '{line['url']}' does not match the batch endpoint '{CHAT_ENDPOINT}'.",
            "url",
        )
    if not isinstance(line["body"], dict):
        return "invalid_type", "The body must be a JSON object.", "body"
    if not isinstance(line["body"].get("model"), str):
        return "missing_required_parameter", "Missing required parameter: 'body.model'.", "model"
    return None


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise errors.invalid_type("metadata", "an object", value)
    if len(value) > 16:
        raise errors.SimAPIError(400, "Invalid 'metadata': at most 16 pairs.", param="metadata")
    for key, val in value.items():
        if len(key) > 64 or not isinstance(val, str) or len(val) > 512:
            raise errors.SimAPIError(
                400,
                f"Invalid 'metadata' pair '{key}': keys up to 64 and string values up to 512 "
                "characters.",
                param="metadata",
            )
    return dict(value)


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


async def _wait(target: float, deadline: float) -> bool:
    """Sleep until ``target`` or ``deadline`` (monotonic), whichever comes first.

    Returns False when the deadline came first: the batch expires.
    """
    await asyncio.sleep(max(0.0, min(target, deadline) - time.monotonic()))
    return target <= deadline
