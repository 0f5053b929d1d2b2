"""LLMClient: one call path composed of store, budget, retry and the SDK.

A call goes: build the request body -> look it up in the response store -> (plan phase:
record it and stop the test) -> send it (``transport.py``: budget, SDK, retries) -> save
the answer -> :class:`Response`. ``batch_generate`` and the plugin's fetch stage run many
calls through :meth:`LLMClient.arun`, the package's one concurrent path; with
``use_batch_api`` it hands them to the Batch API backend (``batch_client``), which sits
above this module and registers itself here (:func:`register_batch_backend`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .config import LLMConfig
from .errors import MISSING_KEY, ConfigError, LLMCallError, LLMPending, RunStopped
from .reasoning import is_reasoning_model
from .response import Answer, ClientStats, ModelStats, Response, Usage, estimate_tokens
from .store import GAVE_UP, PlannedRequest

if TYPE_CHECKING:
    import openai

    from .budget import Budget
    from .concurrency import Concurrency
    from .store import ResponseStore
    from .transport import OnAnswer, Shared

T = TypeVar("T")
ENDPOINT = "/v1/chat/completions"
Messages = Sequence[Mapping[str, Any]]
PromptLike = str | Messages


@dataclass
class CallContext:
    """What ties calls to a test case: its node id, the store, and the plan-phase recorder.

    ``record`` (plan phase) receives ``(key, nodeid, ordinal, endpoint, body)`` for each
    request that is
    not stored yet; the client then raises :class:`LLMPending`.
    """

    nodeid: str
    store: ResponseStore | None = None
    fresh_since: float | None = None  # --llm-fresh: answers stored before this are ignored
    record: Callable[[str, str, int, str, dict[str, Any]], None] | None = None
    on_response: Callable[[Response], None] | None = None
    on_error: Callable[[LLMCallError], None] | None = None  # a call that failed for good
    batch_errors: bool = False  # a Batch API failure stored for a key fails the call
    run_started: float = 0.0  # answers fetched ahead after this are this run's, not cached
    run_token: str = ""  # failures the prefetch recorded under this token fail the call
    cassette_replay: bool = False  # every answer comes from a cassette: nothing is sent
    # an answer the prefetch is still fetching: wait for it (True: look it up again)
    await_answer: Callable[[str], bool] | None = None
    stopped: Callable[[], str | None] | None = None  # why the run stops, or None
    ordinal: int = 0

    def next_ordinal(self) -> int:
        self.ordinal += 1
        return self.ordinal - 1


class BatchBackend(Protocol):
    """Answers a standalone client's requests through the Batch API, in input order."""

    def __call__(
        self, client: LLMClient, bodies: list[dict[str, Any]], *, retry_live: bool
    ) -> list[Response]: ...


_BACKENDS: dict[str, BatchBackend] = {}
NO_BATCH_BACKEND = (
    "use_batch_api: the Batch API backend is not loaded; take LLMClient from the package "
    "(from pytest_llmbench import LLMClient) or import pytest_llmbench.batch_client"
)


def register_batch_backend(backend: BatchBackend) -> None:
    """Where ``batch_generate(..., use_batch_api=True)`` goes (``batch_client`` registers
    itself: the batch modules sit above the client, which must not import them)."""
    _BACKENDS["batch"] = backend


class _Link:
    """The transport every view of one client shares (``transport.Shared``: SDK
    clients, budgets, retry policy), made when first needed: a process that only plans
    or replays stored answers never loads the send path (the budget's file lock,
    tenacity, the wire), which cost each pytest process about 0.1 s of its start."""

    def __init__(self, config: LLMConfig, budget: Budget | None) -> None:
        self.config = config
        self.budget = budget
        self.made: Shared | None = None
        self._lock = threading.Lock()

    def get(self) -> Shared:
        made = self.made
        if made is None:
            with self._lock:
                if self.made is None:
                    from .transport import Shared

                    self.made = Shared(self.config, self.budget)
                made = self.made
        return made


def to_messages(prompt: PromptLike) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


class LLMClient:
    """A rate-limited, retrying, resumable OpenAI chat client.

    ``LLMClient(config)`` works on its own; the plugin's ``llm`` fixture gives each test a
    :meth:`bind` view that shares the budget, connections and counters but knows its
    test case (so answers are stored and replayed) and its temperature.
    """

    def __init__(
        self,
        config: LLMConfig | None = None,
        *,
        budget: Budget | None = None,
        defaults: Mapping[str, Any] | None = None,
        context: CallContext | None = None,
        stats: ClientStats | None = None,
    ) -> None:
        self.config = config or LLMConfig()
        self.defaults: dict[str, Any] = dict(defaults or {})
        self.context = context
        self.stats = stats or ClientStats()
        self._ordinals: dict[str, int] = {}
        self._gave_up: dict[str, tuple[int, int]] = {}  # key -> the prefetch's (attempts, 429s)
        self._link = _Link(self.config, budget)

    def __repr__(self) -> str:
        where = self.config.base_url or "https://api.openai.com/v1"
        return f"LLMClient(model={self.config.model!r}, base_url={where!r})"

    # ----------------------------------------------------------------- views
    def bind(self, *, context: CallContext | None = None, **defaults: Any) -> LLMClient:
        """A view with extra default parameters (e.g. temperature) and a test context."""
        view = object.__new__(LLMClient)
        view.config = self.config
        view.defaults = {**self.defaults, **defaults}
        view.context = context if context is not None else self.context
        view.stats = self.stats
        view._ordinals = {}
        view._gave_up = {}
        view._link = self._link
        return view

    @property
    def shared(self) -> Shared:
        """What every view of this client shares (made at its first use)."""
        return self._link.get()

    def close(self) -> None:
        if self._link.made is not None:
            self._link.made.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- requests
    def build_request(self, prompt: PromptLike, params: Mapping[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.config.model, **self.defaults, **params}
        body["messages"] = to_messages(prompt)
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_completion_tokens"] = self.config.max_tokens
        if self.config.reasoning_effort is not None:
            body.setdefault("reasoning_effort", self.config.reasoning_effort)
        if body.get("max_tokens") is not None and is_reasoning_model(str(body["model"])):
            # a reasoning model refuses max_tokens (400): the same bound by its newer name
            limit = body.pop("max_tokens")
            if body.get("max_completion_tokens") is None:
                body["max_completion_tokens"] = limit
        return {k: v for k, v in body.items() if v is not None}

    def _key(self, body: Mapping[str, Any]) -> str | None:
        """The store key of this call; every call of a bound view takes the next ordinal."""
        ctx = self.context
        if ctx is None:
            return None
        ordinal = ctx.next_ordinal()
        if ctx.store is None:
            return None
        from .store import request_key

        key = request_key(ctx.nodeid, ordinal, ENDPOINT, body)
        self._ordinals[key] = ordinal
        return key

    def _lookup(self, key: str | None) -> Response | None:
        ctx = self.context
        if key is None or ctx is None or ctx.store is None:
            return None
        stored = ctx.store.lookup(key, fresh_since=ctx.fresh_since)
        if stored is None and ctx.await_answer is not None and ctx.await_answer(key):
            stored = ctx.store.lookup(key, fresh_since=ctx.fresh_since)
        if stored is None:
            failure = ctx.store.failure(key)
            if failure is not None and failure.run == ctx.run_token and failure.source == GAVE_UP:
                # the prefetch gave up on it: it goes live now, and counts those attempts
                self._gave_up[key] = (failure.attempts, failure.rate_limited)
            elif (
                failure is not None
                and failure.run == ctx.run_token
                and (failure.source != "batch" or ctx.batch_errors)
            ):
                # failed for good earlier in this run (a 401 in the prefetch, a Batch API
                # verdict): fail the call the same way instead of paying for it again
                error = LLMCallError(failure.reason, attempts=failure.attempts)
                error.rate_limited = failure.rate_limited
                self._failed(error)
                raise error
            return None
        ahead = stored.source in ("prefetch", "batch") and stored.created_at >= ctx.run_started
        response = Response.from_stored(stored, cached=not ahead)
        self.stats.add(response.model or self.config.model, cached=int(not ahead), calls=1)
        return response

    def _save(self, key: str | None, body: dict[str, Any], raw: Answer) -> None:
        ctx = self.context
        if key is None or ctx is None or ctx.store is None:
            return
        request = PlannedRequest(key, ctx.nodeid, self._ordinals.pop(key, 0), ENDPOINT, body)
        ctx.store.save(
            request,
            raw,
            source="cassette" if ctx.cassette_replay else "live",
            replace=ctx.fresh_since is not None,
        )

    def _saver(self, key: str | None, body: dict[str, Any]) -> OnAnswer:
        return lambda raw: self._save(key, body, raw)

    def _finish(self, key: str | None, body: dict[str, Any], raw: Answer) -> Response:
        replayed = self.context is not None and self.context.cassette_replay
        before, limited = self._gave_up.pop(key, (0, 0)) if key is not None else (0, 0)
        response = Response.from_body(
            raw.body,
            request=body,
            latency=raw.latency,
            request_id=raw.headers.get("x-request-id"),
            # a cassette's answer was replayed, not requested: no request, no 429
            cached=replayed,
            attempts=0 if replayed else raw.attempts + before,
            rate_limited=0 if replayed else raw.rate_limited + limited,
            source="cassette" if replayed else "live",
            key=key,
        )
        self._notify(response)
        return response

    def _notify(self, response: Response) -> None:
        if self.context is not None and self.context.on_response is not None:
            self.context.on_response(response)

    def _stop_reason(self) -> str | None:
        ctx = self.context
        return ctx.stopped() if ctx is not None and ctx.stopped is not None else None

    def _check_stop(self) -> None:
        """Send nothing once the run stops (a fatal refusal in this or another process)."""
        reason = self._stop_reason()
        if reason is not None:
            raise LLMCallError(reason, attempts=0, fatal=True)

    def _with_gave_up(self, key: str | None, error: LLMCallError) -> LLMCallError:
        """A live call that failed too counts the attempts the prefetch made before."""
        before, limited = self._gave_up.pop(key, (0, 0)) if key is not None else (0, 0)
        error.attempts += before
        error.rate_limited += limited
        return error

    def _failed(self, error: LLMCallError) -> None:
        if self.context is not None and self.context.on_error is not None:
            self.context.on_error(error)

    # ----------------------------------------------------------------- sync
    def generate_response(self, prompt: PromptLike, **params: Any) -> Response:
        """Send one chat completion (or replay it) and return the :class:`Response`.

        ``params`` are the API's (``temperature``, ``n``, ``seed``, ``reasoning_effort``...).
        For a reasoning model (:func:`~pytest_llmbench.reasoning.is_reasoning_model`),
        ``max_tokens=N`` is sent as ``max_completion_tokens=N``: the API refuses
        ``max_tokens`` there, and N then bounds the hidden reasoning plus the answer.
        Raises :class:`LLMCallError` when the call fails for good.
        """
        body = self.build_request(prompt, params)
        key = self._key(body)
        cached = self._lookup(key)
        if cached is not None:
            self._notify(cached)
            return cached
        self._maybe_record([(key, body)])
        self._check_stop()
        try:
            raw = self.shared.send(body, self.stats, on_answer=self._saver(key, body))
        except LLMCallError as exc:
            self._failed(self._with_gave_up(key, exc))
            raise
        return self._finish(key, body, raw)

    # ----------------------------------------------------------------- async
    async def agenerate_response(self, prompt: PromptLike, **params: Any) -> Response:
        """The async twin of :meth:`generate_response`."""
        body = self.build_request(prompt, params)
        key = self._key(body)
        cached = self._lookup(key)
        if cached is not None:
            self._notify(cached)
            return cached
        self._maybe_record([(key, body)])
        self._check_stop()
        try:
            raw = await self.shared.asend(body, self.stats, on_answer=self._saver(key, body))
        except LLMCallError as exc:
            self._failed(self._with_gave_up(key, exc))
            raise
        return self._finish(key, body, raw)

    def batch_generate(
        self,
        prompts: Iterable[PromptLike],
        *,
        use_batch_api: bool | None = None,
        retry_live: bool | None = None,
        **params: Any,
    ) -> list[Response]:
        """Run many calls concurrently within the limits; results keep input order.

        A failed item comes back as a Response with ``ok`` False and ``error`` set; the
        others are unaffected.

        ``use_batch_api=True`` (default: ``config.batch.enabled``) sends them as one Batch
        API job instead, at half price, with a progress line on stderr: answers and the
        job's id are kept in ``config.run_dir``, so running the same script again after a
        crash resumes polling that job instead of submitting again, and asks nothing
        already answered. A line the API failed comes back with ``ok`` False, or with
        ``retry_live=True`` (default: ``config.batch.fallback == "live"``) is sent in real
        time. Inside a pytest test (the ``llm`` fixture) both are ignored: ``--batch-api``
        decides for the whole run, and already batches these calls.
        """
        if self.context is None and (
            self.config.batch.enabled if use_batch_api is None else use_batch_api
        ):
            backend = _BACKENDS.get("batch")
            if backend is None:
                raise ConfigError(NO_BATCH_BACKEND)
            live = self.config.batch.fallback == "live" if retry_live is None else retry_live
            return backend(self, [self.build_request(p, params) for p in prompts], retry_live=live)
        bodies = [self.build_request(p, params) for p in prompts]
        keys = [self._key(b) for b in bodies]
        results: list[Response | None] = [self._lookup(k) for k in keys]
        missing = [i for i, r in enumerate(results) if r is None]
        fetched = set(missing)
        self._maybe_record([(keys[i], bodies[i]) for i in missing])

        def answered(i: int, answer: Answer) -> None:
            self._save(keys[i], bodies[i], answer)
            results[i] = self._finish(keys[i], bodies[i], answer)

        def failed(i: int, error: LLMCallError) -> None:
            self.stats.add(bodies[i]["model"], errors=1)
            self._failed(error)
            results[i] = Response.failed(bodies[i], str(error), keys[i])

        if missing:
            self._check_stop()
            asyncio.run(self.arun(missing, lambda i: bodies[i], answered, failed))
            if any(results[i] is None for i in missing):  # left unsent: the run stopped
                raise RunStopped(self._stop_reason() or "the run is stopping")
        out = [r for r in results if r is not None]
        for i, r in enumerate(out):
            if i not in fetched:
                self._notify(r)
        return out

    async def arun(
        self,
        items: Iterable[T] | AsyncIterable[T],
        body: Callable[[T], dict[str, Any]],
        on_answer: Callable[[T, Answer], None],
        on_error: Callable[[T, LLMCallError], None],
        *,
        scope: Callable[[T], AbstractContextManager[None]] | None = None,
        stop: threading.Event | None = None,
        gate: Concurrency | None = None,
        prompt_tokens: Callable[[T], int | None] | None = None,
    ) -> None:
        """Send the request ``body(item)`` of every item concurrently, within the budget.

        The one concurrent path of the package (``batch_generate``, the prefetch, the
        cassette fetch stage): it owns one ``AsyncOpenAI`` for the run, keeps at most
        ``max_concurrency`` requests in flight, and with no limits configured sends the
        first request alone, so the budget learns the account's limits from its headers
        before the rest are paced (instead of a first unpaced wave meeting a wall of 429s).
        ``items`` may be an async iterable that is still growing (planning streams into
        fetching). ``on_answer(item, answer)`` runs the moment an answer arrives, before
        any bookkeeping (save it there); ``on_error(item, error)`` when a request failed
        for good. ``scope(item)`` wraps the sending of one item (cassettes file requests
        under their case with it). Once ``stop`` is set no new request starts (those in
        flight finish and are handed over as usual). ``gate`` is the limit on requests in
        flight (``concurrency.py``; by default an adaptive one up to ``max_concurrency``,
        or a fixed one with ``fixed_concurrency``); pass one to read what it settled on.
        ``prompt_tokens(item)``, when given, is the prompt's token count if already known
        (the plan counts it), None to count it here.
        """
        from .runner import Runner

        runner = Runner(
            self.shared, self.stats, body, on_answer, on_error, scope, stop, gate, prompt_tokens
        )
        await runner.run(items)

    def openai_client(self, *, timeout: float | None = None) -> openai.OpenAI:
        """The shared synchronous SDK client (SDK retries off), for the endpoints this
        client does not wrap (files, batches). Raises ConfigError without a key."""
        client = self.shared.sync_client()
        return client if timeout is None else client.with_options(timeout=timeout)

    def _maybe_record(self, pending: list[tuple[str | None, dict[str, Any]]]) -> None:
        ctx = self.context
        if ctx is None or ctx.record is None or not pending:
            return
        for key, body in pending:
            if key is not None:
                ctx.record(key, ctx.nodeid, self._ordinals.get(key, 0), ENDPOINT, body)
        raise LLMPending(f"{len(pending)} request(s) of {ctx.nodeid} are not answered yet")

    def usage(self) -> dict[str, Usage]:
        """Tokens used so far, per model."""
        return {m: s.usage for m, s in self.stats.by_model.items()}


__all__ = [
    "MISSING_KEY",
    "Answer",
    "BatchBackend",
    "CallContext",
    "ClientStats",
    "LLMClient",
    "ModelStats",
    "Response",
    "Usage",
    "estimate_tokens",
    "register_batch_backend",
]
