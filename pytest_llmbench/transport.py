"""How one request travels: the attempts of one call (budget, SDK, retries, feedback); the
concurrent runner is ``runner.py``. Internal to the client layer: callers
use :class:`~pytest_llmbench.client.LLMClient`.

One call goes: reserve from the shared budget -> send with the SDK (its own retries off)
-> feed headers back to the budget -> hand the answer over (it is saved before any other
bookkeeping) -> correct the token estimate. Retries (tenacity, policy in ``retry.py``)
repeat the budget and send steps, so every attempt counts against the limit.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt

from .budget import Budget, RateLimitSnapshot, open_budget
from .config import LLMConfig
from .errors import ConfigError, LLMCallError, RunStopped
from .response import Answer, ClientStats, Usage, estimate_tokens
from .retry import BackoffPolicy, as_mapping, describe, is_retryable

if TYPE_CHECKING:
    import openai


def budget_for(config: LLMConfig, model: str) -> Budget:
    """The shared budget of ``model`` as ``config`` describes it (file, Redis or none)."""
    return open_budget(
        config.budget_url,
        run_dir=config.run_dir,
        key=model,
        rpm=config.rpm,
        tpm=config.tpm,
        burst_seconds=config.burst_seconds,
    )


MISSING_KEY = "no OpenAI API key: set OPENAI_API_KEY, or pass LLMConfig(api_key=...)"


OnAnswer = Callable[[Answer], None]


class Shared:
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

    # -- the attempt, shared by sync and async paths
    def _retrying_kwargs(self, est: int) -> dict[str, Any]:
        return {
            "stop": stop_after_attempt(self.config.max_retries + 1),
            "retry": retry_if_exception(is_retryable),
            "wait": self.policy.tenacity_wait(est),
            "reraise": True,
        }

    def _call(self, body: dict[str, Any], stats: ClientStats, on_answer: OnAnswer | None) -> Call:
        model = str(body["model"])
        return Call(
            self,
            model,
            estimate_tokens(body, self.config.max_tokens),
            self.budget(model),
            stats,
            on_answer,
        )

    def send(
        self, body: dict[str, Any], stats: ClientStats, on_answer: OnAnswer | None = None
    ) -> Answer:
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
        ready: Callable[[], None] | None = None,
    ) -> Answer:
        """The async twin of :meth:`send`; the attempt logic lives in :class:`Call`.
        ``ready()`` runs each time the budget lets an attempt go, just before it is sent;
        it may raise :class:`RunStopped` to keep the request unsent (the run stops)."""
        import openai

        call = self._call(body, stats, on_answer)
        own = client is None
        aclient = client or openai.AsyncOpenAI(**self.client_kwargs())
        try:
            async for attempt in AsyncRetrying(**self._retrying_kwargs(call.est)):
                with attempt:
                    await call.budget.aacquire(call.begin())
                    if ready is not None:
                        ready()
                    call.sending()
                    try:
                        raw = await aclient.chat.completions.with_raw_response.create(**body)
                    except Exception as exc:
                        call.failed(exc)
                        raise
                    return call.succeeded(raw.http_response)
        except RunStopped:
            raise
        except Exception as exc:
            raise call.give_up(exc) from None
        finally:
            if own:
                await aclient.close()
        raise AssertionError("unreachable")  # pragma: no cover


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

    def succeeded(self, raw_http: Any) -> Answer:
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
        answer = Answer(body, headers, latency, self.attempts, self.limited)
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
