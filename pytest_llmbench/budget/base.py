"""The budget's contract, header parsing, and the one token-bucket algorithm.

Two buckets per model, requests and tokens, each refilled continuously at ``limit / 60``
per second up to a capacity (the burst cap). ``reserve`` takes 1 request and the
estimated tokens at once and may drive a level below zero (debt); the caller then sleeps
``-level / rate`` outside any lock. That is GCRA in closed form: no polling, no
thundering herd, and a process that dies after reserving has merely used capacity.

The algorithm is a set of functions on :class:`BudgetState` so the file budget, the
in-memory budget and the tests share it; ``redis.py`` carries a Lua copy of it.

**The opening burst** (``Limits.opening_burst``, ``--llm-opening-burst``, off by default).
OpenAI enforces a per-minute limit over short periods, so the cap stays ``burst_seconds``
of refill; but some servers (llmock, some gateways) really hold a whole minute's allowance
in a bucket that starts full, and their first answers say so in ``x-ratelimit-remaining-*``.
With the option, the first answer that carries a ``remaining`` after a fresh start (a new
state, or one idle for a full minute: the server's window has refilled) may raise the
level to what the server advertises, less every reservation the server may not have
counted yet. Which those are is told by counters in the shared state: ``reserved_n`` (and
``reserved_tokens``) count every reservation ever made, ``answered_n`` (and
``answered_tokens``) every reservation whose answer came back. ``reserve`` hands out a
:class:`Ticket` with the answered counts of that moment, and the answer's snapshot carries
it back. An answer comes after its request reached the server, so every reservation
answered before this request was even reserved was counted by the server before this
one; any other reservation (later ones, and earlier ones still in flight, in any process)
may not have been, and is subtracted::

    level = remaining - (reserved_n - 1 - ticket.answered)          # requests
    level = remaining - (reserved_tokens - ticket.tokens - ticket.answered_tokens)

That is never more than the server has (a reservation whose answer never came, such as a
timeout, stays subtracted: too cautious, never too bold; for tokens, as far as a
reservation covers what the server charges, which the prompt-plus-max-tokens estimate is
meant to). The level is raised only when
that is more than it holds. A level above the cap is then spent but never refilled, and
no re-cap or token give-back lifts it; once no level is above the cap, or at any pause
(429), the opening is over and the budget is the steady one again. Only the first answer
with a ``remaining`` gets to raise it; later answers clamp it down as always.
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
class Ticket:
    """What the budget had counted when a request was reserved: the answers back by then
    (requests and their tokens) and the request's own tokens. It travels with the answer's
    :class:`RateLimitSnapshot` so the opening burst knows which reservations the server's
    ``remaining`` may not include yet (see the module docstring)."""

    answered: float
    answered_tokens: float
    tokens: float


# the rate-limit headers (lower-case), per requests, tokens, and a project's tokens
_LIMIT_R, _LIMIT_T, _LIMIT_PT = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-limit-project-tokens",
)
_REMAINING_R, _REMAINING_T, _REMAINING_PT = (
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-remaining-project-tokens",
)
_RESET_R, _RESET_T, _RESET_PT = (
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-reset-project-tokens",
)


@dataclass(frozen=True)
class RateLimitSnapshot:
    """What one response's ``x-ratelimit-*`` headers said; a field is None when absent.

    ``ticket`` is the reservation of the request this answers (None when unknown).
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    ticket: Ticket | None = None

    @classmethod
    def from_headers(
        cls, headers: Mapping[str, str], ticket: Ticket | None = None, *, lowered: bool = False
    ) -> RateLimitSnapshot:
        """Parse the headers; missing or garbage values become None, never an exception.
        ``lowered``: ``headers`` is a dict of str whose names are lower-case already.

        When a project token limit is reported too, the more restrictive one wins.
        """
        h = headers if lowered else {str(k).lower(): str(v) for k, v in headers.items()}
        get = h.get
        limit_t = _least(_count(get(_LIMIT_T)), _count(get(_LIMIT_PT)))
        remaining_t = _least(_count(get(_REMAINING_T)), _count(get(_REMAINING_PT)))
        reset_t = parse_duration(get(_RESET_T))
        reset_pt = parse_duration(get(_RESET_PT))
        if reset_pt is not None:  # the more restrictive reset is the later one
            reset_t = max(reset_pt, reset_t or 0.0)
        return cls(
            limit_requests=_count(get(_LIMIT_R)),
            remaining_requests=_count(get(_REMAINING_R)),
            reset_requests_s=parse_duration(get(_RESET_R)),
            limit_tokens=None if limit_t is None else int(limit_t),
            remaining_tokens=None if remaining_t is None else int(remaining_t),
            reset_tokens_s=reset_t,
            ticket=ticket,
        )


@dataclass(frozen=True)
class Limits:
    """One process's configuration: per-minute limits (None = unknown), the burst cap, and
    whether the opening burst may spend what the first answer advertises."""

    rpm: float | None = None
    tpm: float | None = None
    burst_seconds: float = 1.0
    opening_burst: bool = False

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
    the lower of it and the configured one. Times are wall-clock seconds. ``opening`` is
    the opening burst's phase (``OPENING_*``), the counters its bookkeeping, and
    ``opening_granted`` the request level the last opening raised the budget to above its
    cap (0: none, or none since the budget was last idle for a minute).
    """

    ts: float = 0.0
    paused_until: float = 0.0
    peak_tokens: float = 0.0
    requests_level: float | None = None
    requests_server_limit: float | None = None
    tokens_level: float | None = None
    tokens_server_limit: float | None = None
    opening: float = 1.0  # OPENING_ARMED
    reserved_n: float = 0.0
    reserved_tokens: float = 0.0
    answered_n: float = 0.0
    answered_tokens: float = 0.0
    opening_granted: float = 0.0

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

#: the opening burst's phases: the next answer with a ``remaining`` may raise the level;
#: a raised level is being spent; over (until the budget is idle for a minute)
OPENING_ARMED, OPENING_SPENDING, OPENING_DONE = 1.0, 2.0, 0.0
#: a budget idle this long starts a new opening: the server's per-minute window is full
IDLE_REARM_S = 60.0


# ---------------------------------------------------------------------------------------
# The algorithm. Every function mutates ``state`` and takes ``now`` explicitly.
# ``redis.py`` mirrors these lines in Lua; change both together.


def limits_in_force(state: BudgetState, limits: Limits) -> tuple[float | None, float | None]:
    """(requests, tokens) per minute now: the configured limit, lowered by the server's."""
    # _least, inlined: this runs several times for each request of a fetch
    rpm, server_rpm = limits.rpm, state.requests_server_limit
    tpm, server_tpm = limits.tpm, state.tokens_server_limit
    return (
        server_rpm if rpm is None else rpm if server_rpm is None else min(rpm, server_rpm),
        server_tpm if tpm is None else tpm if server_tpm is None else min(tpm, server_tpm),
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
    if credit >= IDLE_REARM_S:  # idle a whole window (or fresh): a new opening
        state.opening, state.opening_granted = OPENING_ARMED, 0.0
    rpm, tpm = limits_in_force(state, limits)
    state.requests_level = _bucket(
        state, limits, state.requests_level, rpm, tokens=False, credit=credit
    )
    state.tokens_level = _bucket(state, limits, state.tokens_level, tpm, tokens=True, credit=credit)
    state.ts = now
    if state.opening == OPENING_SPENDING and not _above_cap(state, limits):
        state.opening = OPENING_DONE  # the burst is spent: the steady budget again


def _above_cap(state: BudgetState, limits: Limits) -> bool:
    """Whether a level is above its cap (what only an opening burst can do)."""
    rpm, tpm = limits_in_force(state, limits)
    buckets = ((state.requests_level, rpm, False), (state.tokens_level, tpm, True))
    return any(
        level is not None and limit is not None and level > capacity(state, limits, limit, tokens=t)
        for level, limit, t in buckets
    )


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
    """A bucket's level refilled for ``credit`` seconds, capped, and at most ``ceiling``.
    A burst being spent (above the cap) earns nothing and is not cut to the cap."""
    if limit is None:
        return None
    cap = capacity(state, limits, limit, tokens=tokens)
    if level is None:
        level = cap
    elif not (state.opening == OPENING_SPENDING and level > cap):
        level = min(cap, level + credit * limit / 60.0)
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
    state.reserved_n += 1.0
    state.reserved_tokens += float(tokens)
    if state.requests_level is not None:
        state.requests_level -= 1.0
    if state.tokens_level is not None:
        state.tokens_level -= float(tokens)
    return wait_time(state, limits, now)


def ticket_of(state: BudgetState, tokens: int) -> Ticket:
    """The ticket of a reservation of ``tokens`` made in ``state`` just now."""
    return Ticket(state.answered_n, state.answered_tokens, float(tokens))


def correct(state: BudgetState, limits: Limits, reserved: int, actual: int, now: float) -> None:
    """Give back (or take more of) the tokens once the real usage is known; a give-back
    never lifts the level above the cap, nor a burst above where it is."""
    _refill(state, limits, now)
    tpm = limits_in_force(state, limits)[1]
    if tpm is not None and state.tokens_level is not None:
        cap = capacity(state, limits, tpm, tokens=True)
        level = state.tokens_level
        state.tokens_level = min(max(cap, level), level + float(reserved) - float(actual))


def observe(state: BudgetState, limits: Limits, snap: RateLimitSnapshot, now: float) -> None:
    """Adopt the server's view.

    A reported limit replaces the learned one (so a limit below the configured one rules
    every process, and an unconfigured budget learns its limit); a reported ``remaining``
    below our level lowers the level, since the server will refuse what it lacks. The
    opening's first answer may raise it (see the module docstring).
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
    if snap.remaining_requests is not None or snap.remaining_tokens is not None:
        _open(state, limits, snap)
    if snap.ticket is not None:
        state.answered_n += 1.0
        state.answered_tokens += snap.ticket.tokens


def _open(state: BudgetState, limits: Limits, snap: RateLimitSnapshot) -> None:
    """The opening burst: the first answer with a ``remaining`` after a fresh start may
    raise the levels to it, less the reservations the server may not have counted."""
    if state.opening != OPENING_ARMED:
        return
    state.opening = OPENING_DONE  # one answer only, whatever it says
    t = snap.ticket
    if not limits.opening_burst or t is None or t.answered > state.answered_n:
        return  # off, no ticket, or the state was reset since the request was reserved
    unseen_n = max(0.0, state.reserved_n - 1.0 - t.answered)
    unseen_tokens = max(0.0, state.reserved_tokens - t.tokens - t.answered_tokens)
    rpm, tpm = limits_in_force(state, limits)
    raised = False
    if rpm is not None and state.requests_level is not None and snap.remaining_requests is not None:
        target = snap.remaining_requests - unseen_n
        if target > state.requests_level:
            state.requests_level, raised = target, True
            if target > capacity(state, limits, rpm, tokens=False):
                state.opening_granted = target
    if tpm is not None and state.tokens_level is not None and snap.remaining_tokens is not None:
        target = snap.remaining_tokens - unseen_tokens
        if target > state.tokens_level:
            state.tokens_level, raised = target, True
    if raised and _above_cap(state, limits):
        state.opening = OPENING_SPENDING


def learned(state: BudgetState) -> bool:
    """Whether a server has reported a limit (``x-ratelimit-limit-*``) to this budget; a
    server without those headers leaves an unconfigured budget unlimited."""
    return state.requests_server_limit is not None or state.tokens_server_limit is not None


def pause(state: BudgetState, limits: Limits, seconds: float, now: float) -> None:
    """Stop every process until ``now + seconds`` and drop any banked burst (after a 429)."""
    _refill(state, limits, now)
    state.paused_until = max(state.paused_until, now + max(0.0, seconds))
    state.opening = OPENING_DONE
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
    """``acquire``/``aacquire`` on top of a subclass's ``reserve`` (or ``reserve_ticket``);
    sleeping outside locks."""

    def __init__(self, *, sleep: Sleep = time.sleep) -> None:
        self._sleep = sleep

    def reserve(self, tokens: int) -> float:
        raise NotImplementedError

    def reserve_ticket(self, tokens: int) -> tuple[float, Ticket | None]:
        """``reserve``, plus the reservation's :class:`Ticket` for the answer's snapshot
        (None from a budget that keeps no counts)."""
        return self.reserve(tokens), None

    def acquire(self, tokens: int) -> float:
        """Reserve, then sleep the computed wait; return the seconds waited."""
        return self.acquire_ticket(tokens)[0]

    def acquire_ticket(self, tokens: int) -> tuple[float, Ticket | None]:
        """``acquire``, returning the seconds waited and the reservation's ticket."""
        wait, ticket = self.reserve_ticket(tokens)
        if wait > 0:
            self._sleep(wait)
        return wait, ticket

    async def aacquire(self, tokens: int) -> float:
        """Like ``acquire`` without blocking the event loop (the lock is taken in a thread)."""
        return (await self.aacquire_ticket(tokens))[0]

    async def aacquire_ticket(self, tokens: int) -> tuple[float, Ticket | None]:
        """The async twin of ``acquire_ticket``."""
        wait, ticket = await asyncio.to_thread(self.reserve_ticket, tokens)
        if wait > 0:
            await asyncio.sleep(wait)
        return wait, ticket

    def settle(self, snapshot: RateLimitSnapshot, reserved_tokens: int, actual_tokens: int) -> None:
        """An answer's feedback: ``observe(snapshot)``, then ``correct(reserved, actual)``
        (a backend may do both in one operation)."""
        self.observe(snapshot)
        self.correct(reserved_tokens, actual_tokens)

    def settle_later(
        self, snapshot: RateLimitSnapshot, reserved_tokens: int, actual_tokens: int
    ) -> None:
        """``settle``, possibly written with this process's next operation on the budget
        (a backend whose every write costs a lock and a file defers it; see ``flush``)."""
        self.settle(snapshot, reserved_tokens, actual_tokens)

    def flush(self) -> None:
        """Write what ``settle_later`` deferred (nothing to do by default)."""

    def observe(self, snapshot: RateLimitSnapshot) -> None:
        raise NotImplementedError

    def correct(self, reserved_tokens: int, actual_tokens: int) -> None:
        raise NotImplementedError

    def learned_limits(self) -> bool | None:
        """Whether the shared state holds a limit a server reported (any process's
        observation counts); None when this budget cannot tell."""
        return None

    def opening_granted(self) -> float | None:
        """The request level the last opening burst raised the budget to, above its cap
        (0: none); None when this budget cannot tell."""
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

    async def aacquire_ticket(self, tokens: int) -> tuple[float, Ticket | None]:
        return 0.0, None

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
        opening_burst: bool = False,
        clock: Clock = time.time,
        sleep: Sleep = time.sleep,
    ) -> None:
        super().__init__(sleep=sleep)
        self.limits = Limits(rpm, tpm, burst_seconds, opening_burst)
        self.state = BudgetState()
        self._clock = clock
        self._lock = threading.Lock()

    def reserve(self, tokens: int) -> float:
        return self.reserve_ticket(tokens)[0]

    def reserve_ticket(self, tokens: int) -> tuple[float, Ticket]:
        with self._lock:
            wait = reserve(self.state, self.limits, tokens, self._clock())
            return wait, ticket_of(self.state, tokens)

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

    def opening_granted(self) -> float:
        with self._lock:
            return self.state.opening_granted

    def __repr__(self) -> str:
        return f"MemoryBudget({describe_limits(self.limits)})"


def describe_limits(limits: Limits) -> str:
    """The limits as a repr shows them (``opening_burst`` only when on)."""
    text = f"rpm={limits.rpm}, tpm={limits.tpm}, burst_seconds={limits.burst_seconds}"
    return text + (", opening_burst=True" if limits.opening_burst else "")
