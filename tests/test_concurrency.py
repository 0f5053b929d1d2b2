"""The adaptive limit on requests in flight (``concurrency.py``).

A server that queues instead of refusing (llama.cpp answers one request at a time, or
``--parallel N``) is the simulator with ``parallelism``: the fetch must settle near the
server's own parallelism, so latency stays near a lone request's and throughput at the
server's capacity; a server that does not queue must still get ``--llm-concurrency`` in
flight. Those runs are real pytest processes against the simulator (in the test's
process, over HTTP), read through the run's JSON report and summary. The rule itself is
checked on :class:`AdaptiveLimit` with made-up samples, and the gate on a manual clock: no
sleep stands in for a wait.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from pytest_llmbench.concurrency import HOLD, AdaptiveLimit, Concurrency, Sample, Slot
from pytest_llmbench.sim import Simulator

from .helpers import FAKE_KEY, ManualClock

SUITE = """
import pytest

DATA = {data}

@pytest.mark.llmbench(dataset=DATA, temperatures=[0.0], id="id")
def test_q(case, llm):
    r = llm.generate_response(case["question"], max_tokens=5)
    assert r.ok and r.text
"""


@pytest.fixture
def api(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """The simulator in this process, for the runs' subprocesses to reach over HTTP."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    return sim


def alone_latency(sim: Simulator) -> float:
    """The median latency of 3 requests sent one at a time."""
    client = openai.OpenAI(api_key=FAKE_KEY, base_url=sim.base_url, max_retries=0)
    took = []
    for i in range(3):
        started = time.perf_counter()
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": str(i)}]
        )
        took.append(time.perf_counter() - started)
    client.close()
    sim.reset_stats()
    return statistics.median(took)


def fetch_run(pytester: pytest.Pytester, n: int, *args: str, workers: str = "2") -> dict[str, Any]:
    """Run a suite of ``n`` one-call cases; returns the JSON report, with the summary's
    ``llmbench pacing:`` line as ``_pacing``."""
    data = [{"id": f"q{i}", "question": f"What is item {i}?"} for i in range(n)]
    pytester.makepyfile(test_suite=SUITE.format(data=json.dumps(data)))
    result = pytester.runpytest_subprocess(
        "-n", workers, "-p", "no:cacheprovider", "-p", "no:randomly", "--llm-no-overlap",
        "--llm-report", "r.json", *args,
    )  # fmt: skip
    result.assert_outcomes(passed=n)
    report: dict[str, Any] = json.loads((pytester.path / "r.json").read_text("utf-8"))
    pacing = [ln for ln in result.stdout.lines if ln.startswith("llmbench pacing:")]
    report["_pacing"] = pacing[0] if pacing else ""
    return report


SERVICE = 0.15  # seconds a request takes in the simulator
QUEUEING = {"latency": {"kind": "fixed", "mean": SERVICE}, "parallelism": 2}


def test_a_server_that_queues_gets_about_its_own_parallelism(
    pytester: pytest.Pytester, api: Simulator
) -> None:
    # Given a server that answers 2 requests at a time (0.15 s each) and queues the rest,
    # and the default --llm-concurrency 64
    api.configure(**QUEUEING)
    alone = alone_latency(api)
    # (100 requests: enough windows to come back down from an overshoot that a loaded
    # machine's own delays can cause)
    report = fetch_run(pytester, 100)
    prefetch, totals = report["run"]["prefetch"], report["totals"]
    # Then the fetch settled near the server's parallelism, not at 64
    assert prefetch["fetched"] == 100 and prefetch["concurrency_adaptive"] is True
    assert 2 <= prefetch["concurrency"] <= 4, (
        prefetch,
        totals,
        alone,
        api.stats()["peak_in_flight"],
    )
    assert api.stats()["peak_in_flight"] <= 16
    # And a request waited little in the server's queue: the median latency is within 2x
    # of a lone request's (at 64 in flight it is about 12 times that: the next test)
    assert totals["latency_p50"] <= 2 * alone, (totals, alone)
    # And the summary says what it settled at
    assert report["_pacing"] == (
        "llmbench pacing: not paced: the server sends no rate-limit headers; concurrency "
        f"alone bounds it: settled at {prefetch['concurrency']} in flight (adaptive, at "
        "most --llm-concurrency 64)"
    )


def test_fixed_concurrency_keeps_the_old_flood(pytester: pytest.Pytester, api: Simulator) -> None:
    # Given the same server, with the adaptive limit turned off
    api.configure(**QUEUEING)
    alone = alone_latency(api)
    report = fetch_run(pytester, 40, "--llm-concurrency-fixed")
    prefetch, totals = report["run"]["prefetch"], report["totals"]
    # Then all 40 were in flight at once, and most of each latency was the queue's
    assert prefetch["concurrency"] == 64 and prefetch["concurrency_adaptive"] is False
    assert api.stats()["peak_in_flight"] > 16  # the queue held many more than the slots
    assert totals["latency_p50"] > 4 * alone, (totals, alone)
    assert report["_pacing"].endswith("alone bounds it: 64 in flight (--llm-concurrency-fixed)")


def test_a_server_that_refuses_without_saying_its_rate_brings_the_limit_down(
    pytester: pytest.Pytester, api: Simulator
) -> None:
    # Given a server that enforces 1,200 requests a minute (20 a second) and refuses the
    # rest with a 429 and a retry-after, but sends no x-ratelimit-* header, and no limit
    # configured
    api.configure(rpm=1200, rate_limit_headers=False)
    # (one process: the fetch's timing is what is measured, and it shares 2 cores with
    # the rest of the suite; with 2 workers as well it settled at 8 once in CI)
    report = fetch_run(pytester, 150, workers="0")
    prefetch, stats = report["run"]["prefetch"], api.stats()
    # Then the refusals brought the limit down from the 64 the run would otherwise reach
    # against a server answering at once (to 2-4 here, 8 once under load), and every
    # request went through the fetch
    assert prefetch["fetched"] == 150 and prefetch["failed"] == 0, prefetch
    assert prefetch["concurrency"] <= 8, prefetch
    # And a refused request did not fight the whole flight for each freed place: about
    # one refusal per answer beyond the first second's 20, not several
    assert 0 < stats["rate_limit_429"] <= 150, stats["rate_limit_429"]


def test_a_server_that_does_not_queue_gets_the_configured_concurrency(
    pytester: pytest.Pytester, api: Simulator
) -> None:
    # Given a server without a parallelism limit (0.3 s a request), 100 requests and
    # --llm-concurrency 8: 27 answers a second at most, which a busy 2-core machine can
    # take (a client starved of CPU gains nothing from more in flight: its own event loop
    # is then the queue, and the limit rightly stays lower); one process, no xdist, as
    # the fetch runs in the controlling process alone anyway
    api.configure(latency={"kind": "fixed", "mean": 0.3})
    report = fetch_run(pytester, 100, "--llm-concurrency", "8", workers="0")
    # Then the limit grew to --llm-concurrency and stayed there, and the summary says so
    assert api.stats()["peak_in_flight"] == 8
    assert report["run"]["prefetch"]["concurrency"] == 8, report["run"]["prefetch"]
    assert "settled at 8 in flight (adaptive, at most --llm-concurrency 8)" in report["_pacing"]


def test_a_run_paced_by_a_rate_limit_starts_at_what_the_rate_needs(
    pytester: pytest.Pytester, api: Simulator
) -> None:
    # Given a server that allows 1,200 requests a minute (20 a second, said in its
    # x-ratelimit headers) and answers in 0.5 s: the rate needs 10 in flight
    api.configure(rpm=1200, latency={"kind": "fixed", "mean": 0.5})
    report = fetch_run(pytester, 60)
    prefetch = report["run"]["prefetch"]
    # Then the first answer's headers set the start (twice the 10), the budget paced the
    # rest, and the limit never came down to where it would hold the rate back
    assert 10 <= prefetch["concurrency"] <= 64, prefetch
    assert report["_pacing"].startswith(
        "llmbench pacing: paced by the server's x-ratelimit headers; concurrency settled at "
    ), report["_pacing"]


# -- the rule, on made-up samples -----------------------------------------------------------

S = 0.2  # a lone request's latency, in the made-up servers
Server = Callable[[int], Sample]  # the answer a server gives with ``limit`` in flight


def queueing(slots: int) -> Server:
    """A server with ``slots`` slots that queues the rest: with n in flight a request
    waits for n / slots service times, so its throughput is flat beyond ``slots``."""
    return lambda n: Sample(S * max(1.0, n / slots), n)


def drive(rule: AdaptiveLimit, server: Server, windows: int) -> list[int]:
    """Feed ``rule`` answers from ``server`` at its current limit until ``windows``
    windows closed; returns the limit after each."""
    after: list[int] = []
    while len(after) < windows:
        if rule.add(server(rule.limit)):
            after.append(rule.limit)
    return after


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 8])
def test_the_limit_settles_on_a_queueing_servers_parallelism(slots: int) -> None:
    rule = AdaptiveLimit(64)
    history = drive(rule, queueing(slots), 30)
    # Then the limit doubled while throughput rose, overshot once (latency up, throughput
    # flat), came back to the server's slots by Little's law, and stayed there, probing
    # one step up now and then (latency up again, nothing gained: back)
    assert rule.settled == slots
    top = max(history)
    # the overshoot: one doubling past the first limit that reached the slots
    assert top == 2 * 2 ** math.ceil(math.log2(slots)), history
    later = history[history.index(top) + 1 :]
    assert set(later) == {slots, slots + max(1, slots // 4)}, history
    assert later.count(slots) >= 3 * later.count(slots + max(1, slots // 4)), history


def test_latency_that_rises_with_throughput_does_not_bring_the_limit_down() -> None:
    # Given a server that does not queue, on a client whose CPU makes latency grow with
    # the load: 3 % a request in flight, so at 64 it is 2.8 times a lone request's (far
    # beyond the tolerance: a rule on latency alone backs off), yet throughput still rises
    # with every doubling (64 / 2.92 > 32 / 1.96)
    rule = AdaptiveLimit(64)
    history = drive(rule, lambda n: Sample(S * (1 + 0.03 * n), n), 10)
    # Then the limit doubles to the maximum and stays there
    assert history == [2, 4, 8, 16, 32, 64, 64, 64, 64, 64]


def test_a_run_paced_by_the_budget_never_shrinks() -> None:
    rule = AdaptiveLimit(64)
    drive(rule, lambda n: Sample(S, n), 5)  # no queue: 2, 4, 8, 16, 32
    assert rule.limit == 32

    # When the budget paces the run (every request waits in it as long as it is out)
    # while latency rises and throughput stays what the rate limit allows
    def paced(n: int) -> Sample:
        latency = S * (1 + 0.05 * n)
        return Sample(latency, 20 * latency, wait=latency)

    # Then the limit stays where it is: concurrency is not what bounds the run
    assert drive(rule, paced, 8) == [32] * 8


def test_a_known_rate_limit_starts_where_it_needs_to() -> None:
    rule = AdaptiveLimit(64)
    rule.rate = 50.0  # requests per second (3,000 per minute)
    # the first answer alone decides: 50/s x 0.5 s = 25 in flight, taken twice
    assert rule.window_size == 1
    assert rule.add(Sample(0.5, 1)) and rule.limit == 50
    small = AdaptiveLimit(64)
    small.rate = 1.0
    assert small.add(Sample(0.2, 1)) and small.limit == 2  # never below the doubling


def test_a_step_down_that_lost_throughput_is_undone() -> None:
    # Given a server that does not queue: doubling to 64 gained nothing over 32 there
    # (the client's CPU is full), so the limit came down to 32 ...
    rule = AdaptiveLimit(64)
    history = drive(rule, lambda n: Sample(S if n <= 32 else 2 * S, n), 7)
    assert history == [2, 4, 8, 16, 32, 64, 32]
    # ... and then the machine got busier: at 32 the latency doubled too, and throughput
    # halved (64 in flight gave 160 answers a second, 32 now give 80)
    after = drive(rule, lambda n: Sample(2 * S, n), 1)
    # Then the step down is undone, and the limit held there a while
    assert after == [64] and rule.hold == HOLD


def test_one_window_that_gained_nothing_is_confirmed_before_a_step_down() -> None:
    rule = AdaptiveLimit(64)
    drive(rule, lambda n: Sample(S, n), 3)  # 2, 4, 8
    # When the first answers at 8 are slow (no more throughput than at 4), the window
    # runs on to twice its size
    assert not any(rule.add(Sample(2 * S, 8)) for _ in range(3))
    assert rule.limit == 8 and len(rule.samples) == 3
    # and the rest of it, at the usual speed, shows the gain: the limit still doubles
    assert not rule.add(Sample(S, 8)) and not rule.add(Sample(S, 8))
    assert rule.add(Sample(S, 8)) and rule.limit == 16


def test_the_bounds() -> None:
    assert drive(AdaptiveLimit(1), lambda n: Sample(S, n), 3) == [1, 1, 1]
    assert drive(AdaptiveLimit(5), lambda n: Sample(S, n), 4) == [2, 4, 5, 5]
    assert AdaptiveLimit(64).settled == 1  # nothing measured yet: the start


# -- the gate, on a manual clock ------------------------------------------------------------


async def alone(gate: Concurrency, clock: ManualClock, latency: float) -> None:
    """One request sent and answered with nothing else in flight."""
    slot = await gate.acquire()
    gate.sent(slot)
    clock.advance(latency)
    gate.release(slot, latency)


def test_a_sample_counts_what_was_in_flight_while_the_request_was_out() -> None:
    async def main() -> tuple[Concurrency, list[Sample]]:
        clock = ManualClock()
        gate = Concurrency(64, clock=clock)
        for _ in range(3):
            await alone(gate, clock, S)  # the first window, alone: the limit becomes 2
        assert gate.limit == 2 and gate.rule.baseline == pytest.approx(S)
        window = gate.rule.samples  # the samples of the window at 2, as they come
        a, b = await gate.acquire(), await gate.acquire()  # the limit filled
        gate.sent(a)
        gate.sent(b)
        clock.advance(S)
        gate.release(a, S)  # acquired before the limit filled: no sample
        gate.release(b, S)
        assert [s.in_flight for s in window] == [2.0]
        # When the next two go in the same instant, one after the other, and come back
        # together: the first saw only itself at the server when it was sent
        c = await gate.acquire()
        gate.sent(c)
        assert gate.at_server == 1
        d = await gate.acquire()
        gate.sent(d)
        clock.advance(S)
        gate.release(c, S)
        gate.release(d, S)
        return gate, window

    # Then each saw 2 in flight while it was out: 2 / 0.2 s = 10 answers a second, twice
    # what one alone gave, so the limit doubled
    gate, window = asyncio.run(main())
    assert [s.in_flight for s in window] == [2.0, 2.0, 2.0]
    assert window[1].throughput == pytest.approx(10.0) and gate.limit == 4


def test_the_wait_before_sending_is_the_budgets_and_failures_give_no_sample() -> None:
    async def main() -> None:
        clock = ManualClock()
        gate = Concurrency(64, clock=clock)
        for _ in range(2):
            slot = await gate.acquire()
            clock.advance(0.5)  # held by the budget
            gate.sent(slot)
            clock.advance(S)
            gate.release(slot, S)
        # the first request's wait is starting up (the budget's file, the first
        # connection), not a rate limit: it does not count
        assert gate.rule.samples == [Sample(S, 1.0, 0.0), Sample(S, 1.0, 0.5)]
        failed = await gate.acquire()  # sent, and no answer came
        gate.sent(failed)
        clock.advance(S)
        gate.release(failed, None)
        gate.release(await gate.acquire(), None)  # never sent: the run stopped
        assert len(gate.rule.samples) == 2 and gate.in_flight == gate.at_server == 0

    asyncio.run(main())


def test_answers_of_requests_sent_under_an_older_limit_give_no_sample() -> None:
    async def main() -> None:
        clock = ManualClock()
        gate = Concurrency(64, clock=clock)
        for _ in range(3):
            await alone(gate, clock, S)
        slots: list[Slot] = [await gate.acquire() for _ in range(2)]  # at 2
        for slot in slots:
            gate.sent(slot)
        clock.advance(S)
        for slot in slots:
            gate.release(slot, S)
        c, d = await gate.acquire(), await gate.acquire()
        gate.sent(c)
        gate.sent(d)
        clock.advance(S)
        gate.release(c, S)
        late = await gate.acquire()
        gate.sent(late)
        clock.advance(S)
        gate.release(d, S)  # the window's third answer: the limit doubles...
        assert gate.limit == 4 and gate.rule.samples == []
        gate.release(late, S)  # ...and this one, sent under the old limit, is no sample
        assert gate.rule.samples == [] and gate.in_flight == 0

    asyncio.run(main())


def test_when_a_rising_limit_wakes_several_waiters_only_the_one_that_fills_it_counts() -> None:
    """The slots a raised limit hands out at once are granted in order: the first ones
    are sent behind the old, shorter queue, and their short latencies against the new
    count would overstate the throughput (a server with 2 slots then looked like it
    gained at 4 and 8, and the limit settled at 8: the CI failure of the test above)."""

    async def main() -> list[bool]:
        clock = ManualClock()
        gate = Concurrency(64, clock=clock)
        for _ in range(3):
            await alone(gate, clock, S)  # the first window: the limit goes to 2
        first, filling = await gate.acquire(), await gate.acquire()
        assert (first.counts, filling.counts) == (False, True)
        waiting = [asyncio.create_task(gate.acquire()) for _ in range(6)]
        await asyncio.sleep(0)  # all six queue behind the full limit
        gate.sent(first)
        gate.sent(filling)
        clock.advance(S)
        gate.release(first, S)  # no sample; its slot goes to the first waiter
        at_two = [filling, await waiting.pop(0)]
        gate.release(at_two[0], S)  # sample 1; a slot to the next waiter
        at_two.append(await waiting.pop(0))
        for slot in at_two[1:]:
            gate.sent(slot)
        clock.advance(S)
        gate.release(at_two[1], S)  # sample 2
        at_two.append(await waiting.pop(0))
        gate.release(at_two[2], S)  # sample 3 closes the window: the limit doubles
        assert gate.limit == 4 and gate.in_flight == 4  # 1 held, 3 handed out at once
        woken = [await task for task in waiting]
        return [slot.counts for slot in woken]

    # of the three woken at 4, only the one that filled it counts
    assert asyncio.run(main()) == [False, False, True]


def test_a_refusal_halves_the_limit_once_per_generation() -> None:
    async def main() -> None:
        clock = ManualClock()
        gate = Concurrency(64, clock=clock)
        gate.rule.limit = 16
        slots = [await gate.acquire() for _ in range(16)]
        for slot in slots:
            gate.sent(slot)
        gate.refused(slots[0])  # the first refusal of a flight halves the limit...
        assert gate.limit == 8 and gate.rule.hold == HOLD and not gate.rule.slow_start
        for slot in slots[1:]:
            gate.refused(slot)  # ...the others of the same flight are the same overload
        assert gate.limit == 8
        for slot in slots[7:]:
            gate.release(slot, None)
        again = await asyncio.wait_for(gate.acquire(), 1)  # granted after the change:
        gate.sent(again)  # its refusal halves again
        gate.refused(again)
        assert gate.limit == 4 and gate.rule.queue_at == 8

    asyncio.run(main())


def test_a_refusal_leaves_a_known_rate_or_a_fixed_gate_alone() -> None:
    async def main() -> tuple[int, int]:
        paced, fixed = Concurrency(64, clock=ManualClock()), Concurrency(8, adaptive=False)
        paced.rate_limit(600)  # the budget paces the run: a 429 is not the limit's doing
        for gate in (paced, fixed):
            slot = await gate.acquire()
            gate.sent(slot)
            gate.refused(slot)
            gate.release(slot, None)
        return paced.limit, fixed.limit

    assert asyncio.run(main()) == (10, 8)


def test_a_fixed_gate_keeps_its_maximum() -> None:
    async def main() -> Concurrency:
        gate = Concurrency(3, adaptive=False, clock=ManualClock())
        slots = [await gate.acquire() for _ in range(3)]
        for slot in slots:
            gate.sent(slot)
            gate.release(slot, S)
        return gate

    gate = asyncio.run(main())
    assert gate.limit == gate.settled == 3 and gate.rule.samples == []
    assert not gate.wants_rate


def test_waiters_go_in_order_and_a_cancelled_one_passes_its_turn_on() -> None:
    async def main() -> list[str]:
        gate, went = Concurrency(64, clock=ManualClock()), []  # the limit is 1 at first

        async def one(name: str) -> None:
            slot = await gate.acquire()
            went.append(name)
            gate.release(slot, None)

        first = await gate.acquire()
        tasks = {name: asyncio.create_task(one(name)) for name in "abc"}
        await asyncio.sleep(0)  # a turn of the loop: the three queue up (no time passes)
        gate.release(first, None)  # wakes "a", which is cancelled before it runs
        tasks["a"].cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert gate.in_flight == 0
        return went

    assert asyncio.run(main()) == ["b", "c"]


def test_a_waiting_request_is_not_overtaken_by_workers_coming_back() -> None:
    """First come, first served: a request that had to wait gets the next free slot,
    even when the worker that freed it asks again at once (the starvation that kept one
    test waiting until the end of a 2,000-request fetch)."""

    async def main() -> list[str]:
        gate = Concurrency(2, adaptive=False)
        order: list[str] = []
        held = [await gate.acquire(), await gate.acquire()]

        async def late() -> None:
            slot = await gate.acquire()
            order.append("waiter")
            gate.release(slot, None)

        waiting = asyncio.create_task(late())
        await asyncio.sleep(0)  # it queues
        for _ in range(3):  # a worker frees its slot and asks again straight away
            gate.release(held.pop(), None)
            held.append(await gate.acquire())  # no yield to the loop when a slot is free
            order.append("worker")
        for slot in held:
            gate.release(slot, None)
        await asyncio.wait_for(waiting, 1)
        return order

    assert asyncio.run(main())[0] == "waiter"


def test_a_rate_limit_known_before_the_first_request_starts_at_a_seconds_worth() -> None:
    configured = Concurrency(64)
    configured.rate_limit(3000)  # --llm-rpm 3000: 50 a second
    assert configured.limit == 50
    capped = Concurrency(16)
    capped.rate_limit(3000)
    assert capped.limit == 16
    fixed = Concurrency(64, adaptive=False)
    fixed.rate_limit(60)
    assert fixed.limit == 64

    async def learned() -> int:
        gate = Concurrency(64)
        slot = await gate.acquire()
        gate.sent(slot)  # the first request is out: a rate from its answer's headers
        gate.rate_limit(3000)  # leaves the start to that answer's latency (start())
        return gate.limit

    assert asyncio.run(learned()) == 1
