"""How one request travels: the attempts of one call (budget, SDK, retries, feedback); the
concurrent runner is ``runner.py``. Internal to the client layer: callers
use :class:`~pytest_llmbench.client.LLMClient`.

One call goes: reserve from the shared budget -> send (``wire.py``: aiohttp for the
concurrent fetch's plain bodies, the SDK with its own retries off for the rest) -> hand
the answer over (it is saved before any other bookkeeping) -> feed the headers and the
real token count back to the budget. Retries (tenacity, policy in ``retry.py``) repeat
the budget and send steps, so every attempt counts against the limit.

The per-request CPU is kept down (``benchmarks/cpu_ceiling.py``):

* the senders of ``wire.py`` (aiohttp without the SDK's objects for what ``create()``
  would send unchanged; the SDK's lower-level ``post()`` or ``create()`` otherwise);
* the first attempt runs without tenacity; only a failure that is retried builds the
  retry loop, which continues the attempt count (waits, stop) exactly where it left off;
* the budget's feedback after an answer is one operation (``settle``), and in a
  concurrent run part of the next reservation (``settle_later``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt

from .budget import BaseBudget, Budget, RateLimitSnapshot, Ticket, open_budget
from .config import LLMConfig
from .errors import MISSING_KEY, ConfigError, LLMCallError, RunStopped, StoreError
from .response import Answer, ClientStats, Usage, estimate_tokens
from .retry import BackoffPolicy, as_mapping, describe, is_retryable
from .tokens import request_prompt_tokens
from .wire import _OPTIONS, Sender, _http_response, make_sender, plain_body

if TYPE_CHECKING:
    import openai

    from .spend import CostCap


def budget_for(config: LLMConfig, model: str) -> Budget:
    """The shared budget of ``model`` as ``config`` describes it (file, Redis or none)."""
    return open_budget(
        config.budget_url,
        run_dir=config.run_dir,
        key=model,
        rpm=config.rpm,
        tpm=config.tpm,
        burst_seconds=config.burst_seconds,
        opening_burst=config.opening_burst,
    )


OnAnswer = Callable[[Answer], None]


class Attempts(Protocol):
    """What a concurrent run (``runner.py``) hears of one call's attempts: its place
    under the run's concurrency limit is held across them."""

    async def again(self) -> None:
        """Before each attempt after the first (the place may be given up and queued
        for again, when the limit has come down meanwhile)."""

    def ready(self) -> None:
        """The budget lets an attempt go; may raise :class:`RunStopped` to keep it
        unsent (the run stops)."""

    def refused(self) -> None:
        """The attempt got a 429 that is retried."""


class Shared:
    """What every view of one client shares: SDK clients, budgets, retry policy."""

    def __init__(self, config: LLMConfig, budget: Budget | None) -> None:
        self.config = config
        self._budgets: dict[str, Budget] = {}
        if budget is not None:
            self._budgets[config.model] = budget
        self._owns_budgets = budget is None
        self.cost_cap: CostCap | None = None  # --llm-max-cost (spend.py), set by the plugin
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

    def sender(self, *, sdk_only: bool = False) -> Sender:
        """A sender for one event loop's requests (``wire.py``); the caller closes it."""
        return make_sender(self.config, self.client_kwargs(), sdk_only=sdk_only)

    def flush_budgets(self) -> None:
        """Write the budgets' deferred settlements (the end of a concurrent run)."""
        with self._lock:
            budgets = list(self._budgets.values())
        for b in budgets:
            if isinstance(b, BaseBudget):
                b.flush()

    def budget(self, model: str) -> Budget:
        with self._lock:
            b = self._budgets.get(model)
            if b is None:
                b = budget_for(self.config, model)
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

    # -- the attempts, shared by sync and async paths
    def _retrying_kwargs(self, est: int) -> dict[str, Any]:
        """tenacity's settings for the attempts after the first (tenacity's attempt 1 is
        the call's attempt 2): the stop, the retry test and the waits of one call."""
        return {
            "stop": stop_after_attempt(self.config.max_retries),
            "retry": retry_if_exception(is_retryable),
            "wait": self.policy.tenacity_wait(est, first_attempt=2),
            "reraise": True,
        }

    def _first_retry(self, call: Call, exc: Exception) -> float:
        """What tenacity decides after a failed first attempt, without building it: raise
        ``exc`` again unless it is retried, else the wait before the second attempt."""
        if not is_retryable(exc):
            raise exc
        wait = self.policy.wait(exc, 1, call.est)  # tenacity computes it before stopping
        if self.config.max_retries < 1:
            raise exc
        return wait

    def _call(
        self,
        body: dict[str, Any],
        stats: ClientStats,
        on_answer: OnAnswer | None,
        prompt: int | None = None,
    ) -> Call:
        model = str(body["model"])
        if prompt is None:  # counted once: the budget's and the cap's
            prompt = request_prompt_tokens(body)
        return Call(
            self,
            model,
            estimate_tokens(body, self.config.max_tokens, prompt),
            self.budget(model),
            stats,
            on_answer,
            cap=self.cost_cap,
            prompt=prompt,
        )

    def send(
        self, body: dict[str, Any], stats: ClientStats, on_answer: OnAnswer | None = None
    ) -> Answer:
        call = self._call(body, stats, on_answer)
        client = self.sync_client()
        if call.cap is not None:
            # may stop the run (RunStopped): then it is not sent
            call.cost = call.cap.reserve(body, call.prompt)
        try:
            try:
                return self._attempt(call, body, client)
            except Exception as exc:
                wait = self._first_retry(call, exc)
            time.sleep(wait)
            for attempt in Retrying(**self._retrying_kwargs(call.est)):
                with attempt:
                    return self._attempt(call, body, client)
        except Exception as exc:
            raise call.give_up(exc) from None
        finally:
            call.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(self, call: Call, body: dict[str, Any], client: openai.OpenAI) -> Answer:
        call.ticket = acquire(call.budget, call.begin())
        call.sending()
        try:
            if plain_body(body):
                raw = client.post(
                    "/chat/completions", body=body, cast_to=_http_response(), options=_OPTIONS
                )
            else:
                raw = client.chat.completions.with_raw_response.create(**body).http_response
        except Exception as exc:
            call.failed(exc)
            raise
        return call.succeeded(raw)

    async def asend(
        self,
        body: dict[str, Any],
        stats: ClientStats,
        client: Sender | None = None,
        on_answer: OnAnswer | None = None,
        hooks: Attempts | None = None,
        *,
        prompt: int | None = None,
    ) -> Answer:
        """The async twin of :meth:`send`; the attempt logic lives in :class:`Call`.
        ``hooks`` (a concurrent run's) hear of each attempt: see :class:`Attempts`.
        ``prompt``: the prompt's tokens when already counted (the plan counts them)."""
        call = self._call(body, stats, on_answer, prompt)
        if call.cap is not None:
            # may stop the run (RunStopped): then it is not sent
            call.cost = await call.cap.areserve(body, call.prompt)
        own = client is None
        aclient = client or self.sender(sdk_only=True)  # a lone call: as the SDK sends it
        call.later = not own  # a concurrent run: its next request settles this one
        try:
            try:
                return await self._aattempt(call, body, aclient, hooks)
            except Exception as exc:
                wait = self._first_retry(call, exc)
            await asyncio.sleep(wait)
            async for attempt in AsyncRetrying(**self._retrying_kwargs(call.est)):
                with attempt:
                    return await self._aattempt(call, body, aclient, hooks)
        except RunStopped:
            raise
        except Exception as exc:
            raise call.give_up(exc) from None
        finally:
            call.release()
            if own:
                await aclient.close()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _aattempt(
        self,
        call: Call,
        body: dict[str, Any],
        aclient: Sender,
        hooks: Attempts | None,
    ) -> Answer:
        if hooks is not None and call.attempts:
            await hooks.again()
        call.ticket = await aacquire(call.budget, call.begin())
        if hooks is not None:
            hooks.ready()
        call.sending()
        try:
            raw = await aclient.send_chat(body)
        except Exception as exc:
            if call.failed(exc) and hooks is not None:
                hooks.refused()
            raise
        return call.succeeded(raw)


def acquire(budget: Budget, tokens: int) -> Ticket | None:
    """Reserve ``tokens`` and wait for them; the reservation's ticket, when the budget
    gives one (it goes back with the answer's headers, for the opening burst)."""
    if isinstance(budget, BaseBudget):
        return budget.acquire_ticket(tokens)[1]
    budget.acquire(tokens)  # a budget of the caller's own making: no ticket
    return None


async def aacquire(budget: Budget, tokens: int) -> Ticket | None:
    """The async twin of :func:`acquire`."""
    if isinstance(budget, BaseBudget):
        return (await budget.aacquire_ticket(tokens))[1]
    await budget.aacquire(tokens)
    return None


def settle(
    budget: Budget, snapshot: RateLimitSnapshot, reserved: int, actual: int, *, later: bool
) -> None:
    """An answer's feedback to the budget: its headers, then the real token count (one
    operation where the budget offers it; with ``later``, as part of the next one)."""
    if isinstance(budget, BaseBudget):
        if later:
            budget.settle_later(snapshot, reserved, actual)
        else:
            budget.settle(snapshot, reserved, actual)
    else:  # a budget of the caller's own making: the protocol's two calls
        budget.observe(snapshot)
        budget.correct(reserved, actual)


@dataclass
class Call:
    """One logical call across its attempts: budget feedback, counters, the saved answer."""

    shared: Shared
    model: str
    est: int
    budget: Budget
    stats: ClientStats
    on_answer: OnAnswer | None
    attempts: int = 0
    limited: int = 0
    started: float = 0.0
    cap: CostCap | None = None
    cost: float = 0.0  # USD reserved under the cost cap until the answer settles it
    prompt: int = 0  # prompt tokens, counted as the API counts them (tokens.py)
    ticket: Ticket | None = None  # the budget's ticket for the attempt in flight
    later: bool = False  # settle with the next reservation (a concurrent run flushes at its end)

    def begin(self) -> int:
        """Count an attempt; returns the tokens to reserve for it."""
        self.attempts += 1
        return self.est

    def sending(self) -> None:
        """The budget let the attempt go: latency is measured from here."""
        self.started = time.perf_counter()

    def failed(self, exc: BaseException) -> bool:
        """Feed a failed attempt back to the budget (a 429 pauses the whole pool); True
        for a 429 that is retried."""
        import openai

        headers = as_mapping(getattr(getattr(exc, "response", None), "headers", None))
        if headers:
            self.budget.observe(RateLimitSnapshot.from_headers(headers, self.ticket))
        self.stats.add(self.model, requests=1)
        if not isinstance(exc, openai.RateLimitError):
            return False
        self.limited += 1
        self.stats.add(self.model, rate_limited=1)
        if not is_retryable(exc):
            return False
        wait = self.shared.policy.server_wait(exc, self.est)
        if wait is not None:
            self.budget.pause(min(wait, self.shared.config.max_retry_after))
        return True

    def succeeded(self, raw_http: Any) -> Answer:
        latency = time.perf_counter() - self.started
        headers = as_mapping(raw_http.headers)
        try:
            body = json.loads(raw_http.text)
            if not isinstance(body, dict) or "choices" not in body:
                raise ValueError("no choices")
        except ValueError as exc:
            self.budget.observe(RateLimitSnapshot.from_headers(headers, self.ticket))
            self.stats.add(self.model, requests=1)
            raise LLMCallError(
                f"the API answered 200 with a malformed body ({exc})", status=200, retryable=True
            ) from None
        sent = getattr(raw_http, "request_text", None)  # WireAnswer's; httpx2's has none
        answer = Answer(body, headers, latency, self.attempts, self.limited, raw_http.text, sent)
        if self.on_answer is not None:
            # saved before any bookkeeping: the window in which a crash loses a paid-for
            # answer is only the store's own fsync
            try:
                self.on_answer(answer)
            except StoreError as exc:
                # a full disk, a read-only or broken store: every later answer would be
                # paid for and lost the same way, so the run stops here
                raise LLMCallError(f"cannot save answers: {exc}", status=200, fatal=True) from None
        usage = Usage.from_body(body)
        if self.cap is not None:
            self.cap.settle(self.cost, self.model, body.get("usage") or {})
            self.cost = 0.0
        snapshot = RateLimitSnapshot.from_headers(headers, self.ticket, lowered=True)
        settle(self.budget, snapshot, self.est, usage.total_tokens, later=self.later)
        self.stats.add(self.model, requests=1, calls=1, retries=self.attempts - 1, usage=usage)
        return answer

    def release(self) -> None:
        """A call that ended unanswered (refused, failed, not sent) costs nothing."""
        if self.cap is not None and self.cost:
            cost, self.cost = self.cost, 0.0
            self.cap.release(cost)

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
