"""A client on its own through the Batch API: ``batch_generate(..., use_batch_api=True)``.

The same machinery as ``pytest --batch-api`` (``batch_runner``), so the same guarantees:
one job (split only at the API's limits), its id saved in the run directory before the
first poll, a rerun of the same script that resumes polling instead of paying again, and
stored answers never sent twice. What differs from the plugin is only where things go:
the progress line and the notes to stderr, a detach or a timeout as a
:class:`~pytest_llmbench.batch_wait.BatchWaitError`, a failed line as a ``Response`` with
``ok`` False (or, with ``retry_live``, a real-time call).

The client sits below the batch modules, so it cannot import this one: this module
registers itself with ``client.register_batch_backend`` when the package's public names
are first used (``pytest_llmbench.__init__``).

Requests are filed in the store under the label :data:`NODEID` (a pytest node id never
looks like it), each with its ordinal among identical requests of the call: asking the
same prompts again, in any order or with others around them, finds the same answers.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from .batch_api import NoBatchApi
from .batch_runner import BatchRunner, Limits
from .batch_wait import BatchProgress
from .client import ENDPOINT, LLMClient, register_batch_backend
from .config import LLMConfig, RunSettings
from .errors import LLMCallError
from .response import Answer, Response, Usage
from .store import PlannedRequest, ResponseStore, request_key

if TYPE_CHECKING:
    from .store import StoredResponse

#: the store's node id of a standalone client's requests
NODEID = "LLMClient.batch_generate"
#: input and output files reach 200 MB: uploads and downloads get more time than a chat call
FILE_TIMEOUT_S = 600.0


@dataclass
class ClientRun:
    """What the batch runner needs of one standalone call (``batch_runner.BatchContext``)."""

    llm_config: LLMConfig
    client: LLMClient
    run_token: str = field(default_factory=lambda: os.urandom(8).hex())
    fresh_since: float | None = None

    def add_batch_cost(self, request: Mapping[str, Any], answer: Mapping[str, Any]) -> None:
        cap = self.client.shared.cost_cap
        if cap is not None:
            cap.add_batch_answer(request, answer)


class StderrLine:
    """The progress line on stderr: rewritten in place on a terminal (at most 4 times a
    second), otherwise a line every ``every`` seconds or at once when ``force``d (a change
    of status), so a log stays short."""

    def __init__(self, stream: TextIO | None = None, every: float = 5.0) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._every = 0.25 if self._tty else every
        self._shown_at = float("-inf")
        self._text = ""

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if text == self._text or (not force and now - self._shown_at < self._every):
            return
        self._shown_at, self._text = now, text
        self._write(text)

    def finish(self, text: str | None = None) -> None:
        if text is not None and text != self._text:
            self._text = text
            self._write(text)
        if self._tty and self._text:
            self._stream.write("\n")
            self._stream.flush()

    def _write(self, text: str) -> None:
        self._stream.write(f"\r\x1b[K{text}" if self._tty else text + "\n")
        self._stream.flush()


def note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def planned_requests(bodies: Sequence[dict[str, Any]]) -> list[PlannedRequest]:
    """The store records of a call's requests: the n-th of identical bodies has ordinal n."""
    seen: dict[str, int] = {}
    out: list[PlannedRequest] = []
    for body in bodies:
        first = request_key(NODEID, 0, ENDPOINT, body)
        ordinal = seen[first] = seen.get(first, -1) + 1
        key = first if ordinal == 0 else request_key(NODEID, ordinal, ENDPOINT, body)
        out.append(PlannedRequest(key, NODEID, ordinal, ENDPOINT, body))
    return out


def batch_via_api(
    client: LLMClient, bodies: list[dict[str, Any]], *, retry_live: bool
) -> list[Response]:
    """Answer ``bodies`` from the store and one Batch API job; results in input order.

    Registered as the client's batch backend. A line that failed comes back with ``ok``
    False and the API's reason, or, with ``retry_live``, is sent in real time (and
    stored, as every answer is).
    """
    if not bodies:
        return []
    config = client.config
    requests = planned_requests(bodies)
    started = time.time()
    live: set[int] = set()
    with ResponseStore.open(config.run_dir, origin=config.endpoint) as store:
        results = _stored(store, requests, started)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            run = ClientRun(_with_fallback(config, retry_live), client)
            fatal = _fetch(run, store, [requests[i] for i in missing])
            found = store.get_many(requests[i].key for i in missing)
            for i in missing:
                if requests[i].key in found:
                    results[i] = Response.from_stored(found[requests[i].key], cached=False)
            failed = [i for i in missing if results[i] is None]
            if failed and retry_live and fatal is None:
                _send_live(client, store, requests, failed, results)
                live = set(failed)  # the transport counted these
            for i, r in enumerate(results):
                if r is None:
                    reason = fatal or _reason(store, requests[i].key, run.run_token)
                    results[i] = Response.failed(bodies[i], reason, requests[i].key)
    out = [r for r in results if r is not None]
    _count(client, [r for i, r in enumerate(out) if i not in live])
    return out


def _stored(
    store: ResponseStore, requests: Sequence[PlannedRequest], started: float
) -> list[Response | None]:
    found = store.get_many(r.key for r in requests)
    return [_response(found.get(r.key), started) for r in requests]


def _response(stored: StoredResponse | None, started: float) -> Response | None:
    if stored is None:
        return None
    # answered before this call: a replay (a job this call resumed counts as its own)
    return Response.from_stored(stored, cached=stored.created_at < started)


def _with_fallback(config: LLMConfig, retry_live: bool) -> LLMConfig:
    """With ``retry_live`` a failed line is not resubmitted in a further job (the real
    time API answers it at once), as ``--llm-batch-fallback live`` does in the plugin."""
    fallback = "live" if retry_live else "none"
    if config.batch.fallback == fallback:
        return config
    return config.with_changes(batch=config.batch.model_copy(update={"fallback": fallback}))


def _fetch(run: ClientRun, store: ResponseStore, todo: list[PlannedRequest]) -> str | None:
    """Resume the saved jobs, submit the rest, wait and collect. Returns the reason every
    unanswered request shares when the API refused one for such a reason (a wrong key, no
    quota), else None."""
    config = run.llm_config
    api = run.client.openai_client(timeout=max(config.timeout, FILE_TIMEOUT_S))
    runner = BatchRunner(
        run,
        api,
        store,
        lambda total: BatchProgress(StderrLine(), total),
        limits=_limits(),
        note=note,
    )
    try:
        runner.fetch(todo, lambda key: store.lookup(key) is not None)
    except NoBatchApi as exc:
        raise LLMCallError(
            f"use_batch_api: {exc.base_url} has no Batch API ({exc.endpoint} answered 404); "
            "call batch_generate with use_batch_api=False",
            status=404,
            fatal=True,
        ) from None
    except LLMCallError as exc:
        if not exc.fatal:
            raise  # a Batch API call failed: the jobs stay saved, the same call resumes
        return str(exc)
    return None


def _limits() -> Limits:
    # lowered limits are a test-only knob, as in the plugin (LLMBENCH_BATCH_MAX_REQUESTS)
    raw = RunSettings.from_resolved({}).batch_max_requests
    return Limits(max_requests=raw) if raw else Limits()


def _reason(store: ResponseStore, key: str, run_token: str) -> str:
    failure = store.failure(key)
    if failure is not None and failure.run == run_token:
        return failure.reason
    return "not answered by the Batch API"


def _send_live(
    client: LLMClient,
    store: ResponseStore,
    requests: Sequence[PlannedRequest],
    items: list[int],
    results: list[Response | None],
) -> None:
    """The failed lines in real time, through the client's one concurrent path."""

    def answered(i: int, answer: Answer) -> None:
        req = requests[i]
        store.save(req, answer, source="live", replace=False)
        results[i] = Response.from_body(
            answer.body,
            request=req.body,
            latency=answer.latency,
            request_id=answer.headers.get("x-request-id"),
            attempts=answer.attempts,
            rate_limited=answer.rate_limited,
            key=req.key,
        )

    def failed(i: int, error: LLMCallError) -> None:
        results[i] = Response.failed(requests[i].body, str(error), requests[i].key)

    asyncio.run(client.arun(items, lambda i: requests[i].body, answered, failed))


def _count(client: LLMClient, responses: Sequence[Response]) -> None:
    """The client's counters (``client.usage()``) for the results it did not send live."""
    for r in responses:
        model = r.model or client.config.model
        if not r.ok:
            client.stats.add(model, errors=1)
        else:
            usage = Usage() if r.cached else r.usage
            client.stats.add(model, calls=1, cached=int(r.cached), usage=usage)


register_batch_backend(batch_via_api)

__all__ = ["NODEID", "ClientRun", "StderrLine", "batch_via_api", "planned_requests"]
