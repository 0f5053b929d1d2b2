"""Real-time rate limits like OpenAI's: paced token buckets and the ``x-ratelimit-*`` headers.

Each model has a request bucket (RPM) and a token bucket (TPM). A bucket refills at
``limit / 60`` per second, lazily from the clock on each check (no background task, like
aiolimiter). Two views of one account:

* **Enforcement** uses a bucket whose capacity is ``burst_seconds`` of refill (at least 1),
  so a client that sends a minute's allowance at once is refused: OpenAI applies per-minute
  limits over short periods ("60,000 RPM may be enforced as 1,000 per second").
* **Headers** describe the per-minute window: a bucket of capacity ``limit`` with the same
  debits and refill. ``remaining`` is its level and ``reset`` the time until it is full
  again (a FULL reset, e.g. ``120ms`` after one request at 500 RPM), formatted like Go's
  ``time.Duration`` (``1s``, ``6m0s``, ``2m59.56s``).

A request is admitted when every bucket holds ``min(need, capacity)``; its full need is then
debited, possibly into debt, so a request larger than the burst capacity still passes when the
bucket is full and later requests wait for the debt to refill. A request that arrives up to
``tolerance`` seconds early is admitted into debt as well (GCRA's delay-variation tolerance):
a client pacing exactly at the limit is not refused for network jitter, while the debt keeps
the sustained rate at the limit. A request needing more tokens
than the whole TPM limit can never pass ("Request too large"). A limit of None means no
bucket and no headers for it (the API's headers are optional too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Literal

RATE_LIMIT_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."


def go_duration(seconds: float) -> str:
    """Format ``seconds`` like Go's ``time.Duration`` rounded up to the millisecond."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class Bucket:
    """One limit (RPM or TPM) of one model: a paced bucket and a per-minute view."""

    def __init__(
        self,
        limit: int,
        burst_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.rate = limit / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self._clock = clock
        self._ts = clock()
        self._level = self.capacity
        self._window = float(limit)

    def __repr__(self) -> str:
        return f"Bucket(limit={self.limit}, capacity={self.capacity:g}, level={self._level:g})"

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._ts)
        self._ts = now
        self._level = min(self.capacity, self._level + elapsed * self.rate)
        self._window = min(float(self.limit), self._window + elapsed * self.rate)

    def wait(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` would be admitted (0.0 = now)."""
        self._refill(now)
        need = min(amount, self.capacity)
        return 0.0 if self._level >= need - 1e-9 else (need - self._level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self._level -= amount
        self._window -= amount

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self._level = min(self.capacity, self._level + amount)
        self._window = min(float(self.limit), self._window + amount)

    def remaining(self, now: float) -> int:
        """What the per-minute window has left (``x-ratelimit-remaining-*``)."""
        self._refill(now)
        return max(0, math.floor(self._window + 1e-9))

    def reset_after(self, now: float) -> float:
        """Seconds until the per-minute window is full again (``x-ratelimit-reset-*``)."""
        self._refill(now)
        return max(0.0, (self.limit - self._window) / self.rate)


@dataclass
class Decision:
    """The outcome of :meth:`ModelLimits.admit`."""

    admitted: bool
    kind: Literal["requests", "tokens"] | None = None
    retry_after: float = 0.0
    too_large: bool = False
    limit: int = 0
    used: int = 0
    requested: int = 0


class ModelLimits:
    """The RPM and TPM buckets of one model."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        burst_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        tolerance: float = 0.0,
    ) -> None:
        self._clock = clock
        self.tolerance = tolerance
        self.requests = Bucket(rpm, burst_seconds, clock) if rpm else None
        self.tokens = Bucket(tpm, burst_seconds, clock) if tpm else None

    def admit(self, tokens: int) -> Decision:
        """Admit one request of ``tokens`` estimated tokens, or say why and for how long not."""
        now = self._clock()
        if self.tokens is not None and tokens > self.tokens.limit:
            return Decision(
                False, "tokens", too_large=True, limit=self.tokens.limit, requested=tokens
            )
        waits: list[tuple[float, Literal["requests", "tokens"], Bucket, int]] = []
        if self.requests is not None:
            waits.append((self.requests.wait(1, now), "requests", self.requests, 1))
        if self.tokens is not None:
            waits.append((self.tokens.wait(tokens, now), "tokens", self.tokens, tokens))
        blocked = [w for w in waits if w[0] > self.tolerance]
        if blocked:
            wait, kind, bucket, amount = max(blocked, key=lambda w: w[0])
            used = bucket.limit - bucket.remaining(now)
            return Decision(False, kind, wait, limit=bucket.limit, used=used, requested=amount)
        for _, _, bucket, amount in waits:
            bucket.take(amount, now)
        return Decision(True)

    def refund_tokens(self, amount: int) -> None:
        """Give back tokens reserved but not used (``tpm_refund_unused``)."""
        if self.tokens is not None and amount > 0:
            self.tokens.give_back(amount, self._clock())

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers for the current state (none for unlimited)."""
        now = self._clock()
        out: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            out[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining(now))
            out[f"x-ratelimit-reset-{name}"] = go_duration(bucket.reset_after(now))
        return out


def rate_limit_message(model: str, org: str, decision: Decision) -> str:
    """The API's 429 message for ``decision`` (a refused :class:`Decision`)."""
    if decision.too_large:
        return (
            f"Request too large for {model} in organization {org} on tokens per min (TPM): "
            f"Limit {decision.limit}, Requested {decision.requested}. The input or output "
            f"tokens must be reduced in order to run successfully. {RATE_LIMIT_DOCS}"
        )
    what = "requests per min (RPM)" if decision.kind == "requests" else "tokens per min (TPM)"
    return (
        f"Rate limit reached for {model} in organization {org} on {what}: "
        f"Limit {decision.limit}, Used {decision.used}, Requested {decision.requested}. "
        f"Please try again in {go_duration(decision.retry_after)}. {RATE_LIMIT_DOCS}"
    )


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``retry-after-ms`` (rounded up) and ``retry-after`` (whole seconds, rounded up)."""
    ms = max(1, math.ceil(seconds * 1000 - 1e-6))
    return {"retry-after-ms": str(ms), "retry-after": str(max(1, math.ceil(ms / 1000)))}


#: how a LiteLLM-style gateway passes on the upstream's retry and reset headers
GATEWAY_PREFIX = "llm_provider-"
GATEWAY_MOVED = (
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)


def adapt_headers(
    headers: MutableMapping[str, str], *, gateway: bool, rate_limit_headers: bool
) -> None:
    """Make a response's headers those of another kind of server, in place: without
    ``rate_limit_headers`` no ``x-ratelimit-*`` at all (llama.cpp's server); as a
    ``gateway`` the retry and reset headers only under ``llm_provider-`` (a LiteLLM proxy,
    which keeps ``x-ratelimit-limit-*`` and ``x-ratelimit-remaining-*`` as they are)."""
    if not rate_limit_headers:
        for name in [n for n in headers if n.lower().startswith("x-ratelimit-")]:
            del headers[name]
    if gateway:
        for name in GATEWAY_MOVED:
            value = headers.pop(name, None)
            if value is not None:
                headers[GATEWAY_PREFIX + name] = value
