"""The shared rate-limit budget: algorithm, file and Redis backends, several processes.

Unit tests drive the algorithm with an injected clock that never sleeps. The
multi-process tests run ``budget_worker.py`` subprocesses against one budget and check
rate-based properties of the admission times (never absolute durations). The Redis
tests start a real ``redis-server`` on loopback and are skipped when it is not installed.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import heapq
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.budget import (
    Budget,
    BudgetState,
    FileBudget,
    MemoryBudget,
    NullBudget,
    RateLimitSnapshot,
    RedisBudget,
    Ticket,
    mask_url,
    open_budget,
    parse_duration,
)
from pytest_llmbench.budget.base import OPENING_ARMED, OPENING_DONE, OPENING_SPENDING
from pytest_llmbench.budget.file import safe_name
from pytest_llmbench.errors import BudgetError
from pytest_llmbench.sim.limits import ModelLimits
from tests import redis_server

from .helpers import ManualClock

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "budget_worker.py"
T0 = 1_700_000_000.0


class FakeClock:
    """A wall clock that moves only when told to; ``sleep`` advances it."""

    def __init__(self, t: float = T0) -> None:
        self.t = t
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def drain(budget: Budget, n: int, tokens: int = 0) -> list[float]:
    return [budget.reserve(tokens) for _ in range(n)]


# ---------------------------------------------------------------------------------------
# Header parsing


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("2m59.56s", 179.56),
        ("0.5s", 0.5),
        ("1h2m3s", 3723.0),
        ("7", 7.0),
        ("", None),
        ("soon", None),
        ("-1s", None),
        ("1s garbage", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_snapshot_from_headers_reads_every_field_case_insensitively() -> None:
    snap = RateLimitSnapshot.from_headers(
        {
            "X-RateLimit-Limit-Requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-limit-tokens": "2000000",
            "x-ratelimit-remaining-tokens": "1999950",
            "x-ratelimit-reset-tokens": "1m0.5s",
            "content-type": "application/json",
        }
    )
    assert snap == RateLimitSnapshot(10000, 9999, 0.006, 2000000, 1999950, 60.5)


def test_snapshot_from_missing_or_garbage_headers_is_all_none() -> None:
    assert RateLimitSnapshot.from_headers({}) == RateLimitSnapshot()
    garbage = {
        f"x-ratelimit-{kind}-{dim}": value
        for kind in ("limit", "remaining", "reset")
        for dim in ("requests", "tokens")
        for value in ("", "-3", "lots", "inf")
    }
    assert RateLimitSnapshot.from_headers(garbage) == RateLimitSnapshot()


def test_snapshot_takes_the_more_restrictive_project_token_limit() -> None:
    snap = RateLimitSnapshot.from_headers(
        {
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "29000",
            "x-ratelimit-reset-tokens": "2s",
            "x-ratelimit-limit-project-tokens": "10000",
            "x-ratelimit-remaining-project-tokens": "500",
            "x-ratelimit-reset-project-tokens": "57s",
        }
    )
    assert (snap.limit_tokens, snap.remaining_tokens, snap.reset_tokens_s) == (10000, 500, 57.0)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:p%40ss@host/1", "redis://user:***@host/1"),
        ("rediss://host:6380/0?password=xyz&ssl=1", "rediss://host:6380/0?password=***&ssl=1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
    ],
)
def test_mask_url_hides_passwords(url: str, masked: str) -> None:
    assert mask_url(url) == masked


# ---------------------------------------------------------------------------------------
# The algorithm, with a clock that never sleeps


def test_fresh_budget_allows_the_burst_then_paces_at_limit_per_second() -> None:
    clock = FakeClock()
    budget = MemoryBudget(rpm=1200, clock=clock)  # 20/s, burst cap 20
    assert drain(budget, 20) == [0.0] * 20
    assert drain(budget, 3) == pytest.approx([0.05, 0.10, 0.15])


def test_refill_is_continuous_and_capped_at_the_burst() -> None:
    clock = FakeClock()
    budget = MemoryBudget(rpm=1200, clock=clock)
    drain(budget, 20)
    clock.t += 0.5  # 10 requests refilled
    assert drain(budget, 11) == pytest.approx([0.0] * 10 + [0.05])
    clock.t += 3600  # an hour idle banks 1 s, not an hour
    assert drain(budget, 21)[-1] == pytest.approx(0.05)


def test_burst_seconds_sets_the_cap_but_never_below_one_request() -> None:
    clock = FakeClock()
    assert drain(MemoryBudget(rpm=1200, burst_seconds=0.25, clock=clock), 6)[-2:] == (
        pytest.approx([0.0, 0.05])
    )
    slow = MemoryBudget(rpm=6, burst_seconds=1.0, clock=clock)  # 0.1/s: cap 1 request
    assert drain(slow, 2) == pytest.approx([0.0, 10.0])


def test_wait_is_the_longest_debt_over_both_buckets() -> None:
    clock = FakeClock()
    budget = MemoryBudget(rpm=600, tpm=60_000, clock=clock)  # 10 req/s, 1000 tok/s
    assert budget.reserve(900) == 0.0
    assert budget.reserve(600) == pytest.approx(0.5)  # tokens owe 500 -> 0.5 s
    # requests: 8 left, then a debt of 1..5 requests (0.1..0.5 s) hides behind the tokens'
    assert drain(budget, 13) == pytest.approx([0.5] * 13)
    assert budget.reserve(0) == pytest.approx(0.6)  # 6 requests owed: requests rule now


def test_a_reservation_above_the_burst_waits_but_never_deadlocks() -> None:
    clock = FakeClock()
    budget = MemoryBudget(tpm=60_000, clock=clock, sleep=clock.sleep)  # burst 1000 tokens
    assert budget.reserve(5000) == 0.0  # the cap grows to the largest reservation
    assert budget.acquire(5000) == pytest.approx(5.0)
    assert clock.slept == [pytest.approx(5.0)]
    assert budget.state.peak_tokens == 5000


def test_a_reservation_above_the_minute_limit_raises_and_changes_nothing() -> None:
    budget = MemoryBudget(tpm=1000, clock=FakeClock())
    before = copy.deepcopy(budget.state)
    with pytest.raises(BudgetError, match="1001 tokens can never fit the limit of 1000"):
        budget.reserve(1001)
    assert budget.state == before
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        budget.reserve(-1)


def test_correct_gives_back_unused_tokens_up_to_the_cap_and_takes_overruns() -> None:
    clock = FakeClock()
    budget = MemoryBudget(tpm=60_000, clock=clock)  # cap 1000
    budget.reserve(1000)
    budget.correct(1000, 200)
    assert budget.state.tokens_level == pytest.approx(800)
    budget.correct(500, 0)
    assert budget.state.tokens_level == pytest.approx(1000)  # capped
    budget.correct(100, 1600)
    assert budget.reserve(0) == pytest.approx(0.5)  # 500 tokens of debt


def test_requests_are_not_refunded() -> None:
    clock = FakeClock()
    budget = MemoryBudget(rpm=60, tpm=60_000, clock=clock)  # 1 request/s
    budget.reserve(100)
    budget.correct(100, 0)  # e.g. the request failed
    assert budget.reserve(100) == pytest.approx(1.0)


def test_observe_adopts_a_lower_server_limit_and_keeps_a_lower_configured_one() -> None:
    clock = FakeClock()
    budget = MemoryBudget(rpm=1200, clock=clock)
    budget.observe(RateLimitSnapshot(limit_requests=840))  # 30 % lower: 14/s, cap 14
    assert drain(budget, 15) == pytest.approx([0.0] * 14 + [1 / 14])
    budget.observe(RateLimitSnapshot(limit_requests=5000))  # higher: configured 1200 rules
    clock.t += 100
    assert drain(budget, 21)[-2:] == pytest.approx([0.0, 0.05])


def test_observe_remaining_below_our_level_lowers_it() -> None:
    clock = FakeClock()
    budget = MemoryBudget(rpm=1200, tpm=600_000, clock=clock)
    budget.observe(RateLimitSnapshot(remaining_requests=3, remaining_tokens=100_000))
    assert drain(budget, 4) == pytest.approx([0.0, 0.0, 0.0, 0.05])
    budget.observe(RateLimitSnapshot(remaining_tokens=0))
    assert budget.reserve(5000) == pytest.approx(0.5)


def test_an_unconfigured_budget_is_unlimited_until_it_learns_the_limits() -> None:
    clock = FakeClock()
    budget = MemoryBudget(clock=clock)
    assert drain(budget, 1000, tokens=10**9) == [0.0] * 1000
    budget.observe(RateLimitSnapshot(limit_requests=600, limit_tokens=6000, remaining_tokens=50))
    assert budget.state.requests_server_limit == 600
    assert budget.reserve(100) == pytest.approx(0.5)  # 50 tokens left, 100/s
    with pytest.raises(BudgetError, match="6000 tokens per minute"):
        budget.reserve(6001)


def test_pause_stops_everyone_and_banks_no_burst() -> None:
    clock = FakeClock()
    budget = MemoryBudget(rpm=1200, clock=clock)
    budget.pause(2.0)
    budget.pause(0.5)  # a shorter pause never shortens the current one
    assert budget.reserve(0) == pytest.approx(2.05)  # the pause, then 1 slot: burst dropped
    clock.t += 2.05  # the pause banked nothing: the pool resumes at the rate, no burst
    assert drain(budget, 2) == pytest.approx([0.05, 0.10], abs=1e-6)


def test_a_clock_stepping_back_credits_nothing_and_keeps_the_pause() -> None:
    clock = FakeClock()
    budget = MemoryBudget(rpm=1200, clock=clock)
    drain(budget, 20)
    budget.pause(1.0)
    clock.t -= 3600
    assert budget.reserve(0) == pytest.approx(1.0 + 0.05)
    clock.t += 1.1  # 0.1 s after the pause: 2 slots earned, 1 of them already taken
    assert drain(budget, 2) == pytest.approx([0.0, 0.05], abs=1e-6)


def test_null_budget_never_waits() -> None:
    budget = NullBudget()
    assert drain(budget, 100, tokens=10**9) == [0.0] * 100
    budget.observe(RateLimitSnapshot(limit_requests=1))
    budget.pause(100)
    budget.correct(1, 2)
    assert budget.acquire(10) == 0.0
    assert asyncio.run(budget.aacquire(10)) == 0.0
    assert isinstance(budget, Budget)
    assert repr(budget) == "NullBudget()"


def test_aacquire_reserves_in_a_thread_and_sleeps_on_the_loop() -> None:
    budget = MemoryBudget(rpm=6000, clock=FakeClock())  # 100/s, cap 100; the clock is frozen

    async def main() -> list[float]:
        return [await budget.aacquire(0) for _ in range(102)]

    waits = asyncio.run(main())
    assert waits[-2:] == pytest.approx([0.01, 0.02])


# ---------------------------------------------------------------------------------------
# The file budget in one process


def test_file_budget_instances_share_the_state(tmp_path: Path) -> None:
    clock = FakeClock()
    a = FileBudget(tmp_path / "b.json", rpm=1200, clock=clock)
    b = FileBudget(tmp_path / "b.json", rpm=1200, clock=clock)
    assert [x.reserve(0) for x in (a, b) * 10] == [0.0] * 20
    assert a.reserve(0) == pytest.approx(0.05)
    assert b.reserve(0) == pytest.approx(0.10)
    b.pause(3)
    assert a.reserve(0) == pytest.approx(3.15)


class CountingFileBudget(FileBudget):
    """A file budget that counts its locked read-modify-writes."""

    rewrites = 0

    def _rewrite(self, change: Any) -> Any:
        self.rewrites += 1
        return super()._rewrite(change)


def test_async_reservations_of_one_turn_are_one_operation_each_as_if_alone(
    tmp_path: Path,
) -> None:
    # 20/s with a burst of 20: the first 20 go at once, then each waits 0.05 s more
    # (the clock stands still; the waits are slept for real, 0.25 s at most)
    clock = FakeClock()
    alone = FileBudget(tmp_path / "alone.json", rpm=1200, clock=clock)
    expected = [alone.reserve_ticket(10) for _ in range(25)]
    together = CountingFileBudget(tmp_path / "together.json", rpm=1200, clock=clock)

    async def same_turn() -> list[tuple[float, Any]]:
        return await asyncio.gather(*(together.aacquire_ticket(10) for _ in range(25)))

    got = asyncio.run(same_turn())
    assert together.rewrites == 1  # one locked read-modify-write for the 25
    assert [w for w, _ in got] == pytest.approx([w for w, _ in expected])
    assert [t for _, t in got] == [t for _, t in expected]
    assert together.state() == alone.state()


def test_an_async_reservation_that_can_never_fit_fails_alone(tmp_path: Path) -> None:
    budget = CountingFileBudget(tmp_path / "b.json", tpm=60_000, clock=FakeClock())

    async def same_turn() -> list[Any]:
        asks = [budget.aacquire_ticket(n) for n in (10, 100_000, 20)]
        return await asyncio.gather(*asks, return_exceptions=True)

    small, huge, other = asyncio.run(same_turn())
    assert budget.rewrites == 1
    assert isinstance(huge, BudgetError) and "can never fit" in str(huge)
    assert small[0] == 0.0 and other[0] == 0.0
    assert budget.state().reserved_tokens == 30  # the huge one changed nothing


def test_file_state_format(tmp_path: Path) -> None:
    budget = FileBudget(tmp_path / "b.json", rpm=1200, tpm=60_000, clock=FakeClock())
    budget.reserve(150)
    budget.observe(RateLimitSnapshot(limit_tokens=30_000))
    raw = (tmp_path / "b.json").read_bytes()
    assert len(raw) == 512 and raw.rstrip().endswith(b"}")  # a fixed-size record, padded
    data = json.loads(raw)
    assert data == {
        "version": 1,
        "ts": T0,
        "paused_until": 0.0,
        "peak_tokens": 150.0,
        "requests_level": 19.0,
        "requests_server_limit": None,
        "tokens_level": 500.0,
        "tokens_server_limit": 30000.0,
        "opening": 1.0,  # armed: no answer with a remaining yet
        "reserved_n": 1.0,
        "reserved_tokens": 150.0,
        "answered_n": 0.0,  # the snapshot came without the reservation's ticket
        "answered_tokens": 0.0,
        "opening_granted": 0.0,
    }
    assert budget.state() == BudgetState.from_fields(data)


def test_a_longer_record_on_disk_is_replaced_whole(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text('{"version": 1, "ts": 0}' + " " * 5000 + "\n")
    FileBudget(tmp_path / "b.json", rpm=60, clock=FakeClock()).reserve(0)
    assert len((tmp_path / "b.json").read_bytes()) == 512


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\xff{torn", b"[]", b'{"version": 99}', b'{"version": 1, "ts": "soon"}'],
)
def test_a_garbage_state_file_is_fresh_state(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "b.json").write_bytes(content)
    budget = FileBudget(tmp_path / "b.json", rpm=1200, clock=FakeClock())
    assert drain(budget, 21)[-2:] == pytest.approx([0.0, 0.05])
    assert json.loads((tmp_path / "b.json").read_text())["version"] == 1


def test_settle_is_observe_then_correct_in_one_operation(tmp_path: Path) -> None:
    clock = FakeClock()
    apart = FileBudget(tmp_path / "a.json", rpm=1200, tpm=60_000, clock=clock)
    together = FileBudget(tmp_path / "b.json", rpm=1200, tpm=60_000, clock=clock)
    snapshot = RateLimitSnapshot(limit_tokens=30_000, remaining_tokens=400)
    for budget in (apart, together):
        budget.reserve(300)
    apart.observe(snapshot)
    apart.correct(300, 120)
    together.settle(snapshot, 300, 120)
    assert together.state() == apart.state()
    memory = MemoryBudget(rpm=1200, tpm=60_000, clock=clock)  # the default: two calls
    memory.reserve(300)
    memory.settle(snapshot, 300, 120)
    assert memory.state == apart.state()


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_an_async_reservation_waits_for_a_held_lock_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import threading

    budget = FileBudget(tmp_path / "b.json", rpm=60_000, lock_timeout=10)
    threads: list[object] = []
    to_thread = asyncio.to_thread

    async def recording(func: Any, /, *args: Any) -> Any:
        threads.append(func)
        return await to_thread(func, *args)

    monkeypatch.setattr(asyncio, "to_thread", recording)
    # a free lock: the reservation runs inline
    assert asyncio.run(budget.aacquire(0)) == 0.0
    assert threads == []
    # held by another holder (its own descriptor, as another process would): the event
    # loop keeps running while a thread waits for it
    holder = os.open(budget.lock_path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    ticks = 0

    async def main() -> float:
        nonlocal ticks
        task = asyncio.ensure_future(budget.aacquire(0))
        while ticks < 5:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not task.done()
        threading.Timer(0.05, os.close, (holder,)).start()  # closing drops the lock
        return await task

    assert asyncio.run(main()) == 0.0
    assert len(threads) == 1
    budget.close()


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_lock_file_removed_while_open_is_opened_anew(tmp_path: Path) -> None:
    import fcntl

    budget = FileBudget(tmp_path / "b.json", rpm=60, lock_timeout=0.2)
    budget.reserve(0)  # the lock file is open now
    budget.lock_path.unlink()
    holder = os.open(budget.lock_path, os.O_RDWR | os.O_CREAT)  # another process's new one
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(BudgetError, match="could not lock the budget"):
            budget.reserve(0)  # it waits for the lock at the path, not the removed one
    finally:
        os.close(holder)
    assert budget.reserve(0) > 0  # the second request of 60 RPM with a burst of one
    shutil.rmtree(tmp_path)  # the whole run directory, as --cache-clear might
    assert budget.reserve(0) == 0.0  # made again, with a fresh state


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_never_shares_its_parents_lock(tmp_path: Path) -> None:
    budget = FileBudget(tmp_path / "b.json", rpm=60, lock_timeout=0.2)
    budget.reserve(0)
    assert budget._flock.acquire(True)  # the parent holds the lock across the fork
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                budget.reserve(0)
                code = 1  # it took the parent's lock
            except BudgetError:
                code = 0  # it waited for its own, in vain
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        budget._flock.release()
    assert os.waitstatus_to_exitcode(status) == 0
    assert budget.reserve(0) > 0  # the child's exit did not take the parent's descriptor


def test_open_budget_picks_the_backend_and_names_files_safely(tmp_path: Path) -> None:
    b = open_budget(None, run_dir=tmp_path / "run", key="gpt-4o", rpm=60, tpm=None)
    assert isinstance(b, FileBudget)
    assert b.path == tmp_path / "run" / "budget-gpt-4o.json"
    assert repr(b) == (f"FileBudget({str(b.path)!r}, rpm=60, tpm=None, burst_seconds=1.0)")
    b2 = open_budget("file", run_dir=tmp_path, key="ft:gpt-4o:org/x", rpm=None, tpm=None)
    assert isinstance(b2, FileBudget)
    assert b2.path.parent == tmp_path
    assert b2.path.name.startswith("budget-ft-gpt-4o-org-x-")
    assert safe_name("ft:a") != safe_name("ft/a")
    with pytest.raises(BudgetError, match=r"unknown budget 'ftp://u:\*\*\*@h'"):
        open_budget("ftp://u:pw@h", run_dir=tmp_path, key="m", rpm=1, tpm=1)
    with pytest.raises(BudgetError, match="rpm must be a positive number"):
        open_budget(None, run_dir=tmp_path, key="m", rpm=0, tpm=None)


# ---------------------------------------------------------------------------------------
# A discrete-event simulation: 8 clients, a server enforcing its limit per second


@dataclass
class ServerBucket:
    """A server that paces ``rpm`` per second (1 s burst) and reports it in headers."""

    rpm: float
    level: float | None = None
    ts: float = 0.0

    def handle(self, now: float) -> tuple[bool, RateLimitSnapshot, float]:
        rate, cap = self.rpm / 60, self.rpm / 60
        self.level = cap if self.level is None else min(cap, self.level + (now - self.ts) * rate)
        self.ts = now
        ok = self.level >= 1 - 1e-9
        if ok:
            self.level -= 1
        snap = RateLimitSnapshot(limit_requests=int(self.rpm), remaining_requests=int(self.level))
        return ok, snap, max(0.0, (1 - self.level) / rate)


@dataclass
class SimResult:
    admitted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)

    def rate(self, start: float, end: float) -> float:
        return sum(start <= t < end for t in self.admitted) / (end - start)

    def refusals(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.refused)


def simulate(
    rpm: float | None, server_rpm: float, *, clients: int = 8, seconds: float = 30.0
) -> SimResult:
    clock = FakeClock(0.0)
    budget = MemoryBudget(rpm=rpm, clock=clock)
    server = ServerBucket(server_rpm)
    result = SimResult()
    seq = 0
    events: list[tuple[float, int, str, Any]] = []

    def push(t: float, kind: str, data: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    for _ in range(clients):
        push(0.0, "ready")
    while events:
        t, _, kind, data = heapq.heappop(events)
        if t > seconds:
            break
        clock.t = t
        if kind == "ready":
            push(t + budget.reserve(0) + 0.02, "arrive")  # constant network delay
        elif kind == "arrive":
            ok, snap, retry_after = server.handle(t)
            (result.admitted if ok else result.refused).append(t)
            push(t + 0.3, "answer", (ok, snap, retry_after))
        else:
            ok, snap, retry_after = data
            budget.observe(snap)
            if not ok:
                budget.pause(retry_after)
            push(t, "ready")
    return result


@pytest.mark.parametrize("clients", [8, 64])
def test_simulated_pool_reaches_the_limit_without_refusals(clients: int) -> None:
    r = simulate(1200, 1200, clients=clients)
    assert r.refusals(0, 30) == 0
    assert 0.95 * 20 <= r.rate(1, 30) <= 20 * 1.01


@pytest.mark.parametrize("clients", [8, 64])
def test_simulated_pool_converges_below_a_server_limit_30_percent_lower(clients: int) -> None:
    # Reservations handed out before the first answer keep their (too dense) slots, so
    # convergence takes about clients / configured rate; after that nothing is refused.
    r = simulate(1200, 840, clients=clients)
    assert r.refusals(5, 30) == 0
    assert len(r.refused) <= clients  # at most the slots handed out at the old rate
    assert 0.95 * 14 <= r.rate(5, 30) <= 14 * 1.01


@pytest.mark.parametrize("clients", [8, 64])
def test_simulated_unconfigured_pool_learns_the_limit(clients: int) -> None:
    # Until the first answer the budget knows no limit: the first wave goes out at once.
    r = simulate(None, 600, clients=clients)
    assert r.refusals(1, 30) == 0
    assert r.refusals(0, 1) <= max(0, clients - 10)
    assert 0.95 * 10 <= r.rate(2, 30) <= 10 * 1.01


# ---------------------------------------------------------------------------------------
# Several processes


class Worker:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def line(self) -> str:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"worker exited early: {err}")
        return text.strip()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return dict(json.loads(out.strip().splitlines()[-1]))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL


@contextmanager
def workers(n: int, *args: str) -> Iterator[list[Worker]]:
    """Start ``n`` workers, wait until all are ready, start them together."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    ws = [Worker(p) for p in procs]
    try:
        for w in ws:
            assert w.line() == "ready"
        for w in ws:
            w.go()
        yield ws
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)


def max_in_window(times: Sequence[float], window: float) -> int:
    """The most timestamps in any half-open window [t, t + window)."""
    best, j = 0, 0
    for i, t in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < t + window:
            j += 1
        best = max(best, j - i)
    return best


def server_refusals(
    times: Sequence[float], rpm: float, cap: float, start: float, tolerance: float = 0.05
) -> int:
    """How many of ``times`` a server bucket with the same rate and cap would refuse.

    The bucket starts full at ``start``, no later than the budget's first reservation.
    Like the simulator (and GCRA) it admits a request that would fit ``tolerance``
    seconds later: a process descheduled between its slot and its send bunches up with
    the next ones, which a zero-tolerance bucket would punish.
    """
    rate, level, last, refused = rpm / 60, cap, start, 0
    for t in times:
        level = min(cap, level + (t - last) * rate)
        last = t
        if level >= 1 - tolerance * rate:
            level -= 1
        else:
            refused += 1
    return refused


def assert_paced(results: list[dict[str, Any]], rpm: float, duration: float) -> list[float]:
    times = sorted(t for r in results for t in r["admitted"])
    rate, cap = rpm / 60, max(1.0, rpm / 60)
    for window in (0.25, 0.5, 1.0, 2.0):  # 0.05 s of slack for descheduled senders
        assert max_in_window(times, window) <= math.floor(rate * (window + 0.05) + cap) + 1
    start = times[0]
    steady = [t for t in times if t >= start + 1.0]
    assert len(steady) / (duration - 1.0) >= 0.9 * rate
    started = min(r["started"] for r in results)
    assert server_refusals(times, rpm, cap, started) <= 0.01 * len(times)
    return times


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if not redis_server.available():
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    pytest.importorskip("redis", reason="the 'redis' extra is not installed")
    with redis_server.redis_server() as url:
        yield url


@pytest.fixture(params=["file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file:{tmp_path}"
    return str(request.getfixturevalue("redis_url"))


def test_processes_together_keep_to_the_rate(backend: str) -> None:
    # Given 6 processes hammering one budget of 1800 RPM (30/s, burst 30) for 3 s
    key = f"m-{uuid.uuid4().hex}"
    with workers(6, "hammer", backend, key, "--rpm", "1800", "--duration", "3") as ws:
        results = [w.result() for w in ws]
    # Then no window holds more than rate * window + burst, the pool gets >= 90 % of the
    # rate, and a server bucket with the same limit would refuse (almost) nothing
    assert_paced(results, 1800, 3.0)
    assert all(r["admitted"] for r in results)  # nobody starved


def test_corrected_token_reservations_admit_more(tmp_path: Path) -> None:
    # Given two budgets of 72k TPM (1200/s): one pool reserves 150 and corrects to 100
    common = ["--rpm", "60000", "--tpm", "72000", "--tokens", "150", "--duration", "3"]
    with (
        workers(
            4, "hammer", f"file:{tmp_path}", "corrected", "--correct-to", "100", *common
        ) as fixed,
        workers(4, "hammer", f"file:{tmp_path}", "estimated", *common) as plain,
    ):
        corrected = [w.result() for w in fixed]
        estimated = [w.result() for w in plain]

    def steady_rate(results: list[dict[str, Any]]) -> float:
        times: list[float] = sorted(t for r in results for t in r["admitted"])
        return sum(t >= times[0] + 1 for t in times) / 2.0

    # Then the corrected pool runs at ~1200/100 = 12/s, the other at ~1200/150 = 8/s
    assert 0.9 * 12 <= steady_rate(corrected) <= 1.1 * 12
    assert 0.9 * 8 <= steady_rate(estimated) <= 1.1 * 8


def test_a_process_killed_while_holding_the_lock_releases_it(tmp_path: Path) -> None:
    path = tmp_path / "budget-m.json"
    with workers(1, "hold", f"file:{tmp_path}", "m", "--rpm", "60") as (holder,):
        assert holder.line() == "locked"
        impatient = FileBudget(path, rpm=60, lock_timeout=0.2)
        with pytest.raises(BudgetError, match=r"could not lock the budget .* within 0\.2 s"):
            impatient.reserve(0)
        holder.kill()
        assert FileBudget(path, rpm=60, lock_timeout=10).reserve(0) == 0.0


def test_a_process_killed_mid_operation_leaves_a_usable_state(tmp_path: Path) -> None:
    path = tmp_path / "budget-m.json"
    for delay in (0.0, 0.1, 0.3):
        with workers(1, "spin", f"file:{tmp_path}", "m", "--rpm", "60000000") as (spinner,):
            # its first record is written (the file exists, empty, from the open before
            # the first write: a reader takes that for a fresh state, as the check
            # below shows, but it is no record to tear)
            while not path.exists() or path.stat().st_size == 0:
                time.sleep(0.005)
            time.sleep(delay)  # it spends most of its time inside the lock
            spinner.kill()
        json.loads(path.read_text())  # never torn
        assert FileBudget(path, rpm=60_000_000, lock_timeout=10).reserve(0) == 0.0


def test_a_process_killed_after_reserving_costs_only_its_reservation(backend: str) -> None:
    # Given a process that reserved 15 requests of a 60 RPM budget (1/s, burst 1) and died
    key = f"m-{uuid.uuid4().hex}"
    with workers(1, "reserve", backend, key, "--rpm", "60", "--count", "15") as (w,):
        assert 10 < json.loads(w.line())["reserved"][-1] <= 14  # 14 s of debt, minus refill
        w.kill()
    # Then a survivor waits for that debt to refill (at most 15 s) plus its own slot, and
    # nothing else: no lock, no lease is left behind
    url, run_dir = (None, Path(backend[5:])) if backend.startswith("file:") else (backend, ROOT)
    survivor = open_budget(url, run_dir=run_dir, key=key, rpm=60, tpm=None)
    try:
        assert 10 < survivor.reserve(0) <= 15
    finally:
        survivor.close()


# ---------------------------------------------------------------------------------------
# Redis specifics


@pytest.fixture
def redis_budget(redis_url: str) -> Iterator[tuple[RedisBudget, FakeClock]]:
    clock = FakeClock()
    budget = RedisBudget(redis_url, key=f"t-{uuid.uuid4().hex}", rpm=1200, tpm=60_000, clock=clock)
    yield budget, clock
    budget.close()


def test_the_lua_script_runs_the_same_algorithm(
    redis_budget: tuple[RedisBudget, FakeClock],
) -> None:
    rb, clock = redis_budget
    mem = MemoryBudget(rpm=1200, tpm=60_000, clock=clock)
    steps: list[tuple[float, str, tuple[Any, ...]]] = [
        (0.0, "reserve", (150,)),
        *[(0.0, "reserve", (100,)) for _ in range(25)],
        (0.01, "correct", (150, 40)),
        (0.2, "reserve", (3000,)),
        (0.0, "observe", (RateLimitSnapshot(limit_requests=840, remaining_tokens=10),)),
        (0.3, "reserve", (0,)),
        (0.0, "pause", (1.5,)),
        (0.5, "reserve", (10,)),
        (-10.0, "reserve", (10,)),
        (30.0, "observe", (RateLimitSnapshot(limit_tokens=1200, remaining_requests=2),)),
        (0.0, "reserve", (1000,)),
        (0.0, "correct", (0, 5000)),
        (1.0, "reserve", (1,)),
    ]
    for dt, op, args in steps:
        clock.t += dt
        got, want = getattr(rb, op)(*args), getattr(mem, op)(*args)
        assert got == pytest.approx(want, abs=1e-9), (op, args)
        for name, value in mem.state.to_fields().items():
            assert getattr(rb.state(), name) == pytest.approx(value, abs=1e-9), (op, name)
    with pytest.raises(BudgetError, match="never fit the limit of 1200 tokens per minute"):
        rb.reserve(1201)


def test_redis_uses_server_time_and_expires_its_key(redis_url: str) -> None:
    import redis

    budget = RedisBudget(redis_url, key="ttl", rpm=60, ttl=30, prefix=f"t{uuid.uuid4().hex}:")
    client = redis.Redis.from_url(redis_url)
    try:
        assert budget.reserve(0) == 0.0
        assert budget.reserve(0) == pytest.approx(1.0, abs=0.05)
        seconds, micros = client.time()
        assert budget.state().ts == pytest.approx(seconds + micros / 1e6, abs=5)
        assert 0 < client.pttl(budget.key) <= 30_000
        assert budget.key.endswith(":ttl")
        assert "RedisBudget('redis://127.0.0.1:" in repr(budget)
    finally:
        client.close()
        budget.close()
    with pytest.raises(BudgetError, match="is closed"):
        budget.reserve(0)


def test_an_unreachable_redis_is_a_one_line_error_without_the_password() -> None:
    port = redis_server._free_port()
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    with pytest.raises(BudgetError) as info:
        open_budget(url, run_dir=Path("."), key="m", rpm=60, tpm=None)
    message = str(info.value)
    assert message.startswith(f"cannot reach the Redis budget at redis://:***@127.0.0.1:{port}/0")
    assert "hunter2" not in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_missing_redis_package_is_a_budget_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(BudgetError, match=r"redis://:\*\*\*@h/0 needs the 'redis' package"):
        RedisBudget("redis://:pw@h/0", key="m")


# ---------------------------------------------------------------------------------------
# The opening burst (--llm-opening-burst), on a manual clock, for every backend


@dataclass
class Opening:
    """Budgets of one backend on one manual clock, and a look at their shared state."""

    make: Any  # (rpm=, tpm=, opening_burst=) -> a budget of this backend
    clock: ManualClock

    def state(self, budget: Any) -> BudgetState:
        return budget.state if isinstance(budget, MemoryBudget) else budget.state()


@pytest.fixture(params=["memory", "file", "redis"])
def opening(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opening]:
    clock = ManualClock(T0)
    made: list[Any] = []

    def make(rpm: int | None = None, tpm: int | None = None, opening_burst: bool = True) -> Any:
        kw: dict[str, Any] = {"rpm": rpm, "tpm": tpm, "opening_burst": opening_burst}
        if request.param == "memory":
            budget: Any = MemoryBudget(clock=clock, **kw)
        elif request.param == "file":
            budget = FileBudget(tmp_path / f"b{len(made)}.json", clock=clock, **kw)
        else:
            url = request.getfixturevalue("redis_url")
            budget = RedisBudget(url, key=f"o-{uuid.uuid4().hex}", clock=clock, **kw)
        made.append(budget)
        return budget

    yield Opening(make, clock)
    for budget in made:
        budget.close()


def answer(
    budget: Any, ticket: Ticket | None, *, rpm: int = 600, requests: int | None, **more: Any
) -> None:
    """Feed the budget an answer to the reservation of ``ticket`` with these headers."""
    budget.observe(
        RateLimitSnapshot(limit_requests=rpm, remaining_requests=requests, ticket=ticket, **more)
    )


def test_the_first_answers_remaining_is_spent_at_once_then_the_steady_rate(
    opening: Opening,
) -> None:
    # Given an unconfigured budget whose first request went alone (the runner's slow start)
    budget, clock = opening.make(), opening.clock
    wait, ticket = budget.reserve_ticket(0)
    assert wait == 0.0 and ticket == Ticket(answered=0.0, answered_tokens=0.0, tokens=0.0)
    # When its answer says a bucket of 600 RPM holds 599 more (a bucket that starts full)
    clock.advance(0.2)
    answer(budget, ticket, requests=599)
    assert opening.state(budget).opening == OPENING_SPENDING
    assert opening.state(budget).opening_granted == 599
    # Then all 599 go at once; the burst earns no refill meanwhile (0.5 s would be 5
    # requests at 10/s), so the 600th waits for one slot of the steady rate
    clock.advance(0.5)
    assert drain(budget, 599) == [0.0] * 599
    assert budget.reserve(0) == pytest.approx(0.1)
    assert opening.state(budget).opening == OPENING_DONE  # spent: the steady budget again
    # and after a long pause of traffic it is the steady budget: a 1 s burst cap
    clock.advance(10)
    assert drain(budget, 11) == pytest.approx([0.0] * 10 + [0.1])


def test_without_the_option_the_first_answer_only_lowers_the_level(opening: Opening) -> None:
    budget = opening.make(opening_burst=False)
    _, ticket = budget.reserve_ticket(0)
    answer(budget, ticket, requests=599)
    assert drain(budget, 11) == pytest.approx([0.0] * 10 + [0.1])  # the 1 s cap, as before
    assert opening.state(budget).opening_granted == 0


def test_reservations_the_server_may_not_have_counted_are_subtracted(opening: Opening) -> None:
    # Given 600 RPM / 60k TPM configured (no slow start) and 100-token requests: A is
    # answered without limit headers before B is reserved; B, C and D are then in flight
    budget = opening.make(rpm=600, tpm=60_000)
    _, a = budget.reserve_ticket(100)
    budget.observe(RateLimitSnapshot(ticket=a))
    budget.reserve(100)  # B
    _, c = budget.reserve_ticket(100)
    budget.reserve(100)  # D
    assert c == Ticket(answered=1.0, answered_tokens=100.0, tokens=100.0)
    # When C's answer comes first, advertising 500 requests and 50,000 tokens
    answer(budget, c, requests=500, limit_tokens=60_000, remaining_tokens=50_000)
    # Then the level is what the server advertised less B (reserved before C, still in
    # flight: the server may have seen C first) and D (reserved after C); A was answered
    # before C was reserved, so the server had counted it
    state = opening.state(budget)
    assert state.requests_level == pytest.approx(498)
    assert state.tokens_level == pytest.approx(49_800)
    assert (state.answered_n, state.answered_tokens) == (2.0, 200.0)


def test_a_pause_ends_the_opening_and_later_answers_raise_nothing(opening: Opening) -> None:
    budget, clock = opening.make(rpm=600), opening.clock
    _, ticket = budget.reserve_ticket(0)
    answer(budget, ticket, requests=599)
    assert drain(budget, 100) == [0.0] * 100
    budget.pause(1.0)  # a 429: whatever the burst had left is dropped
    assert opening.state(budget).opening == OPENING_DONE
    assert budget.reserve(0) == pytest.approx(1.1)
    clock.advance(5)
    _, ticket = budget.reserve_ticket(0)
    answer(budget, ticket, requests=590)  # a second answer: only lowers, never raises
    assert drain(budget, 10) == pytest.approx([0.0] * 9 + [0.1])


def test_only_the_first_answer_may_raise_until_the_budget_idles_a_minute(
    opening: Opening,
) -> None:
    budget, clock = opening.make(rpm=600), opening.clock
    _, first = budget.reserve_ticket(0)
    answer(budget, first, requests=5)  # the server's bucket is not full: nothing to raise
    assert opening.state(budget).opening == OPENING_DONE
    _, second = budget.reserve_ticket(0)
    answer(budget, second, requests=500)  # too late: the opening was the first answer
    assert opening.state(budget).requests_level <= 10
    # a minute without any operation: the server's window is full again, a new opening
    clock.advance(60)
    _, third = budget.reserve_ticket(0)
    assert opening.state(budget).opening == OPENING_ARMED
    answer(budget, third, requests=599)
    assert opening.state(budget).requests_level == pytest.approx(599)


def test_a_burst_is_not_lifted_by_token_give_backs_nor_cut_by_the_cap(opening: Opening) -> None:
    budget = opening.make(tpm=60_000)  # 1000 tokens/s: cap 1000
    _, ticket = budget.reserve_ticket(500)
    budget.settle(
        RateLimitSnapshot(limit_tokens=60_000, remaining_tokens=59_500, ticket=ticket), 500, 100
    )
    # the unused 400 are not given back above the server's figure, nor is it cut to 1000
    assert opening.state(budget).tokens_level == pytest.approx(59_500)
    budget.observe(RateLimitSnapshot(limit_tokens=60_000))  # a re-cap keeps a burst
    assert opening.state(budget).tokens_level == pytest.approx(59_500)
    budget.correct(0, 59_000)  # an overrun takes more
    assert opening.state(budget).tokens_level == pytest.approx(500)
    budget.correct(600, 0)  # below the cap (spent): a give-back refills up to the cap
    assert opening.state(budget).tokens_level == pytest.approx(1000)
    assert opening.state(budget).opening == OPENING_DONE


def test_a_reset_state_raises_nothing_for_an_older_ticket(opening: Opening) -> None:
    budget = opening.make(rpm=600)
    stale = Ticket(answered=7.0, answered_tokens=0.0, tokens=0.0)  # counted before a reset
    budget.reserve(0)
    answer(budget, stale, requests=599)
    assert opening.state(budget).requests_level <= 10


def test_the_option_reaches_every_budget_from_the_config(tmp_path: Path) -> None:
    from pytest_llmbench.config import LLMConfig
    from pytest_llmbench.transport import budget_for

    env = {"LLMBENCH_OPENING_BURST": "true"}
    config = LLMConfig.model_validate({"run_dir": tmp_path}, context={"env": env})
    assert config.opening_burst is True
    assert LLMConfig.model_validate({}, context={"env": {}}).opening_burst is False
    budget = budget_for(config, "m")
    assert isinstance(budget, FileBudget) and budget.limits.opening_burst
    assert repr(budget).endswith("burst_seconds=1.0, opening_burst=True)")
    budget.close()


def test_the_lua_script_runs_the_opening_burst_as_base_does(redis_url: str) -> None:
    clock = ManualClock(T0)
    kw: dict[str, Any] = {"rpm": 600, "tpm": 60_000, "opening_burst": True, "clock": clock}
    rb = RedisBudget(redis_url, key=f"t-{uuid.uuid4().hex}", **kw)
    mem = MemoryBudget(**kw)
    tickets: dict[str, Ticket | None] = {}

    def both(op: str, *args: Any) -> None:
        got, want = getattr(rb, op)(*args), getattr(mem, op)(*args)
        if op == "reserve_ticket":
            assert got == pytest.approx(want), (op, args)
            tickets[str(len(tickets))] = want[1]
        else:
            assert got == want, (op, args)
        for name, value in mem.state.to_fields().items():
            assert getattr(rb.state(), name) == pytest.approx(value, abs=1e-9), (op, name)

    snap = RateLimitSnapshot(
        limit_requests=600, remaining_requests=590, limit_tokens=60_000, remaining_tokens=55_000
    )
    for _ in range(4):
        both("reserve_ticket", 300)
    both("observe", RateLimitSnapshot(ticket=tickets["0"]))
    both("settle", dataclasses.replace(snap, ticket=tickets["2"]), 300, 120)
    both("reserve_ticket", 2000)
    clock.advance(0.7)
    both("correct", 300, 10)
    both("observe", dataclasses.replace(snap, remaining_requests=1, ticket=tickets["1"]))
    for _ in range(30):
        both("reserve_ticket", 2000)
    clock.advance(0.3)
    both("reserve_ticket", 10)
    both("pause", 0.5)
    clock.advance(61)
    both("reserve_ticket", 10)
    both("observe", dataclasses.replace(snap, ticket=tickets["36"]))
    rb.close()


def simulate_full_bucket(
    rpm: int | None, *, clients: int, seconds: float = 8.0
) -> tuple[list[float], int]:
    """Clients behind one opening-burst budget against the simulator's own limiter with a
    bucket that starts full (``burst_seconds=60``, like llmock), with seeded latencies so
    answers come back out of order; returns the admission times and the refusals."""
    rng = random.Random(f"opening:{rpm}:{clients}")
    clock = ManualClock(0.0)
    budget = MemoryBudget(rpm=rpm, opening_burst=True, clock=clock)
    server = ModelLimits(600, None, 60.0, clock, tolerance=0.0)
    admitted: list[float] = []
    refused = 0
    seq = 0
    events: list[tuple[float, int, str, Any]] = []

    def push(t: float, kind: str, data: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    # as the runner does: without configured limits the first request goes alone (its
    # answer is back by 0.45 s), with them every client starts at once
    push(0.0, "ready")
    for _ in range(clients - 1):
        push(0.0 if rpm is not None else 0.5, "ready")
    while events:
        t, _, kind, data = heapq.heappop(events)
        if t > seconds:
            break
        clock.t = t
        if kind == "ready":
            wait, ticket = budget.reserve_ticket(0)
            push(t + wait + rng.uniform(0.001, 0.05), "arrive", ticket)
        elif kind == "arrive":
            ok = server.admit(1).admitted
            if ok:
                admitted.append(t)
            else:
                refused += 1
            snap = RateLimitSnapshot.from_headers(server.headers(), data)
            push(t + rng.uniform(0.01, 0.4), "answer", (ok, snap))
        else:
            ok, snap = data
            budget.observe(snap)
            if not ok:
                budget.pause(1.0)
            push(t, "ready")
    return admitted, refused


@pytest.mark.parametrize(("rpm", "clients"), [(None, 64), (600, 64), (None, 8)])
def test_a_simulated_pool_spends_the_full_bucket_without_a_refusal(
    rpm: int | None, clients: int
) -> None:
    admitted, refused = simulate_full_bucket(rpm, clients=clients)
    peak = max_in_window(admitted, 1.0)
    print(f"{len(admitted)} admitted, {peak} in the busiest second, {refused} refused")
    assert refused == 0
    # more in one second than the steady budget ever lets through: its cap of 10, the 10
    # it refills in a second and the first request alone
    assert peak > 21
