"""8 processes, one shared budget, one server-side limit: how much of it do they use?

    python benchmarks/budget_rate.py [--rpm 1200] [--seconds 20] [--procs 8]

Each process runs the real ``LLMClient`` (retries, header feedback, shared pause) in a
loop against the simulator, which enforces R requests per minute paced per second. The
budget is the file budget, then the Redis budget (when ``redis-server`` is installed).
Printed per run, from the server's side: the aggregate answered rate / R after a 3 s
warm-up, and the 429s (count and share of all requests). The second run of each budget
tells the simulator to enforce 30% less than the clients are configured for, and prints
how soon the pool stops being refused.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_llmbench.sim import LatencyConfig, SimConfig, Simulator  # noqa: E402

FAKE_KEY = "sk-test-fake-key-benchmark-0000"


def _worker(
    base_url: str, rpm: int, budget_url: str | None, run_dir: str, seconds: float, barrier: Any
) -> None:
    from pytest_llmbench import LLMCallError, LLMClient, LLMConfig

    config = LLMConfig.model_validate(
        {
            "api_key": FAKE_KEY,
            "base_url": base_url,
            "rpm": rpm,
            "run_dir": run_dir,
            "budget_url": budget_url,
            "max_tokens": 16,
        }
    )
    with LLMClient(config) as client:
        barrier.wait()
        deadline = time.time() + seconds
        i = 0
        while time.time() < deadline:
            i += 1
            with contextlib.suppress(LLMCallError):
                client.generate_response(f"budget benchmark call {i}", temperature=0)


def run(
    rpm_client: int, rpm_server: int, budget_url: str | None, procs: int, seconds: float
) -> dict[str, Any]:
    latency = LatencyConfig(kind="uniform", low=0.05, high=0.3)
    with (
        Simulator(SimConfig(rpm=rpm_server, latency=latency), port=0) as sim,
        tempfile.TemporaryDirectory() as tmp,
    ):
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(procs + 1)
        ps = [
            ctx.Process(
                target=_worker, args=(sim.base_url, rpm_client, budget_url, tmp, seconds, barrier)
            )
            for _ in range(procs)
        ]
        for p in ps:
            p.start()
        barrier.wait()
        start = time.time()
        for p in ps:
            p.join()
        stats = sim.stats()
    per_second = {int(k): v for k, v in stats["answered_per_second"].items()}
    # whole seconds only: skip the warm-up and the partial second at each end
    first = int(start) + 1
    warm = [per_second.get(s, 0) for s in range(first + 3, int(start + seconds))]
    steady = sum(warm) / max(1, len(warm)) * 60
    return {
        "steady_per_min": steady,
        "ratio_server": steady / rpm_server,
        "answered": stats["chat_answered"],
        "429": stats["rate_limit_429"],
        "requests": stats["chat_requests"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=int, default=1200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--procs", type=int, default=8)
    args = parser.parse_args()
    budgets: list[tuple[str, str | None]] = [("file", None)]
    from tests import redis_server

    rows = []
    lowered = int(args.rpm * 0.7)
    ctx = redis_server.redis_server() if redis_server.available() else None
    url = ctx.__enter__() if ctx is not None else None
    try:
        if url is not None:
            budgets.append(("redis", url))
        for label, budget_url in budgets:
            for server_rpm in (args.rpm, lowered):
                r = run(args.rpm, server_rpm, budget_url, args.procs, args.seconds)
                rows.append((label, server_rpm, r))
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    print(
        f"\n{args.procs} processes, clients configured for {args.rpm} RPM, "
        f"{args.seconds:.0f} s per run, latency uniform 0.05-0.3 s"
    )
    print(
        f"{'budget':8} {'server RPM':>10} {'steady/min':>10} {'/server limit':>13} "
        f"{'answered':>8} {'429s':>5} {'429 share':>9}"
    )
    for label, server_rpm, r in rows:
        share = 100 * r["429"] / max(1, r["requests"])
        print(
            f"{label:8} {server_rpm:10d} {r['steady_per_min']:10.0f} "
            f"{r['ratio_server']:13.3f} {r['answered']:8d} {r['429']:5d} {share:8.2f}%"
        )
    if url is None:
        print("redis-server not on PATH: the Redis rows were skipped")


if __name__ == "__main__":
    main()
