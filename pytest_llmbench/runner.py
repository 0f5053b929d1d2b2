"""The concurrent runner behind :meth:`LLMClient.arun`: a queue of items, at most
``max_concurrency`` in flight (fewer while the adaptive limit of ``concurrency.py`` finds
that more would only queue at the server: the rule is in that module's docstring), slow
start while the limits are unknown, a per-process smoother, and a stop that lets what is
in flight finish (a fatal error, an interrupt).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterable, Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .budget import RateLimitSnapshot
from .concurrency import Concurrency, Slot
from .errors import LLMCallError, RunStopped
from .response import Answer, ClientStats
from .tokens import counts_exactly_now, estimate_prompt_tokens, warm_in_background
from .transport import Shared
from .wire import Sender

if TYPE_CHECKING:
    from aiolimiter import AsyncLimiter

T = TypeVar("T")

_END = object()  # the end of a runner's queue
SMOOTHING_S = 0.1  # the per-process smoother's window
SMOOTHER_PACE = 2.0  # the smoother's rate, in multiples of the configured rate


def smoother(rpm: int | None) -> AsyncLimiter | None:
    """A per-process smoother on top of the shared budget: at most a tenth of a second's
    worth of requests start together (at least one). The shared budget grants a burst of
    up to ``burst_seconds`` of refill at once; without smoothing, a process would open
    all of those connections in the same millisecond, a spike for the server and for
    this event loop. It never lowers the rate: the window refills at twice the configured
    rate, so a burst the budget grants (a full bucket at the start, what a pause saved)
    is spent within about a second instead of never; the shared budget enforces the rate
    itself, across processes. aiolimiter's leaky bucket is the right tool here:
    in-process, async, bound to this run's event loop."""
    from aiolimiter import AsyncLimiter

    if rpm is None:
        return None
    per_second = rpm / 60.0 * SMOOTHER_PACE
    size = max(1.0, rpm / 60.0 * SMOOTHING_S)
    return AsyncLimiter(size, size / per_second)


class Runner(Generic[T]):
    """The state of one :meth:`LLMClient.arun`: queue, workers, slow start, and the stop:
    once ``stop`` is set no new request starts, and those in flight finish."""

    def __init__(
        self,
        shared: Shared,
        stats: ClientStats,
        body: Callable[[T], dict[str, Any]],
        on_answer: Callable[[T, Answer], None],
        on_error: Callable[[T, LLMCallError], None],
        scope: Callable[[T], AbstractContextManager[None]] | None,
        stop: threading.Event | None = None,
        gate: Concurrency | None = None,
        prompt: Callable[[T], int | None] | None = None,
    ) -> None:
        self.shared, self.stats = shared, stats
        self.prompt = prompt
        self.stop = stop or threading.Event()
        config = shared.config
        self.body, self.on_answer, self.on_error, self.scope = body, on_answer, on_error, scope
        self.workers = config.max_concurrency
        adaptive = not config.fixed_concurrency
        self.gate = gate or Concurrency(config.max_concurrency, adaptive=adaptive)
        if config.rpm is not None:
            self.gate.rate_limit(config.rpm)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.learned = asyncio.Event()  # set: the rest may go (limits known or learned)
        if config.rpm is not None or config.tpm is not None:
            self.learned.set()
        self.first_sent = False
        self.smoother = smoother(config.rpm)

    async def run(self, items: Iterable[T] | AsyncIterable[T]) -> None:
        # cassettes (a scope per item) record the SDK's httpx2 traffic: SDK only
        aclient = self.shared.sender(sdk_only=self.scope is not None)
        try:
            workers = [self.work(aclient) for _ in range(self.workers)]
            await asyncio.gather(self.feed(items), *workers)
        finally:
            self.shared.flush_budgets()
            await aclient.close()

    async def feed(self, items: Iterable[T] | AsyncIterable[T]) -> None:
        try:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    if self.stop.is_set():
                        break
                    self.queue.put_nowait(item)
            else:
                for item in items:
                    self.queue.put_nowait(item)
        finally:
            for _ in range(self.workers):
                self.queue.put_nowait(_END)

    async def work(self, aclient: Sender) -> None:
        while (item := await self.queue.get()) is not _END:
            if self.stop.is_set():
                continue  # stopping: what is queued is not sent
            if not self.learned.is_set():
                if self.first_sent:
                    await self.learned.wait()
                self.first_sent = True  # this one goes alone
            # a slot is held from before the budget's wait: a wait there shows the gate
            # that the budget, not the number in flight, paces the run
            held = Held(self.gate, self.stop, await self.gate.acquire())
            latency: float | None = None
            try:
                latency = await self.send(aclient, item, held)
            finally:
                held.release(latency)
                self.learned.set()

    async def send(self, aclient: Sender, item: T, held: Held) -> float | None:
        """Send one item; returns its answer's latency, for the gate (None: no answer, or
        one that took retries, whose latency is its last attempt's alone)."""
        shared, stats = self.shared, self.stats
        scope = self.scope(item) if self.scope is not None else contextlib.nullcontext()
        try:
            if self.smoother is not None:
                await self.smoother.acquire()
            if self.stop.is_set():
                return None
            body = self.body(item)
            with scope:
                answer = await shared.asend(
                    body,
                    stats,
                    aclient,
                    lambda a: self.on_answer(item, a),
                    held,
                    prompt=self.prompt_tokens(item, body),
                )
        except RunStopped:
            return None  # not sent: the run stops
        except LLMCallError as exc:
            self.on_error(item, exc)
            return None
        # the token encoding loads from the first answer on (once), not while the first
        # requests go out: until it has, the budget's counts are estimates
        warm_in_background(body.get("model"))
        if self.gate.wants_rate:  # the first answers teach the server's limit, if any
            limit = RateLimitSnapshot.from_headers(answer.headers).limit_requests
            if limit:
                self.gate.rate_limit(limit)
        return answer.latency if answer.attempts == 1 else None

    def prompt_tokens(self, item: T, body: dict[str, Any]) -> int | None:
        """The prompt's count for the budget: the plan's; else, until the token encoding
        has loaded (in the background, from the first answer on: 0.2-0.7 s of CPU that
        would hold up the first requests), the estimate; else None, counted exactly when
        sent. A cost cap always counts exactly (its limit is money)."""
        prompt = None if self.prompt is None else self.prompt(item)
        if prompt is not None or self.shared.cost_cap is not None:
            return prompt
        if counts_exactly_now(body.get("model")):
            return None
        return estimate_prompt_tokens(body.get("messages") or [])


class Held:
    """One request's slot under the run's concurrency gate, across its attempts (the
    :class:`~.transport.Attempts` of a concurrent run). A 429 while no rate limit is
    known halves the gate's limit (``Concurrency.refused``); the attempts of the requests
    already in flight above the new limit then give their slots up and queue for one
    again, first come first served, instead of all trying again together after the
    server's ``retry-after``, each time a herd of which one or two get through."""

    def __init__(self, gate: Concurrency, stop: threading.Event, slot: Slot) -> None:
        self.gate, self.stop = gate, stop
        self.slot: Slot | None = slot

    async def again(self) -> None:
        gate = self.gate
        if self.slot is not None and gate.in_flight <= gate.limit:
            return
        self.release(None)
        self.slot = await gate.acquire()

    def ready(self) -> None:
        """Called once the budget lets a request go: a stop meanwhile keeps it unsent."""
        if self.stop.is_set():
            raise RunStopped("the run is stopping")
        if self.slot is not None:
            self.gate.sent(self.slot)

    def refused(self) -> None:
        if self.slot is not None:
            self.gate.refused(self.slot)

    def release(self, latency: float | None) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            self.gate.release(slot, latency)
