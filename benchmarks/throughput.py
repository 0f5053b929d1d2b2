"""Throughput against the rate limit: prefetch vs. per-test calls, and replay overhead.

    python benchmarks/throughput.py            # the full table (several minutes)
    python benchmarks/throughput.py --quick    # 10x smaller, for a smoke check

Part 1: a generated suite of 2,000 cases; the simulator enforces 3,000 requests per minute
(50 per second, paced per second) with lognormal latency of mean 0.5 s. Four ways to run
it, side by side in one run: prefetch with -n 8 and with -n 0 (also with ``--tb=line``,
which spares pytest's quadratic FAILURES section), no prefetch with -n 8, and
sequential (-n 0, no prefetch) on a 200-case subset, scaled. For each, timed end to end
(from the start of the pytest process to its exit, everything included: start-up,
planning, fetching, the tests, the summary, xdist's teardown): wall time, achieved
requests per second / limit, 429s, requests lost, speed-up over sequential. Goal: end to
end >= 0.95 of the limit with and without xdist, < 1% refused, 0 lost, >= 20x sequential.

Part 2: a replay-only run of 30,000 cases (every response stored) against a plain pytest
run of 30,000 trivial parametrized tests: wall-time ratio and peak memory of both.

All figures are ratios measured in the same run on the same machine. The pytest runs
see the plugins a user's installation has: those of this checkout's development extras
(pytest-html, pytest-metadata, llmock) are left out with ``-p no:``, and the output says
which.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_llmbench.sim import SimConfig, Simulator

FAKE_KEY = "sk-test-fake-key-benchmark-0000"
SUITE = """
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0, 1.0], id="qid")
def test_bench(case, llm):
    r = llm.generate_response(case["question"], max_tokens=8)
    assert r.text == case["answer"]
"""
TRIVIAL = """
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_plain(i):
    assert i >= 0
"""


def make_suite(root: Path, items: int) -> list[dict[str, Any]]:
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        {"qid": f"q{i:05d}", "question": f"Benchmark question {i}?", "answer": f"A{i}"}
        for i in range(items)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test_bench.py").write_text(SUITE)
    (root / "pytest.ini").write_text("[pytest]\n")
    return rows


LAST_RUN: dict[str, float] = {}


def child_env(base_url: str) -> dict[str, str]:
    """The pytest runs' environment: this one's, with the fake key and the simulator's
    URL, and bytecode caching allowed. A sandbox that sets ``PYTHONDONTWRITEBYTECODE``
    makes every process compile the package (and any dependency installed without its
    bytecode) from source again: about 0.35 s of CPU per process on this machine, paid
    by the run, its plan subprocess and each xdist worker. A user's installation does
    not pay it (pip compiles at install; an editable install caches on first import).

    The pytest plugins of this checkout's development extras (:func:`foreign_plugins`)
    are left out the same way: ``pip install pytest-llmbench`` does not bring them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    addopts = " ".join([env.get("PYTEST_ADDOPTS", ""), *(f"-p no:{n}" for n in foreign_plugins())])
    return {
        **env,
        "OPENAI_API_KEY": FAKE_KEY,
        "LLMBENCH_BASE_URL": base_url,
        "PYTEST_ADDOPTS": addopts.strip(),
    }


def foreign_plugins(package: str = "pytest-llmbench") -> list[str]:
    """The pytest plugins installed here whose distributions ``package`` does not depend
    on (its extras left out): in this checkout, the test extra's pytest-html,
    pytest-metadata and llmock. Each costs every process of a run (the run, its plan,
    each xdist worker) its import and hooks, 0.1-0.2 s of CPU for pytest-html with
    pytest-metadata, which a user who installed only the package does not pay."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    needed: set[str] = set()
    todo = [package]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in needed:
            continue
        needed.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    plugins = metadata.entry_points(group="pytest11")
    return sorted(
        ep.name
        for ep in plugins
        if ep.dist is not None and canonicalize_name(ep.dist.name) not in needed
    )


def run_pytest(root: Path, args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run pytest in a child; returns (wall seconds, peak RSS in MiB of the largest
    process, output). ``LAST_RUN`` holds its start and end (epoch seconds)."""
    probe = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stdout.write(p.stdout[-4000:] + p.stderr[-2000:])\n"
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    LAST_RUN["start"] = time.time()
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "pytest", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    LAST_RUN["end"] = time.time()
    out = proc.stdout
    rss_kib = int(out.rsplit("MAXRSS", 1)[1].split()[0]) if "MAXRSS" in out else 0
    return wall, rss_kib // 1024, out


def scenario(
    sim: Simulator, root: Path, name: str, args: list[str], cases: int, env: dict[str, str]
) -> dict[str, Any]:
    sim.reset_stats()
    run_dir = root / f".run-{name}"
    report = root / f"report-{name}.json"
    wall, _, out = run_pytest(
        root,
        [
            "-q",
            "-p",
            "no:cacheprovider",
            "--llm-run-dir",
            str(run_dir),
            "--llm-report",
            str(report),
            *args,
        ],
        env,
    )
    stats = sim.stats()
    first, last = stats.get("first_request_at"), stats.get("last_answer_at")
    # the sustained rate, from the server's per-second counts: full seconds only (the
    # first and last second with answers are partial)
    busy = sorted((int(k), v) for k, v in stats["answered_per_second"].items() if v)
    inner = [v for _, v in busy[1:-1]]
    steady = sum(inner) / len(inner) if inner else 0.0
    data = json.loads(report.read_text()) if report.exists() else {}
    reported = data.get("cases", [])
    lost = cases - sum(1 for c in reported if c["outcome"] in ("passed", "failed"))
    pre = data.get("run", {}).get("prefetch") or {}
    return {
        "name": name,
        "cases": cases,
        "wall": wall,
        "answered": stats["chat_answered"],
        "429": stats["rate_limit_429"],
        "requests": stats["chat_requests"],
        "duplicates": stats["duplicate_bodies"],
        "lost": lost,
        "plan_s": pre.get("plan_lead_s"),
        "steady": steady,
        "fetch_s": pre.get("fetch_s"),
        # end to end = before the first request + first request to last answer + after it
        "before": first - LAST_RUN["start"] if first else None,
        "serving": last - first if first and last else None,
        "after": LAST_RUN["end"] - last if last else None,
        "tail": "" if report.exists() else out[-1500:],
    }


def part1(quick: bool, configured: bool) -> list[dict[str, Any]]:
    items = 100 if quick else 1000  # x 2 temperatures = cases
    seq_items = 10 if quick else 100
    limit_rps = 50.0
    with tempfile.TemporaryDirectory(prefix="llmbench-bench-") as tmp:
        root = Path(tmp)
        rows = make_suite(root, items)
        key = [{"question": r["question"], "correct": r["answer"], "wrong": ["x"]} for r in rows]
        config = SimConfig(
            rpm=int(limit_rps * 60),
            latency={"kind": "lognormal", "mean": 0.5, "sigma": 0.5},
            answer_key=key,
        )
        with Simulator(config, port=0) as sim:
            env = child_env(sim.base_url)
            if configured:
                env["LLMBENCH_RPM"] = str(int(limit_rps * 60))
            results = [
                scenario(sim, root, "prefetch -n 8", ["-n", "8"], 2 * items, env),
                scenario(sim, root, "prefetch -n 0", ["-n", "0"], 2 * items, env),
                # the same with pytest's FAILURES section one line per failure: pytest
                # scans every report for each failure (quadratic), ~0.5 s at the end here
                scenario(
                    sim, root, "prefetch -n 8 --tb=line", ["-n", "8", "--tb=line"], 2 * items, env
                ),
                scenario(
                    sim, root, "prefetch -n 0 --tb=line", ["-n", "0", "--tb=line"], 2 * items, env
                ),
                scenario(
                    sim, root, "no prefetch -n 8", ["-n", "8", "--llm-no-prefetch"], 2 * items, env
                ),
                scenario(
                    sim,
                    root,
                    "sequential (subset)",
                    ["-n", "0", "--llm-no-prefetch", "--llm-limit", str(seq_items)],
                    2 * seq_items,
                    env,
                ),
            ]
    seq = results[-1]
    seq_rate = seq["answered"] / seq["wall"]
    how = "configured (--llm-rpm 3000)" if configured else "learned from the headers"
    print(
        f"\nPart 1: {2 * items} cases, limit {limit_rps:.0f} requests/s (3,000 RPM) {how}, "
        "lognormal latency mean 0.5 s"
    )
    head = (
        f"{'mode':24} {'cases':>6} {'wall s':>7} {'req/s':>6} {'e2e/limit':>9} "
        f"{'fetch/limit':>11} {'steady/limit':>12} {'429s':>5} {'429 %':>6} {'lost':>4} "
        f"{'dup':>4} "
        f"{'plan % wall':>11} {'speed-up':>8} {'before':>6} {'serving':>7} {'after':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        rate = r["answered"] / r["wall"]
        fetch = (
            f"{r['answered'] / r['fetch_s'] / limit_rps:11.2f}" if r["fetch_s"] else f"{'-':>11}"
        )
        plan = f"{100 * r['plan_s'] / r['wall']:10.1f}%" if r["plan_s"] else f"{'-':>11}"
        refused = 100 * r["429"] / max(1, r["requests"])
        print(
            f"{r['name']:24} {r['cases']:6d} {r['wall']:7.1f} {rate:6.1f} "
            f"{rate / limit_rps:9.3f} {fetch} {r['steady'] / limit_rps:12.2f} {r['429']:5d} "
            f"{refused:5.2f}% {r['lost']:4d} "
            f"{r['duplicates']:4d} {plan} {rate / seq_rate:7.1f}x "
            f"{_secs(r['before'])} {_secs(r['serving'])} {_secs(r['after'])}"
        )
        if r["tail"]:
            print("   (no report)", r["tail"])
    print(
        "wall, req/s and e2e/limit: end to end, from the pytest process's start to its "
        "exit; fetch/limit: over the fetch stage (plan "
        "lead, first request, last answers included); steady/limit: the server's "
        "sustained per-second rate; plan % wall: the wait before the first request "
        "(planning runs on, overlapped with fetching); sequential is scaled: its rate is "
        "over its own subset; before / serving / after: seconds from the process's start "
        "to the server's first request, from there to its last answer, and from there to "
        "the process's exit (they add up to the wall time)"
    )
    left_out = ", ".join(foreign_plugins()) or "none"
    print(f"pytest plugins left out (not installed with the package): {left_out}")
    return results


def _secs(value: float | None) -> str:
    return f"{value:6.2f}" if value is not None else f"{'-':>6}"


def part2(quick: bool) -> None:
    n = 3000 if quick else 30000
    with tempfile.TemporaryDirectory(prefix="llmbench-replay-") as tmp:
        root = Path(tmp)
        rows = make_suite(root / "suite", n // 2)
        key = [{"question": r["question"], "correct": r["answer"], "wrong": ["x"]} for r in rows]
        plain = root / "plain"
        plain.mkdir()
        (plain / "test_plain.py").write_text(TRIVIAL.format(n=n))
        (plain / "pytest.ini").write_text("[pytest]\n")
        # every answer right, so both runs are all passes: pytest's own failure summary is
        # quadratic in the number of reports and would swamp what is measured here
        perfect = SimConfig(answer_key=key, p_correct=1.0, temperature_slope=0.0)
        with Simulator(perfect, port=0) as sim:
            env = child_env(sim.base_url)
            # fill the store (not measured)
            fill, _, out = run_pytest(
                root / "suite", ["-q", "-p", "no:cacheprovider", "--llm-concurrency", "32"], env
            )
            assert sim.stats()["chat_answered"] == n, out[-2000:]
            sim.reset_stats()
            replay, replay_rss, _ = run_pytest(
                root / "suite", ["-q", "-p", "no:cacheprovider"], env
            )
            assert sim.stats()["chat_requests"] == 0, "the replay sent requests"
        base, base_rss, _ = run_pytest(plain, ["-q", "-p", "no:cacheprovider"], env)
    print(f"\nPart 2: replay-only run of {n} stored cases vs plain pytest of {n} trivial tests")
    print(f"{'run':28} {'wall s':>7} {'peak RSS MiB':>12}")
    print(f"{'plain parametrized tests':28} {base:7.1f} {base_rss:12d}")
    print(f"{'llmbench replay (-n 0)':28} {replay:7.1f} {replay_rss:12d}")
    print(
        f"replay / plain wall time: {replay / base:.2f}x (goal <= 1.5x); "
        f"memory ratio {replay_rss / max(1, base_rss):.2f}x; (store fill took {fill:.1f}s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller")
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    parser.add_argument(
        "--configured",
        action="store_true",
        help="tell the clients the limit (--llm-rpm) instead of learning it",
    )
    args = parser.parse_args()
    if args.part in ("1", "all"):
        part1(args.quick, args.configured)
    if args.part in ("2", "all"):
        part2(args.quick)


if __name__ == "__main__":
    main()
