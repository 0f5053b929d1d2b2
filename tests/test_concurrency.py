"""The adaptive limit on requests in flight (``concurrency.py``).

A server that queues instead of refusing (llama.cpp answers one request at a time, or
``--parallel N``) is the simulator with ``parallelism``: the fetch must settle near the
server's own parallelism, so latency stays near a lone request's and throughput at the
server's capacity; a server that does not queue must still get ``--llm-concurrency`` in
flight. The runs are real pytest processes (``runpytest_subprocess``) against the
built-in simulator, read through the run's JSON report. The rule itself is checked on
:class:`Concurrency` with made-up latencies. No sleep stands in for a wait.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from pytest_llmbench.concurrency import START, Concurrency

SUITE = """
import pytest

DATA = {data}

@pytest.mark.llmbench(dataset=DATA, temperatures=[0.0], id="id")
def test_q(case, llm):
    r = llm.generate_response(case["question"], max_tokens=5)
    assert r.ok and r.text
"""


def fetch_run(pytester: pytest.Pytester, n: int, sim: dict[str, Any], *args: str) -> dict[str, Any]:
    """Run a suite of ``n`` one-call cases on the simulator; returns the JSON report."""
    data = [{"id": f"q{i}", "question": f"What is item {i}?"} for i in range(n)]
    pytester.makepyfile(test_suite=SUITE.format(data=json.dumps(data)))
    (pytester.path / "sim.json").write_text(json.dumps(sim), encoding="utf-8")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "--llm-sim", "--llm-sim-config=sim.json",
        "--llm-no-overlap", "--llm-report", "r.json", *args,
    )  # fmt: skip
    result.assert_outcomes(passed=n)
    report: dict[str, Any] = json.loads((pytester.path / "r.json").read_text("utf-8"))
    report["_stdout"] = result.stdout.str()
    return report


LATENCY = 0.2  # one request alone, in the simulator
QUEUEING = {"latency": {"kind": "fixed", "mean": LATENCY}, "parallelism": 2}


def test_a_server_that_queues_gets_about_its_own_parallelism(pytester: pytest.Pytester) -> None:
    # Given a server that answers 2 requests at a time (0.2 s each) and queues the rest,
    # and the default --llm-concurrency 64
    report = fetch_run(pytester, 60, QUEUEING)
    prefetch, totals = report["run"]["prefetch"], report["totals"]
    # Then the fetch settled near the server's parallelism, not at 64
    assert prefetch["fetched"] == 60 and prefetch["concurrency_adaptive"] is True
    assert 1 <= prefetch["concurrency"] <= 4, prefetch
    # And a request waited little in the server's queue: the median latency is within 2x of
    # a lone request's (at 64 in flight it would be about 32 times that, 6 s)
    assert totals["latency_p50"] <= 2 * LATENCY, totals
    # And throughput stayed near the server's capacity: 60 x 0.2 s / 2 = 6 s at best, from
    # the moment the first request could go (fetch_s also counts the planning before it)
    assert prefetch["fetch_s"] - prefetch["plan_lead_s"] <= 1.5 * 60 * LATENCY / 2, prefetch
    # And the summary says what it settled on
    assert f"concurrency {prefetch['concurrency']} (adaptive, max 64)" in report["_stdout"]


def test_fixed_concurrency_keeps_the_old_flood(pytester: pytest.Pytester) -> None:
    # Given the same server, with the adaptive limit turned off
    report = fetch_run(pytester, 60, QUEUEING, "--llm-concurrency-fixed")
    prefetch, totals = report["run"]["prefetch"], report["totals"]
    # Then all 60 were in flight at once, and most of each latency was the queue's
    assert prefetch["concurrency"] == 64 and prefetch["concurrency_adaptive"] is False
    assert totals["latency_p50"] > 5 * LATENCY, totals
    assert "concurrency 64 (fixed)" in report["_stdout"]


def test_a_server_that_does_not_queue_gets_the_configured_concurrency(
    pytester: pytest.Pytester,
) -> None:
    # Given a server without a parallelism limit (0.3 s a request) and 200 requests
    report = fetch_run(pytester, 200, {"latency": {"kind": "fixed", "mean": 0.3}})
    prefetch = report["run"]["prefetch"]
    # Then the limit grew to --llm-concurrency, and the fetch took a few seconds, not the
    # 200 x 0.3 / 2 = 30 s of a limit stuck low (64 in flight from the start: about 1 s)
    assert prefetch["concurrency"] == 64, prefetch
    assert prefetch["fetch_s"] - prefetch["plan_lead_s"] < 6.0, prefetch


# -- the rule, on made-up latencies ---------------------------------------------------------


def drive(gate: Concurrency, latency_of: Any, windows: int) -> list[int]:
    """Run ``windows`` windows on ``gate``, every request answered after ``latency_of(n)``
    seconds with n in flight (all slots filled); returns the limit after each window."""

    async def main() -> list[int]:
        for _ in range(windows):
            before = len(gate.history)
            while len(gate.history) == before:
                tokens = [await gate.acquire() for _ in range(gate.limit)]
                n = gate.in_flight
                for token in tokens:
                    gate.release(token, latency_of(n))
        return gate.history

    return asyncio.run(main())


def test_the_limit_settles_on_a_queueing_servers_parallelism() -> None:
    # Given a server with 3 slots: latency grows with the load beyond 3 in flight
    gate = Concurrency(64)
    history = drive(gate, lambda n: 0.2 * max(1.0, n / 3), 12)
    # Then the limit probed unloaded, jumped to the start, fell back to 3 and stayed there,
    # probing upward now and then (4 is within the tolerance, 5 is not)
    assert history[:2] == [START, 3], history
    assert all(3 <= limit <= 5 for limit in history[1:]), history
    assert gate.settled == 3


def test_the_limit_doubles_to_the_maximum_when_latency_does_not_grow() -> None:
    gate = Concurrency(64)
    assert drive(gate, lambda n: 0.2, 5) == [START, 16, 32, 64, 64]
    assert gate.settled == 64


def test_a_fixed_gate_and_the_bounds() -> None:
    assert Concurrency(64, adaptive=False).limit == 64
    assert drive(Concurrency(1), lambda n: 0.2, 3) == [1, 1, 1]
    small = Concurrency(5)
    assert drive(small, lambda n: 0.2, 3) == [5, 5, 5]
    # a server with one slot (latency grows with every request in flight) brings the limit
    # down to 1, never below, and a probe of 2 now and then goes back to 1
    one = drive(Concurrency(64), lambda n: 0.2 * n, 12)
    assert min(one) == 1 and max(one[1:]) == 2 and one.count(1) >= 8, one


def test_failures_and_stale_answers_give_no_sample() -> None:
    async def main() -> None:
        gate = Concurrency(64)
        for _ in range(3):
            gate.release(await gate.acquire(), None)  # failed: no sample
        assert gate.history == []
        for _ in range(3):
            gate.release(await gate.acquire(), 0.2)
        assert gate.history == [START]
        old = await gate.acquire()
        tokens = [await gate.acquire() for _ in range(START - 1)]  # the limit is used
        for token in tokens[:4]:
            gate.release(token, 0.2)  # a window of START / 2: slow start doubles
        assert gate.history == [START, 2 * START]
        gate.release(old, 10.0)  # sent under the previous limit: not counted
        for token in tokens[4:]:
            gate.release(token, 0.2)
        assert gate.history == [START, 2 * START] and gate.in_flight == 0

    asyncio.run(main())


def test_waiters_go_in_order_and_a_cancelled_one_passes_its_turn_on() -> None:
    async def main() -> list[str]:
        gate, went = Concurrency(64), []  # the limit is 1 until its first window

        async def one(name: str) -> None:
            token = await gate.acquire()
            went.append(name)
            gate.release(token, None)

        first = await gate.acquire()
        tasks = {name: asyncio.create_task(one(name)) for name in "abc"}
        await asyncio.sleep(0)  # a turn of the loop: the three queue up (no time passes)
        gate.release(first, None)  # wakes "a", which is cancelled before it runs
        tasks["a"].cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert gate.in_flight == 0
        return went

    assert asyncio.run(main()) == ["b", "c"]
