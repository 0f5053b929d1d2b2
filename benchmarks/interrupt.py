"""Ctrl-C during the prefetch: is anything paid for twice?

    python benchmarks/interrupt.py

A 400-case suite, the simulator answering each request after 1 s (no rate limit; the
client is told 6,000 RPM, so the concurrency limit, 64 in flight, is what paces it).
SIGINT goes to pytest two seconds after the first answer arrived, when requests are in
flight; then the same command runs again. The simulator counts every request body it
answered more than once. Goal: 0 resent (everything in flight was drained and stored),
for -n 0 and -n 2, for SIGINT and SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_llmbench.sim import SimConfig, Simulator

FAKE_KEY = "sk-test-fake-key-benchmark-0000"
CASES = 400
SUITE = """
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0], id="qid")
def test_bench(case, llm):
    llm.generate_response(case["question"], max_tokens=8)
"""


def make_suite(root: Path) -> None:
    root.mkdir(parents=True)
    rows = [{"qid": f"q{i:04d}", "question": f"Question {i}?"} for i in range(CASES)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test_bench.py").write_text(SUITE)
    (root / "pytest.ini").write_text("[pytest]\n")


def one(root: Path, workers: str, signame: str) -> dict[str, Any]:
    config = SimConfig(latency={"kind": "fixed", "mean": 1.0})
    with Simulator(config, port=0) as sim:
        env = {
            **os.environ,
            "OPENAI_API_KEY": FAKE_KEY,
            "OPENAI_BASE_URL": sim.base_url,
            "LLMBENCH_RPM": "6000",
        }
        cmd = [sys.executable, "-m", "pytest", "-q", "-rN", "-n", workers]
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 60
        while sim.stats()["chat_answered"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # polls the server's counter for the first answer
        time.sleep(2.0)  # the interrupt comes two seconds into the fetch, by design
        in_flight = sim.stats()["chat_requests"] - sim.stats()["chat_answered"]
        signalled = time.perf_counter()
        proc.send_signal(getattr(signal, signame))
        out, _ = proc.communicate(timeout=120)
        exit_s = time.perf_counter() - signalled
        first = sim.stats()
        rerun = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
        second = sim.stats()
    line = next((ln.strip("! ") for ln in out.splitlines() if "interrupted" in ln), "(none)")
    return {
        "in_flight": in_flight,
        "stored": first["chat_answered"],
        "exit_s": exit_s,
        "status": proc.returncode,
        "resent": second["duplicate_bodies"],
        "rerun_sent": second["chat_requests"] - first["chat_requests"],
        "rerun_status": rerun.returncode,
        "line": line,
        "traceback": "Traceback" in out,
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmbench-interrupt-") as tmp:
        for workers, signame in (("0", "SIGINT"), ("2", "SIGINT"), ("0", "SIGTERM")):
            root = Path(tmp) / f"n{workers}-{signame}"
            make_suite(root)
            rows.append((workers, signame, one(root, workers, signame)))
    print(f"\nA signal two seconds into the prefetch of {CASES} requests (1 s latency)")
    head = (
        f"{'run':16} {'in flight':>9} {'answered':>8} {'exit after s':>12} {'status':>6} "
        f"{'rerun sent':>10} {'resent':>6}"
    )
    print(head)
    print("-" * len(head))
    for workers, signame, r in rows:
        print(
            f"{'-n ' + workers + ' ' + signame:16} {r['in_flight']:9d} {r['stored']:8d} "
            f"{r['exit_s']:12.2f} {r['status']:6d} {r['rerun_sent']:10d} {r['resent']:6d}"
        )
    print("\nthe lines printed:")
    for workers, signame, r in rows:
        print(f"  -n {workers} {signame}: {r['line']}")
    if any(r["traceback"] or r["rerun_status"] != 0 for _, _, r in rows):
        print("a run printed a traceback, or a rerun failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
