"""A fatal refusal against a 900-case suite with ``-n 2``: how many requests go out, how
long the run takes, and the line it ends with.

    python benchmarks/fatal_errors.py

Two refusals that every other request of the run would get too: a wrong API key (401)
and an account whose quota is used up (429 ``insufficient_quota``). The simulator runs
in this process and counts what it is sent; pytest runs in a child process exactly as a
user types it, timed from its start to its exit. Each is run with the prefetch (the
default) and without it (``--llm-no-prefetch``, every test calls the API itself).

Goals (issue "The whole run at the rate limit"): at most 1 request when the limits are
unknown and the first request goes alone (at most one per worker in flight without the
prefetch), a wall time under 5 s, one line naming the cause and the fix.
"""

from __future__ import annotations

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

@pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0], id="qid")
def test_bench(case, llm):
    r = llm.generate_response(case["question"], max_tokens=8)
    assert r.text == case["answer"]
"""
CASES = 900
KINDS: dict[str, dict[str, Any]] = {
    "wrong key (401)": {"api_keys": ["sk-test-fake-the-only-good-key-01"]},
    "quota used up (429)": {"quota_exceeded": True},
}


def make_suite(root: Path) -> None:
    rows = [{"qid": f"q{i:04d}", "question": f"Question {i}?", "answer": "A"} for i in range(CASES)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test_bench.py").write_text(SUITE)
    (root / "pytest.ini").write_text("[pytest]\n")


def run(root: Path, config: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    with Simulator(SimConfig(**config), port=0) as sim:
        env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY, "OPENAI_BASE_URL": sim.base_url}
        cmd = [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", *extra]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        stats = sim.stats()
    out = proc.stdout + proc.stderr
    lines = [line.strip("! ") for line in out.splitlines() if "stored answers are kept" in line]
    return {
        "sent": stats["chat_requests"],
        "wall": wall,
        "status": proc.returncode,
        "line": lines[0] if lines else "(none) " + out[-600:],
        "traceback": "Traceback" in out,
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmbench-fatal-") as tmp:
        root = Path(tmp)
        make_suite(root)
        for kind, config in KINDS.items():
            for mode, extra in (("prefetch", []), ("no prefetch", ["--llm-no-prefetch"])):
                rows.append((kind, mode, run(root, config, extra)))
    print(f"\nA fatal refusal against a {CASES}-case suite with -n 2")
    head = f"{'refusal':22} {'mode':12} {'requests sent':>13} {'wall s':>7} {'exit':>5}"
    print(head)
    print("-" * len(head))
    for kind, mode, r in rows:
        print(f"{kind:22} {mode:12} {r['sent']:13d} {r['wall']:7.2f} {r['status']:5d}")
    print("\nthe lines printed:")
    for kind, mode, r in rows:
        print(f"  {kind}, {mode}: {r['line']}")
    if any(r["traceback"] for _, _, r in rows):
        print("a run printed a traceback")
        sys.exit(1)


if __name__ == "__main__":
    main()
