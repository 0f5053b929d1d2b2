"""Storms: the server's rate limit cut to a tenth in the middle of a run, and a server
that enforces a limit but sends no rate-limit headers.

Both runs use ``-n 2`` against a simulator that enforces the limit (429 with
``retry-after`` beyond it, like the API). The cut comes when a third of the answers
have arrived (the simulator's count, watched by the test): from then on the server
advertises the lower limit in its ``x-ratelimit-*`` headers. Without headers the client
learns nothing before its first 429s.

Each run must slow to the limit, finish, and lose nothing: every case passes with its
own answer, each answer is stored and paid for once. The figures (requests, 429s,
answers per second before and after the cut, as the simulator counted them) are
printed, not asserted: speed is measured in ``benchmarks/``, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_llmbench.sim import SimConfig, Simulator

from ..helpers import wait_for
from .harness import ONE_CALL, Project, answer_key, check_clean, rows

N = 150
RPM = 6000  # 100 requests a second: more than the fetch reaches on a busy 2-core machine


def answer_rate(per_second: dict[str, int], first: int, last: int) -> float:
    """Answers per second the simulator counted in the whole seconds ``first..last``
    (epoch seconds, both included)."""
    seconds = [int(k) for k in per_second if first <= int(k) <= last]
    if not seconds:
        return 0.0
    return sum(per_second[str(s)] for s in seconds) / (max(seconds) - min(seconds) + 1)


def check_nothing_lost(project: Project, output: str, returncode: int) -> dict[str, Any]:
    check_clean(output)
    assert returncode == 0, output[-3000:]
    totals: dict[str, Any] = project.report("r.json")["totals"]
    assert (totals["cases"], totals["passed"]) == (N, N), totals
    return totals


def test_limit_cut_to_a_tenth_mid_run(tmp_path: Path, survives: Callable[..., Any]) -> None:
    items = rows(N)
    settings = {"seed": 13, "answer_key": answer_key(items), "p_correct": 1.0, "rpm": RPM}
    with Simulator(SimConfig.model_validate(settings), port=0) as sim:
        project = Project(tmp_path / "project", sim)
        project.dataset("data.jsonl", items)
        project.suite("test_storm", ONE_CALL, "data.jsonl")
        # Given a run paced at the account's limit of 6,000 RPM
        run = project.start("-n", "2", "-q", "--llm-report", "r.json", "--llm-rpm", str(RPM))
        try:
            wait_for(lambda: sim.stats()["chat_answered"] >= N // 3, "a third", timeout=60)
            # When the server's limit drops to a tenth (another job took the rest)
            cut = sim.stats()
            sim.configure(rpm=RPM // 10)
            end = run.wait()
        finally:
            if run.alive():
                run.kill_all()
        stats = sim.stats()

    # Then the run slowed to the new limit, finished and lost nothing
    totals = check_nothing_lost(project, end.output, end.returncode)
    assert stats["chat_answered"] == N and len(project.stored_hashes()) == N
    assert stats["duplicate_bodies"] == 0, stats["duplicate_body_hashes"]
    limited = stats["rate_limit_429"]
    # the client adopted the lower limit: refused at most once per request already under
    # way at the old pace (--llm-concurrency, 64), where a client that kept that pace
    # would be refused for most of the 100 remaining requests, again and again
    assert limited <= 64, limited
    # the summary counts what the server got (a request the prefetch gave up on
    # included: its test's figures add the prefetch's attempts)
    assert (totals["requests"], totals["rate_limited"]) == (stats["chat_requests"], limited)
    cut_second = max(int(k) for k in cut["answered_per_second"])
    before = answer_rate(cut["answered_per_second"], 0, cut_second - 1)
    after = answer_rate(stats["answered_per_second"], cut_second + 1, 2**40)
    survives(
        item="Storms: limit cut to a tenth",
        cases=N,
        faults=f"rpm {RPM} -> {RPM // 10} after {cut['chat_answered']} answers: {limited} 429s",
        retries=totals["retries"],
        paid_twice=stats["duplicate_bodies"],
        lost=N - totals["passed"],
        outcome=(
            f"{totals['passed']}/{N} passed; {before:.0f} answers/s before the cut, "
            f"{after:.0f}/s after (limit {RPM // 600}/s)"
        ),
    )


def test_server_without_rate_limit_headers(tmp_path: Path, survives: Callable[..., Any]) -> None:
    items = rows(N)
    rpm = 1200  # 20 a second, enforced, never advertised
    settings = {
        "seed": 17,
        "answer_key": answer_key(items),
        "p_correct": 1.0,
        "rpm": rpm,
        "rate_limit_headers": False,
    }
    with Simulator(SimConfig.model_validate(settings), port=0) as sim:
        project = Project(tmp_path / "project", sim)
        project.dataset("data.jsonl", items)
        project.suite("test_storm", ONE_CALL, "data.jsonl")
        # When the suite runs with no limit configured against a server that says none
        end = project.run("-n", "2", "-q", "--llm-report", "r.json")
        stats = sim.stats()

    # Then the 429s slowed it down, it finished and lost nothing
    totals = check_nothing_lost(project, end.output, end.returncode)
    assert stats["chat_answered"] == N and len(project.stored_hashes()) == N
    assert stats["duplicate_bodies"] == 0, stats["duplicate_body_hashes"]
    assert stats["rate_limit_429"] > 0  # the limit was met, not avoided by luck
    assert "the server sends no rate-limit headers" in end.line(r"^llmbench pacing: ")
    sent = stats["chat_requests"]
    survives(
        item="Storms: no rate-limit headers",
        cases=N,
        faults=f"rpm {rpm} enforced, never advertised: {stats['rate_limit_429']} 429s",
        retries=sent - N,
        paid_twice=stats["duplicate_bodies"],
        lost=N - totals["passed"],
        outcome=(
            f"{totals['passed']}/{N} passed; {sent} requests for {N} answers; the summary "
            f"counted {totals['requests']} requests and {totals['rate_limited']} 429s"
        ),
    )


def test_the_summary_counts_the_attempts_of_a_request_the_prefetch_gave_up(
    tmp_path: Path,
) -> None:
    items = rows(1)
    # Given a server that answers the first 7 attempts (1 + --llm-max-retries 6) with 500
    settings = {"answer_key": answer_key(items), "p_correct": 1.0, "script": ["500"] * 7}
    with Simulator(SimConfig.model_validate(settings), port=0) as sim:
        project = Project(tmp_path / "project", sim)
        project.dataset("data.jsonl", items)
        project.suite("test_storm", ONE_CALL, "data.jsonl")
        # When the prefetch gives up on the request and the test sends it live
        end = project.run("-q", "--llm-report", "r.json", "--llm-backoff-max", "0.05")
        stats = sim.stats()
    check_clean(end.output)
    assert end.returncode == 0, end.output[-3000:]
    assert project.report("r.json")["run"]["prefetch"]["failed"] == 1
    assert stats["chat_requests"] == 8
    # Then the summary counts the 8 requests sent, 7 of them retries
    totals = project.report("r.json")["totals"]
    counted = (totals["requests"], totals["retries"])
    assert counted == (8, 7), f"8 requests sent, 7 of them retries; the summary counted {counted}"
