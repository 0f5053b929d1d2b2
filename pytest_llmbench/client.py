"""LLMClient and Response: one call path composed of store, budget, retry and the SDK.

A call goes: build the request body -> look it up in the response store -> (plan phase:
record it and stop the test) -> reserve from the shared budget -> send with the SDK
(its own retries off) -> feed headers back to the budget -> save the answer -> Response.
Retries (tenacity, policy in ``retry.py``) repeat the budget and send steps, so every
attempt counts against the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt

from .budget import Budget, RateLimitSnapshot, open_budget
from .config import LLMConfig
from .errors import ConfigError, LLMCallError, LLMPending
from .retry import BackoffPolicy, as_mapping, describe, is_retryable

if TYPE_CHECKING:
    import openai
    from aiolimiter import AsyncLimiter

    from .store import ResponseStore, StoredResponse

T = TypeVar("T")
ENDPOINT = "/v1/chat/completions"
MISSING_KEY = "no OpenAI API key: set OPENAI_API_KEY, or pass LLMConfig(api_key=...)"
Messages = Sequence[Mapping[str, Any]]
PromptLike = str | Messages


@dataclass(frozen=True)
class Usage:
    """Token counts of one response (or a sum of them)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
        )

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Usage:
        u = body.get("usage") or {}
        p, c = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
        return cls(p, c, int(u.get("total_tokens") or p + c))


@dataclass(frozen=True)
class Response:
    """One chat completion, live or replayed from the store.

    ``text`` is the first choice's content; ``choices`` every choice's. ``error`` is set
    (and ``ok`` False) only for items of :meth:`LLMClient.batch_generate` that failed.
    """

    text: str
    choices: tuple[str, ...]
    finish_reason: str | None
    usage: Usage
    latency: float
    model: str
    request_id: str | None
    params: dict[str, Any]
    cached: bool = False
    attempts: int = 1
    rate_limited: int = 0
    source: str = "live"
    key: str | None = None
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_body(
        cls,
        body: Mapping[str, Any],
        *,
        request: Mapping[str, Any],
        latency: float,
        request_id: str | None = None,
        cached: bool = False,
        attempts: int = 1,
        rate_limited: int = 0,
        source: str = "live",
        key: str | None = None,
    ) -> Response:
        choices = body.get("choices") or []
        texts = tuple(str((c.get("message") or {}).get("content") or "") for c in choices)
        params = {k: v for k, v in request.items() if k != "messages"}
        return cls(
            text=texts[0] if texts else "",
            choices=texts,
            finish_reason=(choices[0].get("finish_reason") if choices else None),
            usage=Usage.from_body(body),
            latency=latency,
            model=str(body.get("model") or request.get("model") or ""),
            request_id=request_id or body.get("_request_id"),
            params=params,
            cached=cached,
            attempts=attempts,
            rate_limited=rate_limited,
            source=source,
            key=key,
            raw=dict(body),
        )

    @classmethod
    def from_stored(cls, stored: StoredResponse, *, cached: bool = True) -> Response:
        """A stored answer. ``cached`` is False for answers fetched ahead by this very run
        (prefetch or Batch API), which then report the attempts it took to get them."""
        headers = stored.headers or {}
        return cls.from_body(
            stored.response,
            request=stored.request,
            latency=stored.latency_s,
            request_id=headers.get("x-request-id"),
            cached=cached,
            attempts=0 if cached else stored.attempts,
            rate_limited=0 if cached else stored.rate_limited,
            source=stored.source,
            key=stored.key,
        )

    @classmethod
    def failed(cls, request: Mapping[str, Any], error: str, key: str | None = None) -> Response:
        params = {k: v for k, v in request.items() if k != "messages"}
        return cls(
            "",
            (),
            None,
            Usage(),
            0.0,
            str(request.get("model", "")),
            None,
            params,
            key=key,
            error=error,
        )


@dataclass
class ModelStats:
    calls: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: int = 0
    cached: int = 0
    usage: Usage = Usage()


class ClientStats:
    """Counters summed per model, shared by every view of one client (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_model: dict[str, ModelStats] = {}

    def add(self, model: str, **deltas: Any) -> None:
        with self._lock:
            stats = self.by_model.setdefault(model, ModelStats())
            for name, value in deltas.items():
                setattr(stats, name, getattr(stats, name) + value)

    def total(self) -> ModelStats:
        with self._lock:
            out = ModelStats()
            for s in self.by_model.values():
                for name in ("calls", "requests", "retries", "rate_limited", "errors", "cached"):
                    setattr(out, name, getattr(out, name) + getattr(s, name))
                out.usage = out.usage + s.usage
            return out


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
    ordinal: int = 0

    def next_ordinal(self) -> int:
        self.ordinal += 1
        return self.ordinal - 1


def estimate_tokens(body: Mapping[str, Any], default_max_tokens: int) -> int:
    """Offline estimate of what a request counts toward TPM: ~chars/4 + per-message
    overhead + n x max_tokens. The real ``usage`` corrects it afterwards."""
    chars = 0
    messages = body.get("messages") or []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(p.get("text", ""))) for p in content if isinstance(p, Mapping))
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    return math.ceil(chars / 4) + 4 * len(messages) + 3 + int(body.get("n") or 1) * int(limit)


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
        self._shared: _Shared = _Shared(self.config, budget)

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
        view._shared = self._shared
        return view

    def close(self) -> None:
        self._shared.close()

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
        if stored is None:
            failure = ctx.store.failure(key)
            if (
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

    def _save(self, key: str | None, body: dict[str, Any], raw: _RawAnswer) -> None:
        ctx = self.context
        if key is None or ctx is None or ctx.store is None:
            return
        ctx.store.put(
            key,
            nodeid=ctx.nodeid,
            ordinal=self._ordinals.pop(key, 0),
            endpoint=ENDPOINT,
            request=body,
            response=raw.body,
            headers=raw.headers,
            latency_s=raw.latency,
            source="cassette" if ctx.cassette_replay else "live",
            replace=ctx.fresh_since is not None,
            attempts=raw.attempts,
            rate_limited=raw.rate_limited,
        )

    def _saver(self, key: str | None, body: dict[str, Any]) -> OnAnswer:
        return lambda raw: self._save(key, body, raw)

    def _finish(self, key: str | None, body: dict[str, Any], raw: _RawAnswer) -> Response:
        replayed = self.context is not None and self.context.cassette_replay
        response = Response.from_body(
            raw.body,
            request=body,
            latency=raw.latency,
            request_id=raw.headers.get("x-request-id"),
            # a cassette's answer was replayed, not requested: no request, no 429
            cached=replayed,
            attempts=0 if replayed else raw.attempts,
            rate_limited=0 if replayed else raw.rate_limited,
            source="cassette" if replayed else "live",
            key=key,
        )
        self._notify(response)
        return response

    def _notify(self, response: Response) -> None:
        if self.context is not None and self.context.on_response is not None:
            self.context.on_response(response)

    def _failed(self, error: LLMCallError) -> None:
        if self.context is not None and self.context.on_error is not None:
            self.context.on_error(error)

    # ----------------------------------------------------------------- sync
    def generate_response(self, prompt: PromptLike, **params: Any) -> Response:
        """Send one chat completion (or replay it) and return the :class:`Response`.

        Raises :class:`LLMCallError` when the call fails for good.
        """
        body = self.build_request(prompt, params)
        key = self._key(body)
        cached = self._lookup(key)
        if cached is not None:
            self._notify(cached)
            return cached
        self._maybe_record([(key, body)])
        try:
            raw = self._shared.send(body, self.stats, on_answer=self._saver(key, body))
        except LLMCallError as exc:
            self._failed(exc)
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
        try:
            raw = await self._shared.asend(body, self.stats, on_answer=self._saver(key, body))
        except LLMCallError as exc:
            self._failed(exc)
            raise
        return self._finish(key, body, raw)

    def batch_generate(self, prompts: Iterable[PromptLike], **params: Any) -> list[Response]:
        """Run many calls concurrently within the limits; results keep input order.

        A failed item comes back as a Response with ``ok`` False and ``error`` set; the
        others are unaffected.
        """
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
            asyncio.run(self.arun(missing, lambda i: bodies[i], answered, failed))
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
        under their case with it).
        """
        await _Runner(self, body, on_answer, on_error, scope).run(items)

    def openai_client(self, *, timeout: float | None = None) -> openai.OpenAI:
        """The shared synchronous SDK client (SDK retries off), for the endpoints this
        client does not wrap (files, batches). Raises ConfigError without a key."""
        client = self._shared.sync_client()
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


@dataclass
class Answer:
    """A raw answer as it arrived: the JSON body, the response headers, and what it took."""

    body: dict[str, Any]
    headers: dict[str, str]
    latency: float
    attempts: int
    rate_limited: int = 0


OnAnswer = Callable[[Answer], None]
_RawAnswer = Answer  # the name the attempt code uses


_END = object()  # the end of a runner's queue
SMOOTHING_S = 0.1  # the per-process smoother's window


def smoother(rpm: int | None) -> AsyncLimiter | None:
    """A per-process smoother on top of the shared budget: at most a tenth of a second's
    worth of requests start together (at least one). The shared budget grants a burst of
    up to ``burst_seconds`` of refill at once; without smoothing, a process would open
    all of those connections in the same millisecond, a spike for the server and for
    this event loop. It never lowers the rate: the window refills at the configured
    rate, which the shared budget enforces across processes anyway. aiolimiter's leaky
    bucket is the right tool here: in-process, async, bound to this run's event loop."""
    from aiolimiter import AsyncLimiter

    if rpm is None:
        return None
    per_second = rpm / 60.0
    size = max(1.0, per_second * SMOOTHING_S)
    return AsyncLimiter(size, size / per_second)


class _Runner(Generic[T]):
    """The state of one :meth:`LLMClient.arun`: queue, workers, slow start."""

    def __init__(
        self,
        client: LLMClient,
        body: Callable[[T], dict[str, Any]],
        on_answer: Callable[[T, Answer], None],
        on_error: Callable[[T, LLMCallError], None],
        scope: Callable[[T], AbstractContextManager[None]] | None,
    ) -> None:
        self.client = client
        self.body, self.on_answer, self.on_error, self.scope = body, on_answer, on_error, scope
        self.workers = client.config.max_concurrency
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.learned = asyncio.Event()  # set: the rest may go (limits known or learned)
        if client.config.rpm is not None or client.config.tpm is not None:
            self.learned.set()
        self.first_sent = False
        self.smoother = smoother(client.config.rpm)

    async def run(self, items: Iterable[T] | AsyncIterable[T]) -> None:
        import openai

        shared = self.client._shared
        aclient = openai.AsyncOpenAI(**shared.client_kwargs())
        try:
            workers = [self.work(aclient) for _ in range(self.workers)]
            await asyncio.gather(self.feed(items), *workers)
        finally:
            await aclient.close()

    async def feed(self, items: Iterable[T] | AsyncIterable[T]) -> None:
        try:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    self.queue.put_nowait(item)
            else:
                for item in items:
                    self.queue.put_nowait(item)
        finally:
            for _ in range(self.workers):
                self.queue.put_nowait(_END)

    async def work(self, aclient: openai.AsyncOpenAI) -> None:
        while (item := await self.queue.get()) is not _END:
            if not self.learned.is_set():
                if self.first_sent:
                    await self.learned.wait()
                self.first_sent = True  # this one goes alone
            try:
                await self.send(aclient, item)
            finally:
                self.learned.set()

    async def send(self, aclient: openai.AsyncOpenAI, item: T) -> None:
        shared, stats = self.client._shared, self.client.stats
        scope = self.scope(item) if self.scope is not None else contextlib.nullcontext()
        try:
            if self.smoother is not None:
                await self.smoother.acquire()
            with scope:
                await shared.asend(
                    self.body(item), stats, aclient, lambda a: self.on_answer(item, a)
                )
        except LLMCallError as exc:
            self.on_error(item, exc)


class _Shared:
    """What every view of one client shares: SDK clients, budgets, retry policy."""

    def __init__(self, config: LLMConfig, budget: Budget | None) -> None:
        self.config = config
        self._budgets: dict[str, Budget] = {}
        if budget is not None:
            self._budgets[config.model] = budget
        self._owns_budgets = budget is None
        self._lock = threading.Lock()
        self._sync: openai.OpenAI | None = None
        self.policy = BackoffPolicy(
            base=config.backoff_min, cap=config.backoff_max, max_retry_after=config.max_retry_after
        )

    # -- resources
    def client_kwargs(self) -> dict[str, Any]:
        if self.config.api_key is None:
            # never send a made-up key: the server's 401 would blame a key that was set
            raise ConfigError(MISSING_KEY)
        return {
            "api_key": self.config.api_key.get_secret_value(),
            "base_url": self.config.base_url,
            "organization": self.config.organization,
            "project": self.config.project,
            "timeout": self.config.timeout,
            "max_retries": 0,  # retries live in retry.py, so each one passes the budget
        }

    def sync_client(self) -> openai.OpenAI:
        with self._lock:
            if self._sync is None:
                import openai

                self._sync = openai.OpenAI(**self.client_kwargs())
            return self._sync

    def budget(self, model: str) -> Budget:
        with self._lock:
            b = self._budgets.get(model)
            if b is None:
                b = open_budget(
                    self.config.budget_url,
                    run_dir=self.config.run_dir,
                    key=model,
                    rpm=self.config.rpm,
                    tpm=self.config.tpm,
                    burst_seconds=self.config.burst_seconds,
                )
                self._budgets[model] = b
            return b

    def close(self) -> None:
        with self._lock:
            if self._sync is not None:
                self._sync.close()
                self._sync = None
            if self._owns_budgets:
                for b in self._budgets.values():
                    b.close()
                self._budgets.clear()

    # -- the attempt, shared by sync and async paths
    def _retrying_kwargs(self, est: int) -> dict[str, Any]:
        return {
            "stop": stop_after_attempt(self.config.max_retries + 1),
            "retry": retry_if_exception(is_retryable),
            "wait": self.policy.tenacity_wait(est),
            "reraise": True,
        }

    def _call(self, body: dict[str, Any], stats: ClientStats, on_answer: OnAnswer | None) -> _Call:
        model = str(body["model"])
        return _Call(
            self,
            model,
            estimate_tokens(body, self.config.max_tokens),
            self.budget(model),
            stats,
            on_answer,
        )

    def send(
        self, body: dict[str, Any], stats: ClientStats, on_answer: OnAnswer | None = None
    ) -> _RawAnswer:
        call = self._call(body, stats, on_answer)
        client = self.sync_client()
        try:
            for attempt in Retrying(**self._retrying_kwargs(call.est)):
                with attempt:
                    call.budget.acquire(call.begin())
                    call.sending()
                    try:
                        raw = client.chat.completions.with_raw_response.create(**body)
                    except Exception as exc:
                        call.failed(exc)
                        raise
                    return call.succeeded(raw.http_response)
        except Exception as exc:
            raise call.give_up(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def asend(
        self,
        body: dict[str, Any],
        stats: ClientStats,
        client: openai.AsyncOpenAI | None = None,
        on_answer: OnAnswer | None = None,
    ) -> _RawAnswer:
        """The async twin of :meth:`send`; the attempt logic lives in :class:`_Call`."""
        import openai

        call = self._call(body, stats, on_answer)
        own = client is None
        aclient = client or openai.AsyncOpenAI(**self.client_kwargs())
        try:
            async for attempt in AsyncRetrying(**self._retrying_kwargs(call.est)):
                with attempt:
                    await call.budget.aacquire(call.begin())
                    call.sending()
                    try:
                        raw = await aclient.chat.completions.with_raw_response.create(**body)
                    except Exception as exc:
                        call.failed(exc)
                        raise
                    return call.succeeded(raw.http_response)
        except Exception as exc:
            raise call.give_up(exc) from None
        finally:
            if own:
                await aclient.close()
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class _Call:
    """One logical call across its attempts: budget feedback, counters, the saved answer."""

    shared: _Shared
    model: str
    est: int
    budget: Budget
    stats: ClientStats
    on_answer: OnAnswer | None
    attempts: int = 0
    limited: int = 0
    started: float = 0.0

    def begin(self) -> int:
        """Count an attempt; returns the tokens to reserve for it."""
        self.attempts += 1
        return self.est

    def sending(self) -> None:
        """The budget let the attempt go: latency is measured from here."""
        self.started = time.perf_counter()

    def failed(self, exc: BaseException) -> None:
        """Feed a failed attempt back to the budget (a 429 pauses the whole pool)."""
        import openai

        headers = as_mapping(getattr(getattr(exc, "response", None), "headers", None))
        if headers:
            self.budget.observe(RateLimitSnapshot.from_headers(headers))
        self.stats.add(self.model, requests=1)
        if isinstance(exc, openai.RateLimitError):
            self.limited += 1
            self.stats.add(self.model, rate_limited=1)
            wait = self.shared.policy.server_wait(exc, self.est)
            if wait is not None and is_retryable(exc):
                self.budget.pause(min(wait, self.shared.config.max_retry_after))

    def succeeded(self, raw_http: Any) -> _RawAnswer:
        latency = time.perf_counter() - self.started
        headers = as_mapping(raw_http.headers)
        try:
            body = json.loads(raw_http.text)
            if not isinstance(body, dict) or "choices" not in body:
                raise ValueError("no choices")
        except ValueError as exc:
            self.budget.observe(RateLimitSnapshot.from_headers(headers))
            self.stats.add(self.model, requests=1)
            raise LLMCallError(
                f"the API answered 200 with a malformed body ({exc})", status=200, retryable=True
            ) from None
        answer = _RawAnswer(body, headers, latency, self.attempts, self.limited)
        if self.on_answer is not None:
            # saved before any bookkeeping: the window in which a crash loses a paid-for
            # answer is only the store's own fsync
            self.on_answer(answer)
        self.budget.observe(RateLimitSnapshot.from_headers(headers))
        usage = Usage.from_body(body)
        self.budget.correct(self.est, usage.total_tokens)
        self.stats.add(self.model, requests=1, calls=1, retries=self.attempts - 1, usage=usage)
        return answer

    def give_up(self, exc: BaseException) -> LLMCallError:
        self.stats.add(self.model, errors=1, retries=max(0, self.attempts - 1))
        error = _final(exc, self.model, self.attempts)
        error.rate_limited = self.limited
        return error


def _final(exc: BaseException, model: str, attempts: int) -> LLMCallError:
    if isinstance(exc, LLMCallError):
        exc.attempts = attempts
        return exc
    return describe(exc, model=model, attempts=attempts)


__all__ = [
    "CallContext",
    "ClientStats",
    "LLMClient",
    "ModelStats",
    "Response",
    "Usage",
    "estimate_tokens",
]
