"""How fast can processes reserve from the shared budget?

    python benchmarks/budget_lock.py [--ops 2000] [--procs 1,8]

Measures ``reserve()`` calls per second (aggregate over all processes, started together
on a barrier) and per-call latency for the file budget (with the chosen poll interval
and with filelock's default 0.05 s) and, when ``redis-server`` is installed, for the
Redis budget on a throwaway loopback server. The limits are set so high that nobody
ever waits: this is the cost of the locked read-modify-write alone.

``against_server(base_url, ...)`` measures what matters end to end (admitted rate and
refused fraction against an OpenAI-compatible server such as the simulator).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_llmbench.budget import (  # noqa: E402
    FileBudget,
    RateLimitSnapshot,
    RedisBudget,
    open_budget,
)

HUGE = 10**12


class BlockingFlockBudget(FileBudget):
    """For comparison only: the same file budget under a blocking ``fcntl.flock``.

    The kernel queues the waiters, so there is no polling; POSIX only.
    """

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        with self._thread_lock:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing the last descriptor drops the lock


def _make(spec: dict[str, Any]) -> FileBudget | RedisBudget:
    if spec["kind"] == "flock":
        return BlockingFlockBudget(spec["path"], rpm=HUGE, tpm=HUGE)
    if spec["kind"] == "file":
        return FileBudget(spec["path"], rpm=HUGE, tpm=HUGE, poll_interval=spec["poll"])
    return RedisBudget(spec["url"], key=spec["key"], rpm=HUGE, tpm=HUGE)


def _hammer(spec: dict[str, Any], ops: int, barrier: Any, out: Any) -> None:
    budget = _make(spec)
    lat: list[float] = []
    barrier.wait()
    start = time.perf_counter()
    for _ in range(ops):
        t = time.perf_counter()
        budget.reserve(100)
        lat.append(time.perf_counter() - t)
    out.put((start, time.perf_counter(), lat))
    budget.close()


def measure(spec: dict[str, Any], procs: int, ops: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_hammer, args=(spec, ops, barrier, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    results = [out.get(timeout=300) for _ in ps]
    for p in ps:
        p.join()
    out.close()
    out.join_thread()
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    lat = sorted(x for r in results for x in r[2])
    return {
        "ops_per_s": len(lat) / (end - start),
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
        "max_ms": lat[-1] * 1e3,
    }


def against_server(
    base_url: str,
    *,
    model: str = "gpt-4o-mini",
    rpm: int | None = None,
    tpm: int | None = None,
    processes: int = 8,
    seconds: float = 10.0,
    budget_url: str | None = None,
    warmup: float = 3.0,
) -> dict[str, float]:
    """Run ``processes`` callers through one budget against ``base_url`` for ``seconds``.

    Returns the admitted (2xx) rate per minute after ``warmup`` seconds (the initial
    burst and the learning of limits excluded), the refused (429) fraction of all
    requests, and the refused fraction after the warmup.
    """
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(processes), ctx.Queue()
        args = (base_url, model, rpm, tpm, seconds, budget_url, tmp, barrier, out)
        ps = [ctx.Process(target=_caller, args=args) for _ in range(processes)]
        for p in ps:
            p.start()
        results = [out.get(timeout=seconds + 120) for _ in ps]
        for p in ps:
            p.join()
        out.close()
        out.join_thread()
    times = sorted(t for r in results for t in r[0])
    refused = sorted(t for r in results for t in r[1])
    start = min(r[2] for r in results)
    steady = [t for t in times if t >= start + warmup]
    steady_refused = [t for t in refused if t >= start + warmup]
    return {
        "admitted_per_min": len(steady) / (seconds - warmup) * 60,
        "refused_fraction": len(refused) / max(1, len(times) + len(refused)),
        "refused_fraction_after_warmup": len(steady_refused)
        / max(1, len(steady) + len(steady_refused)),
    }


def _caller(
    base_url: str,
    model: str,
    rpm: int | None,
    tpm: int | None,
    seconds: float,
    budget_url: str | None,
    run_dir: str,
    barrier: Any,
    out: Any,
) -> None:
    budget = open_budget(budget_url, run_dir=Path(run_dir), key=model, rpm=rpm, tpm=tpm)
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    ).encode()
    est = 16 + 8
    ok: list[float] = []
    refused: list[float] = []
    barrier.wait()
    start = time.time()
    deadline = start + seconds
    while time.time() < deadline:
        budget.acquire(est)
        req = urllib.request.Request(
            base_url.rstrip("/") + "/chat/completions",
            data=body,
            headers={"content-type": "application/json", "authorization": "Bearer sk-bench"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                answer = json.loads(resp.read())
                budget.observe(RateLimitSnapshot.from_headers(dict(resp.headers.items())))
            budget.correct(est, int(answer.get("usage", {}).get("total_tokens", est)))
            if time.time() < deadline:
                ok.append(time.time())
        except urllib.error.HTTPError as exc:
            budget.observe(RateLimitSnapshot.from_headers(dict(exc.headers.items())))
            exc.close()
            if exc.code != 429:
                raise
            refused.append(time.time())
            budget.pause(float(exc.headers.get("retry-after") or 1.0))
    out.put((ok, refused, start))
    budget.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=2000, help="reserve() calls per process")
    p.add_argument("--procs", default="1,8", help="process counts to try")
    args = p.parse_args()
    counts = [int(x) for x in args.procs.split(",")]
    rows: list[tuple[str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, poll in (("file (poll 0.002 s)", 0.002), ("file (poll 0.05 s)", 0.05)):
            for n in counts:
                spec = {"kind": "file", "path": f"{tmp}/b-{poll}-{n}.json", "poll": poll}
                rows.append((label, n, measure(spec, n, args.ops)))
        if sys.platform != "win32":
            for n in counts:
                spec = {"kind": "flock", "path": f"{tmp}/b-flock-{n}.json"}
                rows.append(("file (blocking flock)", n, measure(spec, n, args.ops)))
    from tests import redis_server

    if redis_server.available():
        with redis_server.redis_server() as url:
            for n in counts:
                spec = {"kind": "redis", "url": url, "key": f"bench-{n}"}
                rows.append(("redis (loopback)", n, measure(spec, n, args.ops)))
    else:
        print("redis-server not on PATH: Redis rows skipped")
    print(f"{'budget':<22}{'procs':>6}{'reserve/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for label, n, r in rows:
        print(
            f"{label:<22}{n:>6}{r['ops_per_s']:>12,.0f}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['max_ms']:>9.1f}"
        )


if __name__ == "__main__":
    main()
