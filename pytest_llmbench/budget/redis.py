"""The budget in Redis, for runs spread over several machines.

The state is one hash, ``<prefix><model>``, with the same fields as the JSON file. Each
operation is one Lua script run atomically by the server (EVALSHA, loaded on first use),
implementing line for line the algorithm in ``base.py``; ``now`` is the server's
``TIME``, so runners with skewed clocks agree and the wait is returned as a duration.
Every write renews a TTL so that the state of an abandoned run disappears.

``redis`` is an optional extra and is imported only when this budget is opened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import BudgetError
from .base import (
    BaseBudget,
    BudgetState,
    Clock,
    Limits,
    RateLimitSnapshot,
    Sleep,
    Ticket,
    describe_limits,
    learned,
    mask_url,
)

if TYPE_CHECKING:
    import redis

T = TypeVar("T")

DEFAULT_PREFIX = "llmbench:budget:"
DEFAULT_TTL = 3600.0

# ARGV: op, now ('' = server TIME), ttl_ms, rpm, tpm, burst_seconds, opening_burst ('1' or
# ''), op arguments... ('' = None). Returns {status, value, ...}: {'ok', wait} (a reserve
# adds its ticket: answered_n, answered_tokens) or {'too_large', tokens_limit}.
LUA = """
-- Redis < 5 replicates scripts verbatim and refuses writes after TIME without this
if redis.replicate_commands then redis.replicate_commands() end
local key, op = KEYS[1], ARGV[1]
local now = tonumber(ARGV[2])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local ttl_ms = tonumber(ARGV[3])
local cfg = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local burst = tonumber(ARGV[6])
local opening_burst = ARGV[7] == '1'
local FIELDS = {'ts', 'paused_until', 'peak_tokens', 'requests_level',
                'requests_server_limit', 'tokens_level', 'tokens_server_limit',
                'opening', 'reserved_n', 'reserved_tokens', 'answered_n',
                'answered_tokens', 'opening_granted'}
local ARMED, SPENDING, DONE = 1, 2, 0
local IDLE_REARM_S = 60

local function finite(v)
  v = tonumber(v)
  if v == nil or v ~= v or v == math.huge or v == -math.huge then return nil end
  return v
end
local function fmt(x) return string.format('%.17g', x) end

local raw = redis.call('HMGET', key, unpack(FIELDS))
local ts = finite(raw[1]) or 0
local paused_until = finite(raw[2]) or 0
local peak = finite(raw[3]) or 0
local level = {finite(raw[4]), finite(raw[6])}
local server = {finite(raw[5]), finite(raw[7])}
local opening = finite(raw[8]) or ARMED
local reserved = {finite(raw[9]) or 0, finite(raw[10]) or 0}
local answered = {finite(raw[11]) or 0, finite(raw[12]) or 0}
local granted = finite(raw[13]) or 0

local function in_force(i)
  local c, s = cfg[i], server[i]
  if c == nil then return s end
  if s == nil then return c end
  return math.min(c, s)
end
local function capacity(i, limit)
  local floor = 1
  if i == 2 then floor = math.max(1, peak) end
  return math.max(limit / 60 * burst, floor)
end
local function above_cap()
  for i = 1, 2 do
    local limit = in_force(i)
    if limit ~= nil and level[i] ~= nil and level[i] > capacity(i, limit) then return true end
  end
  return false
end
-- the level of bucket i refilled for credit seconds and capped; a burst being spent is kept
local function bucket(i, credit)
  local limit = in_force(i)
  if limit == nil then return nil end
  local cap = capacity(i, limit)
  if level[i] == nil then return cap end
  if opening == SPENDING and level[i] > cap then return level[i] end
  return math.min(cap, level[i] + credit * limit / 60)
end
local function refill()
  local elapsed = now - ts
  if elapsed < 0 then
    paused_until = paused_until + elapsed
    ts = now
  end
  local credit = math.max(0, now - math.max(ts, paused_until))
  if credit >= IDLE_REARM_S then
    opening = ARMED
    granted = 0
  end
  for i = 1, 2 do level[i] = bucket(i, credit) end
  ts = now
  if opening == SPENDING and not above_cap() then opening = DONE end
end
-- the opening burst (base._open): the first answer with a remaining may raise the levels
local function open(rem, ticket)
  if opening ~= ARMED then return end
  opening = DONE
  if not opening_burst or ticket[1] == nil or ticket[1] > answered[1] then return end
  local unseen = {math.max(0, reserved[1] - 1 - ticket[1]),
                  math.max(0, reserved[2] - ticket[3] - ticket[2])}
  local raised = false
  for i = 1, 2 do
    local limit = in_force(i)
    if limit ~= nil and level[i] ~= nil and rem[i] ~= nil then
      local target = rem[i] - unseen[i]
      if target > level[i] then
        level[i] = target
        raised = true
        if i == 1 and target > capacity(1, limit) then granted = target end
      end
    end
  end
  if raised and above_cap() then opening = SPENDING end
end
local function wait_time()
  local debt = 0
  for i = 1, 2 do
    local limit = in_force(i)
    if limit ~= nil and level[i] ~= nil and level[i] < 0 then
      debt = math.max(debt, -level[i] / (limit / 60))
    end
  end
  return math.max(0, paused_until - now) + debt
end
local function save()
  local values = {ts, paused_until, peak, level[1], server[1], level[2], server[2],
                  opening, reserved[1], reserved[2], answered[1], answered[2], granted}
  local set, del = {}, {}
  for i = 1, #FIELDS do
    if values[i] == nil then
      table.insert(del, FIELDS[i])
    else
      table.insert(set, FIELDS[i])
      table.insert(set, fmt(values[i]))
    end
  end
  redis.call('HSET', key, unpack(set))
  if #del > 0 then redis.call('HDEL', key, unpack(del)) end
  redis.call('PEXPIRE', key, ttl_ms)
end

if op == 'reserve' then
  local tokens = tonumber(ARGV[8])
  local tpm = in_force(2)
  if tpm ~= nil and tokens > tpm then return {'too_large', fmt(tpm)} end
  peak = math.max(peak, tokens)
  refill()
  reserved[1] = reserved[1] + 1
  reserved[2] = reserved[2] + tokens
  if level[1] ~= nil then level[1] = level[1] - 1 end
  if level[2] ~= nil then level[2] = level[2] - tokens end
  save()
  return {'ok', fmt(wait_time()), fmt(answered[1]), fmt(answered[2])}
elseif op == 'correct' then
  refill()
  local tpm = in_force(2)
  if tpm ~= nil and level[2] ~= nil then
    local l = level[2]
    level[2] = math.min(math.max(capacity(2, tpm), l), l + tonumber(ARGV[8]) - tonumber(ARGV[9]))
  end
elseif op == 'observe' then
  refill()
  local lim = {tonumber(ARGV[8]), tonumber(ARGV[10])}
  local rem = {tonumber(ARGV[9]), tonumber(ARGV[11])}
  local ticket = {tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])}
  for i = 1, 2 do
    if lim[i] ~= nil and lim[i] > 0 then server[i] = lim[i] end
  end
  for i = 1, 2 do
    level[i] = bucket(i, 0)
    if level[i] ~= nil and rem[i] ~= nil then level[i] = math.min(level[i], rem[i]) end
  end
  if rem[1] ~= nil or rem[2] ~= nil then open(rem, ticket) end
  if ticket[1] ~= nil then
    answered[1] = answered[1] + 1
    answered[2] = answered[2] + ticket[3]
  end
elseif op == 'pause' then
  refill()
  paused_until = math.max(paused_until, now + math.max(0, tonumber(ARGV[8])))
  opening = DONE
  for i = 1, 2 do
    if level[i] ~= nil then level[i] = math.min(level[i], 0) end
  end
else
  return redis.error_reply('unknown budget op ' .. tostring(op))
end
save()
return {'ok', '0'}
"""


def _arg(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class RedisBudget(BaseBudget):
    """The budget shared through a Redis server by processes on any number of machines."""

    def __init__(
        self,
        url: str,
        *,
        key: str,
        rpm: float | None = None,
        tpm: float | None = None,
        burst_seconds: float = 1.0,
        opening_burst: bool = False,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        clock: Clock | None = None,
        sleep: Sleep = time.sleep,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(sleep=sleep)
        self.limits = Limits(rpm, tpm, burst_seconds, opening_burst)
        self.url = mask_url(url)
        self.key = prefix + key
        self._ttl_ms = max(1, int(ttl * 1000))
        self._clock = clock  # None: the Redis server's TIME (tests inject one)
        self._password = _password(url)
        try:
            import redis
        except ImportError:
            raise BudgetError(
                f"budget {self.url} needs the 'redis' package: pip install 'pytest-llmbench[redis]'"
            ) from None
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, ValueError)
        self._client: redis.Redis | None = None
        try:
            client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except self._errors as exc:
            raise self._error("invalid Redis budget URL", exc) from None
        try:
            client.ping()
        except self._errors as exc:
            client.close()
            raise self._error("cannot reach the Redis budget at", exc) from None
        self._client = client
        self._script = client.register_script(LUA)

    # -- the Budget protocol

    def reserve(self, tokens: int) -> float:
        return self.reserve_ticket(tokens)[0]

    def reserve_ticket(self, tokens: int) -> tuple[float, Ticket]:
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, not {tokens}")
        status, value, *counts = self._run("reserve", tokens)
        if status == "too_large":
            raise BudgetError(
                f"a request of {tokens} tokens can never fit the limit of "
                f"{float(value):g} tokens per minute"
            )
        answered, answered_tokens = (float(c) for c in counts)
        return float(value), Ticket(answered, answered_tokens, float(tokens))

    def correct(self, reserved_tokens: int, actual_tokens: int) -> None:
        self._run("correct", reserved_tokens, actual_tokens)

    def observe(self, snapshot: RateLimitSnapshot) -> None:
        s, t = snapshot, snapshot.ticket
        self._run(
            "observe",
            s.limit_requests,
            s.remaining_requests,
            s.limit_tokens,
            s.remaining_tokens,
            *((None, None, None) if t is None else (t.answered, t.answered_tokens, t.tokens)),
        )

    def pause(self, seconds: float) -> None:
        self._run("pause", seconds)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def state(self) -> BudgetState:
        """The shared state as stored (for diagnostics and tests); changes nothing."""
        raw = self._call(lambda c: c.hgetall(self.key))
        return BudgetState.from_fields({_text(k): v for k, v in dict(raw).items()})

    def learned_limits(self) -> bool:
        return learned(self.state())

    def opening_granted(self) -> float:
        return self.state().opening_granted

    def __repr__(self) -> str:
        return f"RedisBudget({self.url!r}, key={self.key!r}, {describe_limits(self.limits)})"

    # -- plumbing

    def _run(self, op: str, *args: float | None) -> list[str]:
        lim = self.limits
        argv = [
            op,
            "" if self._clock is None else repr(self._clock()),
            str(self._ttl_ms),
            _arg(lim.rpm),
            _arg(lim.tpm),
            _arg(lim.burst_seconds),
            "1" if lim.opening_burst else "",
            *(_arg(a) for a in args),
        ]
        reply = self._call(lambda _: self._script(keys=[self.key], args=argv))
        return [_text(part) for part in reply]

    def _call(self, fn: Callable[[redis.Redis], T]) -> T:
        if self._client is None:
            raise BudgetError(f"the Redis budget {self.url} is closed")
        try:
            return fn(self._client)
        except self._errors as exc:
            raise self._error("Redis budget failed at", exc) from None

    def _error(self, what: str, exc: BaseException) -> BudgetError:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            detail = detail.replace(self._password, "***")
        return BudgetError(f"{what} {self.url}: {detail}")


def _password(url: str) -> str | None:
    """The password in ``url`` (user info or ``?password=``), to scrub from messages."""
    try:
        parts = urlsplit(url)
        password = parts.password or parse_qs(parts.query).get("password", [""])[0]
    except ValueError:
        return None
    return unquote(password) if password else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
