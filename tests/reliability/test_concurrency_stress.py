"""Concurrency: 8 pytest processes share one run directory (its response store and its
rate-limit budget) for a while, against one simulator that enforces the same limit.

Each process runs a suite of its own (``--llm-no-prefetch``: every test calls the API
itself, through the shared budget, and saves its answer in the shared store). They wait
for one another before the first test (a barrier file the test creates once all 8 are
ready), so the whole time is spent together. The number of cases is sized so that the
budget, not the machine, sets the pace: ``rate x seconds`` calls in all.

Afterwards: every case passed with its own answer and is stored exactly once (no record
lost, none duplicated, the store's integrity check passes), and the budget never let
more through than its rate allows plus its burst cap: the simulator, whose bucket has
the same rate and cap, refused (almost) nothing, and no window of the admissions the
processes recorded holds more than ``rate x window + cap``.

The issue asks for 60 s; that alone would take a fifth of the battery's time on two
cores, so the duration is ``RELIABILITY_STRESS_SECONDS`` (default 20; the row says
which was used).
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_llmbench.sim import SimConfig, Simulator
from pytest_llmbench.store import STORE_FILENAME

from ..helpers import wait_for
from ..test_budget import max_in_window, server_refusals
from .harness import Project, Run, answer_key, check_clean, rows

PROCESSES = 8
SECONDS = float(os.environ.get("RELIABILITY_STRESS_SECONDS", "20"))
RPM = 2400  # 40 calls a second in all, 5 per process
BURST_S = 1.0  # the budget's cap: one second of refill, as the simulator's bucket
RATE = RPM / 60
CAP = max(1.0, RATE * BURST_S)
PER_PROCESS = math.ceil(RATE * SECONDS / PROCESSES)

#: every process waits at session start until the test says go, and records, for each
#: answer, when the budget let its request go (its end minus its latency)
CONFTEST = """
import os
import time
from pathlib import Path

import pytest


def pytest_sessionstart(session):
    Path(f"ready-{os.getpid()}").touch()
    go = Path("go")
    while not go.exists():  # the barrier: a real wait on a file the test creates
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def _admissions(request):
    yield
    for sent in getattr(request.node, "admitted", ()):
        with open(f"admitted-{os.getpid()}.txt", "a") as fh:
            fh.write(f"{sent!r}\\n")
"""

SUITE = """
import time

import pytest


@pytest.mark.llmbench(dataset="{dataset}", temperatures=[0.0], id="qid")
def test_p(case, llm, request):
    r = llm.generate_response(case["question"], max_tokens=8)
    request.node.admitted = [time.time() - r.latency]
    assert r.text == case["answer"], (case["qid"], r.text)
"""


def test_concurrency(tmp_path: Path, survives: Callable[..., Any]) -> None:
    suites = {f"p{i}": rows(PER_PROCESS, f"p{i}_") for i in range(PROCESSES)}
    every = [r for items in suites.values() for r in items]
    settings = {
        "seed": 19,
        "answer_key": answer_key(every),
        "p_correct": 1.0,
        "rpm": RPM,
        "burst_seconds": BURST_S,
        "latency": {"kind": "fixed", "mean": 0.02},
    }
    with Simulator(SimConfig.model_validate(settings), port=0) as sim:
        project = Project(tmp_path / "project", sim)
        (project.path / "conftest.py").write_text(CONFTEST, encoding="utf-8")
        for name, items in suites.items():
            project.dataset(f"{name}.jsonl", items)
            project.suite(f"test_{name}", SUITE, f"{name}.jsonl")
        common = ["-q", "--llm-no-prefetch", "--llm-rpm", str(RPM)]
        common += ["--llm-burst-seconds", str(BURST_S)]

        # Given 8 processes sharing the run directory, started together
        runs: list[Run] = []
        try:
            for name in suites:
                runs.append(project.start(f"test_{name}.py", *common, f"--llm-report={name}.json"))
            ready = wait_for(
                lambda: (
                    len(list(project.path.glob("ready-*"))) == PROCESSES
                    or next((r for r in runs if not r.alive()), None)
                ),
                "all processes ready",
                timeout=120,
            )
            assert ready is True, f"a process ended before the start:\n{ready.output()}"
            (project.path / "go").touch()
            # When they call the API through the one budget and save into the one store
            ends = [run.wait() for run in runs]
        finally:
            for run in runs:
                if run.alive():
                    run.kill_all()
        stats = sim.stats()

    # Then every case passed with its own answer, stored exactly once
    cases = PROCESSES * PER_PROCESS
    for end in ends:
        check_clean(end.output)
        assert end.returncode == 0, end.output[-3000:]
    passed = sum(project.report(f"{name}.json")["totals"]["passed"] for name in suites)
    assert passed == cases
    stored = project.stored_hashes()
    assert stats["chat_answered"] == cases and len(stored) == cases
    assert stats["duplicate_bodies"] == 0, stats["duplicate_body_hashes"]
    with project.store() as store:
        nodeids = store.nodeids()
    assert nodeids == {
        f"test_{name}.py::test_p[{r['qid']}-t0]" for name, items in suites.items() for r in items
    }
    assert integrity(project.run_dir / STORE_FILENAME) == "ok"

    # and the budget never let through more than its rate plus its burst cap
    times = sorted(
        float(line)
        for path in project.path.glob("admitted-*.txt")
        for line in path.read_text(encoding="utf-8").split()
    )
    assert len(times) == cases
    worst = 0.0
    for window in (0.25, 0.5, 1.0, 2.0, 5.0):
        # 0.05 s of slack: an admission is recorded a moment after it happened
        allowed = math.floor(RATE * (window + 0.05) + CAP) + 1
        seen = max_in_window(times, window)
        assert seen <= allowed, (window, seen, allowed)
        worst = max(worst, seen / allowed)
    span = times[-1] - times[0]
    assert len(times) <= RATE * span + CAP + 1
    # the simulator's bucket (same rate and cap, 0.05 s of tolerance) judges the arrivals:
    # a process descheduled between its admission and its send (8 processes on 2 cores)
    # bunches up with later ones, so a rare refusal is the network's, not the budget's
    refused = stats["rate_limit_429"]
    assert refused <= 0.01 * cases, refused
    # the same bucket judging the admissions as the processes recorded them
    would_refuse = server_refusals(times, RPM, CAP, times[0])
    assert would_refuse <= 0.01 * cases, would_refuse
    survives(
        item="Concurrency",
        cases=cases,
        faults=f"{PROCESSES} processes x {SECONDS:g} s on one store and one budget ({RPM} RPM)",
        retries=sum(project.report(f"{name}.json")["totals"]["retries"] for name in suites),
        paid_twice=stats["duplicate_bodies"],
        lost=cases - len(stored),
        outcome=(
            f"{cases} answers stored once each; {len(times)} admissions in {span:.1f} s "
            f"({len(times) / span:.1f}/s, limit {RATE:g}/s + burst {CAP:g}); busiest window "
            f"at {worst:.0%} of rate x window + cap; a bucket of that rate and cap refuses "
            f"{would_refuse} of them, the server's refused {refused} on arrival"
        ),
    )


def integrity(path: Path) -> str:
    """SQLite's own integrity check of the store."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()
