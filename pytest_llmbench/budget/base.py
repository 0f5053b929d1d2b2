"""The budget's contract, header parsing, and the one token-bucket algorithm.

Two buckets per model, requests and tokens, each refilled continuously at ``limit / 60``
per second up to a capacity (the burst cap). ``reserve`` takes 1 request and the
estimated tokens at once and may drive a level below zero (debt); the caller then sleeps
``-level / rate`` outside any lock. That is GCRA in closed form: no polling, no
thundering herd, and a process that dies after reserving has merely used capacity.

The algorithm is a set of functions on :class:`BudgetState` so the file budget, the
in-memory budget and the tests share it; ``redis.py`` carries a Lua copy of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import BudgetError

Clock = Callable[[], float]
Sleep = Callable[[float], None]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_URL_PASSWORD = re.compile(r"(?P<head>//[^/@:]*:)[^/@]*@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)[^&]*", re.IGNORECASE)


def parse_duration(text: str | None) -> float | None:
    """Seconds in a Go-style duration (``1s``, ``6m0s``, ``12ms``, ``2m59.56s``), else None."""
    if text is None:
        return None
    text = text.strip()
    try:
        return _non_negative(float(text))  # a bare number of seconds
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


def _non_negative(value: float) -> float | None:
    return value if math.isfinite(value) and value >= 0 else None


def _count(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = _non_negative(float(text.strip()))
    except ValueError:
        return None
    return None if value is None else int(value)


def _least(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``redis://:***@host:6379/0``)."""
    url = _URL_PASSWORD.sub(r"\g<head>***@", url)
    return _QUERY_PASSWORD.sub(r"\g<head>***", url)


@dataclass(frozen=True)
class RateLimitSnapshot:
    """What one response's ``x-ratelimit-*`` headers said; a field is None when absent."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimitSnapshot:
        """Parse the headers; missing or garbage values become None, never an exception.

        When a project token limit is reported too, the more restrictive one wins.
        """
        h = {str(k).lower(): str(v) for k, v in headers.items()}
        p = "x-ratelimit-"

        def tokens(kind: str, parse: Callable[[str | None], float | None]) -> float | None:
            account = parse(h.get(f"{p}{kind}-tokens"))
            project = parse(h.get(f"{p}{kind}-project-tokens"))
            if kind == "reset":  # the more restrictive reset is the later one
                return account if project is None else max(project, account or 0.0)
            return _least(account, project)

        limit_t, remaining_t = tokens("limit", _count), tokens("remaining", _count)
        return cls(
            limit_requests=_count(h.get(f"{p}limit-requests")),
            remaining_requests=_count(h.get(f"{p}remaining-requests")),
            reset_requests_s=parse_duration(h.get(f"{p}reset-requests")),
            limit_tokens=None if limit_t is None else int(limit_t),
            remaining_tokens=None if remaining_t is None else int(remaining_t),
            reset_tokens_s=tokens("reset", parse_duration),
        )


@dataclass(frozen=True)
class Limits:
    """One process's configuration: per-minute limits (None = unknown) and the burst cap."""

    rpm: float | None = None
    tpm: float | None = None
    burst_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise BudgetError(f"{name} must be a positive number or None, not {value!r}")
        if not (math.isfinite(self.burst_seconds) and self.burst_seconds > 0):
            raise BudgetError(f"burst_seconds must be positive, not {self.burst_seconds!r}")


@dataclass
class BudgetState:
    """The shared state, identical in the JSON file and the Redis hash.

    A level of None means "full" (fresh state, or no limit known for that bucket).
    ``*_server_limit`` is the last ``x-ratelimit-limit-*`` seen; the limit in force is
    the lower of it and the configured one. Times are wall-clock seconds.
    """

    ts: float = 0.0
    paused_until: float = 0.0
    peak_tokens: float = 0.0
    requests_level: float | None = None
    requests_server_limit: float | None = None
    tokens_level: float | None = None
    tokens_server_limit: float | None = None

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> BudgetState:
        """Build from stored fields; a missing or invalid field takes its fresh value."""
        state = cls()
        for name in STATE_FIELDS:
            raw = data.get(name)
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str, bytes)):
                continue
            try:
                value = float(raw)
            except ValueError:
                continue
            if math.isfinite(value):
                setattr(state, name, value)
        return state

    def to_fields(self) -> dict[str, float | None]:
        # not dataclasses.asdict, which deep-copies: every field is a number or None
        return {name: getattr(self, name) for name in STATE_FIELDS}


STATE_FIELDS = tuple(f.name for f in dataclasses.fields(BudgetState))


# ---------------------------------------------------------------------------------------
# The algorithm. Every function mutates ``state`` and takes ``now`` explicitly.
# ``redis.py`` mirrors these lines in Lua; change both together.


def limits_in_force(state: BudgetState, limits: Limits) -> tuple[float | None, float | None]:
    """(requests, tokens) per minute now: the configured limit, lowered by the server's."""
    return (
        _least(limits.rpm, state.requests_server_limit),
        _least(limits.tpm, state.tokens_server_limit),
    )


def capacity(state: BudgetState, limits: Limits, limit: float, *, tokens: bool) -> float:
    """Burst cap: ``burst_seconds`` of refill, but at least 1 request / the largest reservation."""
    floor = max(1.0, state.peak_tokens) if tokens else 1.0
    return max(limit / 60.0 * limits.burst_seconds, floor)


def _refill(state: BudgetState, limits: Limits, now: float) -> None:
    elapsed = now - state.ts
    if elapsed < 0:  # the wall clock stepped back: credit nothing, keep a pause's length
        state.paused_until += elapsed
        state.ts = now
    # paused time earns nothing, so a pause does not bank a burst for when it ends
    credit = max(0.0, now - max(state.ts, state.paused_until))
    rpm, tpm = limits_in_force(state, limits)
    state.requests_level = _bucket(
        state, limits, state.requests_level, rpm, tokens=False, credit=credit
    )
    state.tokens_level = _bucket(state, limits, state.tokens_level, tpm, tokens=True, credit=credit)
    state.ts = now


def _bucket(
    state: BudgetState,
    limits: Limits,
    level: float | None,
    limit: float | None,
    *,
    tokens: bool,
    credit: float = 0.0,
    ceiling: float | None = None,
) -> float | None:
    """A bucket's level refilled for ``credit`` seconds, capped, and at most ``ceiling``."""
    if limit is None:
        return None
    cap = capacity(state, limits, limit, tokens=tokens)
    level = cap if level is None else min(cap, level + credit * limit / 60.0)
    return level if ceiling is None else min(level, float(ceiling))


def wait_time(state: BudgetState, limits: Limits, now: float) -> float:
    """Seconds until the reservations already made are covered and any pause is over."""
    debt = 0.0
    rpm, tpm = limits_in_force(state, limits)
    for level, limit in ((state.requests_level, rpm), (state.tokens_level, tpm)):
        if limit is not None and level is not None and level < 0:
            debt = max(debt, -level / (limit / 60.0))
    return max(0.0, state.paused_until - now) + debt


def reserve(state: BudgetState, limits: Limits, tokens: int, now: float) -> float:
    """Take 1 request and ``tokens``; return the seconds to wait before sending.

    Raises BudgetError, leaving ``state`` untouched, when ``tokens`` exceeds the token
    limit per minute: such a request can never succeed. Anything smaller is allowed to
    go into debt, so a reservation above the burst cap waits but never deadlocks.
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, not {tokens}")
    tpm = limits_in_force(state, limits)[1]
    if tpm is not None and tokens > tpm:
        raise BudgetError(
            f"a request of {tokens} tokens can never fit the limit of {tpm:g} tokens per minute"
        )
    state.peak_tokens = max(state.peak_tokens, float(tokens))
    _refill(state, limits, now)
    if state.requests_level is not None:
        state.requests_level -= 1.0
    if state.tokens_level is not None:
        state.tokens_level -= float(tokens)
    return wait_time(state, limits, now)


def correct(state: BudgetState, limits: Limits, reserved: int, actual: int, now: float) -> None:
    """Give back (or take more of) the tokens once the real usage is known."""
    _refill(state, limits, now)
    tpm = limits_in_force(state, limits)[1]
    if tpm is not None and state.tokens_level is not None:
        cap = capacity(state, limits, tpm, tokens=True)
        state.tokens_level = min(cap, state.tokens_level + float(reserved) - float(actual))


def observe(state: BudgetState, limits: Limits, snap: RateLimitSnapshot, now: float) -> None:
    """Adopt the server's view.

    A reported limit replaces the learned one (so a limit below the configured one rules
    every process, and an unconfigured budget learns its limit); a reported ``remaining``
    below our level lowers the level, since the server will refuse what it lacks.
    """
    _refill(state, limits, now)
    if snap.limit_requests:
        state.requests_server_limit = float(snap.limit_requests)
    if snap.limit_tokens:
        state.tokens_server_limit = float(snap.limit_tokens)
    rpm, tpm = limits_in_force(state, limits)
    # credit 0: the level is only re-capped (a lower limit has a smaller cap), then clamped
    state.requests_level = _bucket(
        state, limits, state.requests_level, rpm, tokens=False, ceiling=snap.remaining_requests
    )
    state.tokens_level = _bucket(
        state, limits, state.tokens_level, tpm, tokens=True, ceiling=snap.remaining_tokens
    )


def learned(state: BudgetState) -> bool:
    """Whether a server has reported a limit (``x-ratelimit-limit-*``) to this budget; a
    server without those headers leaves an unconfigured budget unlimited."""
    return state.requests_server_limit is not None or state.tokens_server_limit is not None


def pause(state: BudgetState, limits: Limits, seconds: float, now: float) -> None:
    """Stop every process until ``now + seconds`` and drop any banked burst (after a 429)."""
    _refill(state, limits, now)
    state.paused_until = max(state.paused_until, now + max(0.0, seconds))
    if state.requests_level is not None:
        state.requests_level = min(state.requests_level, 0.0)
    if state.tokens_level is not None:
        state.tokens_level = min(state.tokens_level, 0.0)


# ---------------------------------------------------------------------------------------
# The contract and the small budgets.


@runtime_checkable
class Budget(Protocol):
    """A rate-limit budget shared by every process of a run (see ``open_budget``)."""

    def reserve(self, tokens: int) -> float: ...
    def acquire(self, tokens: int) -> float: ...
    async def aacquire(self, tokens: int) -> float: ...
    def correct(self, reserved_tokens: int, actual_tokens: int) -> None: ...
    def observe(self, snapshot: RateLimitSnapshot) -> None: ...
    def pause(self, seconds: float) -> None: ...
    def close(self) -> None: ...


class BaseBudget:
    """``acquire``/``aacquire`` on top of a subclass's ``reserve``; sleeping outside locks."""

    def __init__(self, *, sleep: Sleep = time.sleep) -> None:
        self._sleep = sleep

    def reserve(self, tokens: int) -> float:
        raise NotImplementedError

    def acquire(self, tokens: int) -> float:
        """Reserve, then sleep the computed wait; return the seconds waited."""
        wait = self.reserve(tokens)
        if wait > 0:
            self._sleep(wait)
        return wait

    async def aacquire(self, tokens: int) -> float:
        """Like ``acquire`` without blocking the event loop (the lock is taken in a thread)."""
        wait = await asyncio.to_thread(self.reserve, tokens)
        if wait > 0:
            await asyncio.sleep(wait)
        return wait

    def settle(self, snapshot: RateLimitSnapshot, reserved_tokens: int, actual_tokens: int) -> None:
        """An answer's feedback: ``observe(snapshot)``, then ``correct(reserved, actual)``
        (a backend may do both in one operation)."""
        self.observe(snapshot)
        self.correct(reserved_tokens, actual_tokens)

    def observe(self, snapshot: RateLimitSnapshot) -> None:
        raise NotImplementedError

    def correct(self, reserved_tokens: int, actual_tokens: int) -> None:
        raise NotImplementedError

    def learned_limits(self) -> bool | None:
        """Whether the shared state holds a limit a server reported (any process's
        observation counts); None when this budget cannot tell."""
        return None

    def close(self) -> None:
        """Release resources; the shared state stays for other processes."""

    def __enter__(self) -> BaseBudget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullBudget(BaseBudget):
    """No limits: never waits, ignores feedback."""

    def reserve(self, tokens: int) -> float:
        return 0.0

    async def aacquire(self, tokens: int) -> float:
        return 0.0

    def correct(self, reserved_tokens: int, actual_tokens: int) -> None:
        pass

    def observe(self, snapshot: RateLimitSnapshot) -> None:
        pass

    def pause(self, seconds: float) -> None:
        pass

    def learned_limits(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NullBudget()"


class MemoryBudget(BaseBudget):
    """The algorithm for one process (threads share it); also the unit tests' budget."""

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        burst_seconds: float = 1.0,
        clock: Clock = time.time,
        sleep: Sleep = time.sleep,
    ) -> None:
        super().__init__(sleep=sleep)
        self.limits = Limits(rpm, tpm, burst_seconds)
        self.state = BudgetState()
        self._clock = clock
        self._lock = threading.Lock()

    def reserve(self, tokens: int) -> float:
        with self._lock:
            return reserve(self.state, self.limits, tokens, self._clock())

    def correct(self, reserved_tokens: int, actual_tokens: int) -> None:
        with self._lock:
            correct(self.state, self.limits, reserved_tokens, actual_tokens, self._clock())

    def observe(self, snapshot: RateLimitSnapshot) -> None:
        with self._lock:
            observe(self.state, self.limits, snapshot, self._clock())

    def pause(self, seconds: float) -> None:
        with self._lock:
            pause(self.state, self.limits, seconds, self._clock())

    def learned_limits(self) -> bool:
        with self._lock:
            return learned(self.state)

    def __repr__(self) -> str:
        lim = self.limits
        return f"MemoryBudget(rpm={lim.rpm}, tpm={lim.tpm}, burst_seconds={lim.burst_seconds})"
