"""Adaptive vs fixed concurrency: a server that queues, one that does not (with and without
a CPU hog beside it), and a real llama.cpp server when one is running.

    python benchmarks/concurrency.py            # the full table (a few minutes)
    python benchmarks/concurrency.py --quick    # smaller, for a smoke check

Each row runs the same generated suite twice against the same server, in one run of this
script: once as the fetch runs by default (the adaptive limit of
``pytest_llmbench/concurrency.py``, at most 64 in flight) and once with
``--llm-concurrency-fixed`` (64 in flight from the start, as before). The servers:

1. **queueing**: the package's simulator with ``parallelism: 2`` (it serves 2 requests at
   a time and queues the rest, like llama.cpp's server) and a fixed latency of 0.2 s.
   Goal: the adaptive fetch keeps the throughput (ratio >= 0.95) with a p50 latency
   within 2x of a lone request's, where 64 in flight measure the queue;
2. **not queueing**: the simulator with 0.2 s latency and no rate limit, alone and with a
   CPU hog (a process spinning on one of the cores) beside it: the adaptive limit must
   reach 64 and cost no throughput (adaptive/fixed >= 0.95) even when the client's
   latency grows with the load;
3. **llama.cpp** (only with ``PYTEST_LLMBENCH_REAL_MODEL_URL`` set, e.g. by
   ``eval "$(scripts/local-model.sh)"``): short prompts, ``max_tokens`` 16.

The simulator runs in this process (a thread), the pytest run in a child. For each run:
the fetch's rate (answers per second from the first request to the last answer, as the
JSON report gives it), the run's end-to-end wall time, the p50 latency of the report's
totals, and the concurrency the fetch settled at. ``single`` is the median latency of 5
requests sent one at a time before the runs. All figures are ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai

from pytest_llmbench.sim import SimConfig, Simulator

FAKE_KEY = "sk-test-fake-key-benchmark-0000"
LATENCY = 0.2
SUITE = """
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0], id="qid")
def test_bench(case, llm):
    r = llm.generate_response(case["question"], max_tokens=16)
    assert r.ok
"""


def make_suite(root: Path, items: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"qid": f"q{i:05d}", "question": f"Name a colour, {i}."} for i in range(items)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test_bench.py").write_text(SUITE)
    (root / "pytest.ini").write_text("[pytest]\n")


def single_latency(base_url: str, model: str) -> float:
    """The median latency of 5 requests sent one at a time."""
    client = openai.OpenAI(api_key=FAKE_KEY, base_url=base_url, max_retries=0)
    took = []
    for i in range(5):
        started = time.perf_counter()
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Say hi, {i}."}], max_tokens=16
        )
        took.append(time.perf_counter() - started)
    client.close()
    return statistics.median(took)


def run(root: Path, name: str, base_url: str, model: str, fixed: bool) -> dict[str, Any]:
    """One pytest run of the suite in ``root``; its figures from the JSON report."""
    run_dir, report = root / f".run-{name}", root / f"report-{name}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLMBENCH_"))}
    env.update(OPENAI_API_KEY=FAKE_KEY, OPENAI_BASE_URL=base_url)
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--llm-model", model]
    args += ["--llm-run-dir", str(run_dir), "--llm-report", str(report), "--llm-no-overlap"]
    if fixed:
        args.append("--llm-concurrency-fixed")
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if not report.exists():
        raise SystemExit(f"{name}: no report\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    pre = data["run"]["prefetch"]
    fetching = pre["fetch_s"] - pre["plan_lead_s"]
    pacing = [line for line in proc.stdout.splitlines() if line.startswith("llmbench pacing:")]
    return {
        "fetched": pre["fetched"],
        "rate": pre["fetched"] / fetching if fetching > 0 else 0.0,
        "wall": wall,
        "p50": data["totals"]["latency_p50"],
        "concurrency": pre["concurrency"],
        "pacing": pacing[0] if pacing else "",
    }


@contextmanager
def cpu_hog() -> Iterator[None]:
    """A process spinning on one core for as long as the block runs."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def compare(root: Path, name: str, base_url: str, model: str) -> dict[str, Any]:
    """Adaptive, then fixed, against the same server; a row of the table."""
    single = single_latency(base_url, model)
    adaptive = run(root, f"{name}-adaptive", base_url, model, fixed=False)
    fixed = run(root, f"{name}-fixed", base_url, model, fixed=True)
    return {"name": name, "single": single, "adaptive": adaptive, "fixed": fixed}


def simulated(root: Path, config: dict[str, Any], name: str, hog: bool) -> dict[str, Any]:
    with Simulator(SimConfig.model_validate(config), port=0) as sim:
        if hog:
            with cpu_hog():
                return compare(root, name, sim.base_url, "gpt-4o-mini")
        return compare(root, name, sim.base_url, "gpt-4o-mini")


def real_model() -> tuple[str, str] | None:
    url = os.environ.get("PYTEST_LLMBENCH_REAL_MODEL_URL", "").rstrip("/")
    if not url:
        return None
    with urllib.request.urlopen(f"{url}/models", timeout=10) as response:
        return url, str(json.load(response)["data"][0]["id"])


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'server':28} {'n':>5} {'single':>7} {'conc a/f':>9} {'rate a':>7} {'rate f':>7} "
        f"{'rate a/f':>8} {'e2e a/f':>7} {'p50 a':>7} {'p50 f':>7} {'p50a/single':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        a, f = r["adaptive"], r["fixed"]
        print(
            f"{r['name']:28} {a['fetched']:5d} {r['single']:6.3f}s "
            f"{a['concurrency']:>4}/{f['concurrency']:<4} {a['rate']:7.1f} {f['rate']:7.1f} "
            f"{a['rate'] / f['rate']:8.2f} {f['wall'] / a['wall']:7.2f} {a['p50']:6.3f}s "
            f"{f['p50']:6.3f}s {a['p50'] / r['single']:11.2f}"
        )
    print(
        "single: one request alone (median of 5); conc a/f: the concurrency the adaptive "
        "fetch settled at / the fixed one's; rate: answers per second over the fetch, "
        "from its first request (a: adaptive, f: fixed); e2e a/f: throughput ratio end to "
        "end (pytest start to exit); p50: the report's median latency. Goals: rate a/f >= "
        "0.95 everywhere; p50a/single <= 2 on the queueing server"
    )
    for r in rows:
        print(f"  {r['name']}: {r['adaptive']['pacing']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller suites")
    parser.add_argument("--only", choices=["queueing", "open", "llama"], help="one server")
    parser.add_argument("--llama-prompts", type=int, default=40, metavar="N")
    opts = parser.parse_args()
    queued_n, open_n = (60, 600) if opts.quick else (200, 3000)
    llama_n = opts.llama_prompts
    fixed_latency = {"kind": "fixed", "mean": LATENCY}
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmbench-concurrency-") as tmp:
        root = Path(tmp)
        if opts.only in (None, "queueing"):
            make_suite(root / "queueing", queued_n)
            config = {"latency": fixed_latency, "parallelism": 2}
            rows.append(simulated(root / "queueing", config, "queueing (parallelism 2)", False))
        if opts.only in (None, "open"):
            make_suite(root / "open", open_n)
            for hog in (False, True):
                name = "not queueing" + (" + CPU hog" if hog else "")
                rows.append(simulated(root / "open", {"latency": fixed_latency}, name, hog))
        found = real_model() if opts.only in (None, "llama") else None
        if found is not None:
            make_suite(root / "llama", llama_n)
            rows.append(compare(root / "llama", "llama.cpp (SmolLM2)", *found))
        elif opts.only in (None, "llama"):
            print("llama.cpp: skipped (PYTEST_LLMBENCH_REAL_MODEL_URL is not set)")
    print_table(rows)


if __name__ == "__main__":
    main()
