"""The fetch loop's CPU ceiling: our fetch against a raw aiohttp loop, same server, same run.

    python benchmarks/cpu_ceiling.py            # 5,000 requests a round, 4 rounds of each
    python benchmarks/cpu_ceiling.py --quick    # 500 a round, for a smoke check
    python benchmarks/cpu_ceiling.py --server llmock   # against llmock, an independent mock
    python benchmarks/cpu_ceiling.py --transports      # a bare request through each client
    python benchmarks/cpu_ceiling.py --parts   # also the fetch without its budget, its store

The server is the package's simulator in a separate process (no rate limit, no latency),
so it does not share the client's CPU or GIL. With nothing to wait for, a client's
requests per second is bounded by the CPU it spends per request: that is the ceiling
measured here. Two loops send the same kind of request (gpt-4o-mini, one user message,
``max_completion_tokens`` 8, every body unique), 64 in flight:

* **raw**: one ``aiohttp.ClientSession``, POST ``/v1/chat/completions`` with a JSON body,
  the JSON reply parsed; nothing else;
* **ours**: ``LLMClient.arun`` as the prefetch runs it (``engine.Fetch``): the file budget
  (the default), the default transport (aiohttp for plain bodies, ``wire.py``), retries,
  and for each answer what ``Fetch.answered`` does: the answers of one turn of the event
  loop saved to a fresh ``ResponseStore`` in one durable commit (``saver.py``), a journal
  line each, the progress counters. The requests come as the plan subprocess hands
  them over, with their store keys and prompt-token counts (made in that process, in
  parallel with the fetch; here before the clock starts).

Rounds alternate (raw, ours, raw, ours...) so a drift of the machine hits both. For each
round: wall time, requests per second, client CPU (this process, all threads) and server
CPU (the simulator's process) per request; then the ratio ours/raw of the best rounds,
the mean of the rounds, and the median of the paired rounds (each ours against the raw
round just before it). This machine's speed drifts by a third within minutes, hence 4
rounds by default. Goal: >= 0.9. The exit status is non-zero only when a request failed
or a loop lost answers, never for missing the goal.

``--parts`` runs three more loops beside the two: ours without the shared budget
(``--llm-budget none``), ours without the store (each answer dropped as it arrives: no
commit, no journal line, no progress) and ours without either; then each one's mean rate
against the raw loop's, and its CPU per request. What a part costs is the difference.

``--transports`` prices the ways a request can go, each a bare loop like **raw**: aiohttp,
httpx2 (the SDK's default transport), ``AsyncOpenAI`` on httpx2 and ``AsyncOpenAI`` on the
SDK's own aiohttp transport (``DefaultAioHttpClient``), both through the SDK's public
``post()`` (README, "Why the fetch sends with aiohttp").

Reading it: with both loops CPU-bound, ours/raw is about raw's client CPU per request over
ours. When the raw loop's server CPU per request times its rate nears one core, the raw
loop is bound by the server, not by its own CPU, and the ratio overstates ours. To see
where ours spends its time: ``py-spy record -- python benchmarks/cpu_ceiling.py --only
ours`` (py-spy from PyPI; not a dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_llmbench.client import ENDPOINT, LLMClient  # noqa: E402
from pytest_llmbench.config import LLMConfig  # noqa: E402
from pytest_llmbench.errors import LLMCallError, StoreError  # noqa: E402
from pytest_llmbench.journal import JournalWriter  # noqa: E402
from pytest_llmbench.response import Answer  # noqa: E402
from pytest_llmbench.saver import GroupSaver, Pair  # noqa: E402
from pytest_llmbench.store import (  # noqa: E402
    SIM_ORIGIN,
    PlannedRequest,
    ResponseStore,
    request_key,
)
from pytest_llmbench.tokens import request_prompt_tokens  # noqa: E402

FAKE_KEY = "sk-test-fake-key-benchmark-0000"
CONCURRENCY = 64
GOAL = 0.9


@dataclass
class Round:
    name: str
    n: int
    wall: float
    cpu: float
    errors: int

    @property
    def rps(self) -> float:
        return self.n / self.wall

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu / self.n


# ------------------------------------------------------------------------------ server
class SimProcess:
    """``python -m pytest_llmbench.sim`` in a child process: no limits, no latency."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_llmbench.sim", "--port", "0", "--latency", "none"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        banner = self.proc.stdout.readline().strip()
        if "listening on" not in banner:
            self.close()
            raise SystemExit(f"the simulator did not start: {banner!r}")
        self.base_url = banner.rsplit(" ", 1)[1]

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (user + system), from /proc; 0 where unknown."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LLMockProcess(SimProcess):
    """llmock (PyPI; an independent OpenAI mock on FastAPI/uvicorn) in a child process:
    limits far above what either loop can send, no latency."""

    def __init__(self) -> None:
        import socket
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "llmock.cli", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--log-level", "warning", "--latency-ms", "0"]
        cmd += ["--rpm", "100000000", "--tpm", "10000000000"]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # ready when /health answers (it imports FastAPI first)
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise SystemExit("llmock did not start (pip install llmock)") from None
                time.sleep(0.1)
        self.base_url = url + "/v1"


def bodies(tag: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"Question {tag}-{i}: what is {i} + 1?"}],
            "max_completion_tokens": 8,
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------------------ loops
async def raw_loop(base_url: str, work: list[dict[str, Any]]) -> int:
    """64 workers on one aiohttp session; returns the number of failed requests."""
    import aiohttp

    url = f"{base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {FAKE_KEY}"}
    todo = iter(work)
    errors = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for body in todo:
            async with session.post(url, json=body, headers=headers) as resp:
                data = await resp.json()
                if resp.status != 200 or "choices" not in data:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return errors


class Fetcher:
    """What ``engine.Fetch`` does with each outcome, minus pytest: the answers of one turn
    of the event loop saved in one commit (``saver.GroupSaver``), then a journal line each
    and the progress counters; a failure journalled and counted."""

    def __init__(self, store: ResponseStore, journal: JournalWriter) -> None:
        self.store, self.journal = store, journal
        self.done = self.failed = self.retries = self.rate_limited = self.tokens = 0
        self.errors: list[str] = []
        self.saver = GroupSaver(
            store, source="prefetch", replace=False, saved=self.saved, unsaved=self.unsaved
        )

    def answered(self, req: PlannedRequest, answer: Answer) -> None:
        self.saver.add(req, answer)

    def saved(self, batch: list[Pair]) -> None:
        self.journal.settled_many([req.key for req, _ in batch])
        for _, answer in batch:
            usage = answer.body.get("usage") or {}
            # Progress.advance, without a terminal to write to
            self.done += 1
            self.retries += answer.attempts - 1
            self.rate_limited += answer.rate_limited
            self.tokens += int(usage.get("total_tokens") or 0)

    def unsaved(self, batch: list[Pair], exc: StoreError) -> None:
        self.failed += len(batch)
        self.errors.append(str(exc))

    def on_error(self, req: PlannedRequest, exc: LLMCallError) -> None:
        self.journal.settled(req.key)
        self.failed += 1
        if len(self.errors) < 3:
            self.errors.append(str(exc))


def planned(tag: str, n: int) -> list[PlannedRequest]:
    """The requests as the plan subprocess hands them to the fetch: key and prompt-token
    count made there, in another process (not timed here)."""
    out = []
    for i, body in enumerate(bodies(tag, n)):
        nodeid = f"test_bench.py::test_case[{tag}-{i}]"
        key, tokens = request_key(nodeid, 0, ENDPOINT, body), request_prompt_tokens(body)
        out.append(PlannedRequest(key, nodeid, 0, ENDPOINT, body, tokens))
    return out


def our_config(base_url: str, run_dir: Path, budget: str | None = None) -> LLMConfig:
    # the environment is left out (context env {}): the defaults are what a user gets,
    # the file budget among them (budget_url None; "none" for --parts)
    data = {
        "budget_url": budget,
        "api_key": FAKE_KEY,
        "base_url": base_url,
        "max_concurrency": CONCURRENCY,
        # the raw loop's 64 in flight: against a server with no latency the client's CPU
        # is all there is to measure, and the adaptive limit would settle where that
        # CPU tops out (concurrency.py)
        "fixed_concurrency": True,
        "run_dir": run_dir,
    }
    return LLMConfig.model_validate(data, context={"env": {}})


#: --parts: ours with a part left out -> (its name, the budget, whether answers are saved)
PARTS = {
    "ours": ("ours (LLMClient.arun)", None, True),
    "no budget": ("ours, no budget", "none", True),
    "no store": ("ours, no store", None, False),
    "neither": ("ours, neither", "none", False),
}


def ours(base_url: str, tag: str, n: int, tmp: Path, part: str = "ours") -> Round:
    """One round of the fetch; ``part`` (``--parts``) may leave the shared budget out
    (``--llm-budget none``) or the store (each answer dropped as it arrives: no commit,
    no journal line, no progress)."""
    name, budget, saving = PARTS[part]
    run_dir = tmp / f"run-{tag}"
    store = ResponseStore.open(run_dir, origin=SIM_ORIGIN)
    journal = JournalWriter(run_dir / "fetch.journal")
    fetcher = Fetcher(store, journal)
    work = planned(tag, n)
    client = LLMClient(our_config(base_url, run_dir, budget))
    try:
        cpu, started = time.process_time(), time.perf_counter()
        asyncio.run(fetch(client, work, fetcher, saving))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        client.close()
        journal.close()
    stored = len(store) if saving else n - fetcher.failed
    store.close()
    for line in fetcher.errors:
        print(f"   ours: {line}")
    lost = n - stored
    if lost and not fetcher.failed:
        print(f"   ours: {lost} answers missing from the store")
    return Round(name, n, wall, cpu, fetcher.failed + max(0, lost))


async def fetch(
    client: LLMClient, work: list[PlannedRequest], fetcher: Fetcher, saving: bool = True
) -> None:
    on_answer = fetcher.answered if saving else _dropped
    try:
        await client.arun(work, _body, on_answer, fetcher.on_error, prompt_tokens=_prompt_tokens)
    finally:
        fetcher.saver.flush()  # as engine.Fetch does


def _dropped(req: PlannedRequest, answer: Answer) -> None:
    """``--parts``' "no store": the answer is dropped as it arrives."""


def _body(req: PlannedRequest) -> dict[str, Any]:
    return req.body


def _prompt_tokens(req: PlannedRequest) -> int | None:
    return req.prompt_tokens


#: a bare loop: (base URL, request bodies) -> errors
BareLoop = Callable[[str, list[dict[str, Any]]], Coroutine[Any, Any, int]]


def bare(name: str, loop: BareLoop, base_url: str, work: list[dict[str, Any]]) -> Round:
    """One round of a bare loop (no budget, no store): its wall and CPU time, its errors."""
    cpu, started = time.process_time(), time.perf_counter()
    errors = asyncio.run(loop(base_url, work))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Round(name, len(work), wall, cpu, errors)


def raw(base_url: str, tag: str, n: int) -> Round:
    return bare("raw aiohttp", raw_loop, base_url, bodies(tag, n))


async def httpx_loop(base_url: str, work: list[dict[str, Any]]) -> int:
    """64 workers on one httpx2.AsyncClient, as raw_loop."""
    import httpx2

    todo, errors = iter(work), 0
    headers = {"Authorization": f"Bearer {FAKE_KEY}"}

    async def worker(client: httpx2.AsyncClient) -> None:
        nonlocal errors
        for body in todo:
            resp = await client.post(f"{base_url}/chat/completions", json=body, headers=headers)
            if resp.status_code != 200 or "choices" not in resp.json():
                errors += 1

    limits = httpx2.Limits(max_connections=CONCURRENCY)
    async with httpx2.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return errors


async def sdk_loop(base_url: str, work: list[dict[str, Any]], aio: bool) -> int:
    """64 workers on one AsyncOpenAI (its post(), as wire.py's SdkSender)."""
    import httpx2
    import openai

    kwargs: dict[str, Any] = {"api_key": FAKE_KEY, "base_url": base_url, "max_retries": 0}
    if aio:
        kwargs["http_client"] = openai.DefaultAioHttpClient()
    client = openai.AsyncOpenAI(**kwargs)
    todo, errors = iter(work), 0
    options: openai.RequestOptions = {"security": {"bearer_auth": True}}

    async def worker() -> None:
        nonlocal errors
        for body in todo:
            resp = await client.post(
                "/chat/completions", body=body, cast_to=httpx2.Response, options=options
            )
            if "choices" not in resp.json():
                errors += 1

    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        await client.close()
    return errors


TRANSPORTS: dict[str, BareLoop] = {
    "aiohttp": raw_loop,
    "httpx2": httpx_loop,
    "AsyncOpenAI (httpx2)": lambda url, work: sdk_loop(url, work, aio=False),
    "AsyncOpenAI (aiohttp)": lambda url, work: sdk_loop(url, work, aio=True),
}


def transports(sim: SimProcess, n: int, rounds: int, server: str) -> int:
    results: list[tuple[Round, float]] = []
    for r in range(rounds):
        for name, loop in TRANSPORTS.items():
            server_cpu = sim.cpu_seconds()
            got = bare(name, loop, sim.base_url, bodies(f"{name}{r}", n))
            results.append((got, sim.cpu_seconds() - server_cpu))
    print(f"\nA bare request through each client: {n} a round, {CONCURRENCY} in flight")
    return report(n, results, server)


# ------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 requests a round")
    parser.add_argument("-n", type=int, help="requests per round (default 5,000)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each loop (4)")
    parser.add_argument("--only", choices=["raw", "ours"], help="run one loop (profiling)")
    parser.add_argument(
        "--transports", action="store_true", help="price a bare request through each client"
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also run the fetch without its budget, without its store, and without both",
    )
    parser.add_argument(
        "--server",
        choices=["sim", "llmock"],
        default="sim",
        help="the package's simulator (default), or llmock, an independent mock",
    )
    args = parser.parse_args()
    n = args.n or (500 if args.quick else 5000)
    sim = LLMockProcess() if args.server == "llmock" else SimProcess()
    server = "llmock" if args.server == "llmock" else "simulator"
    print(f"server: {args.server} at {sim.base_url}")
    results: list[tuple[Round, float]] = []
    if args.transports:
        try:
            raw(sim.base_url, "warm-raw", 200)  # warm-up, not measured
            return transports(sim, n, args.rounds, server)
        finally:
            sim.close()
    try:
        with tempfile.TemporaryDirectory(prefix="llmbench-cpu-") as tmp:
            # warm-up, not measured: imports, the first connections, the server's caches
            raw(sim.base_url, "warm-raw", 200)
            ours(sim.base_url, "warm-ours", 200, Path(tmp))
            loops = ["raw", *(PARTS if args.parts else ["ours"])]
            for r in range(args.rounds):
                for which in loops:
                    if args.only and which != args.only:
                        continue
                    server_cpu = sim.cpu_seconds()
                    tag = f"{which.replace(' ', '-')}{r}"
                    got = (
                        raw(sim.base_url, tag, n)
                        if which == "raw"
                        else ours(sim.base_url, tag, n, Path(tmp), which)
                    )
                    results.append((got, sim.cpu_seconds() - server_cpu))
    finally:
        sim.close()
    return report(n, results, server)


def report(n: int, results: list[tuple[Round, float]], server: str = "simulator") -> int:
    print(
        f"\nCPU ceiling: {n} requests a round, {CONCURRENCY} in flight, {server} in its "
        f"own process (no limit, no latency), {os.cpu_count()} CPUs"
    )
    head = (
        f"{'loop':24} {'requests':>8} {'wall s':>7} {'req/s':>7} {'client CPU us/req':>17} "
        f"{'server CPU us/req':>17} {'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for got, server_cpu in results:
        print(
            f"{got.name:24} {got.n:8d} {got.wall:7.2f} {got.rps:7.0f} {got.cpu_us:17.0f} "
            f"{1e6 * server_cpu / got.n:17.0f} {got.errors:6d}"
        )
    raws = [g for g, _ in results if g.name.startswith("raw")]
    our = [g for g, _ in results if g.name == PARTS["ours"][0]]
    parts(results, raws)
    if raws and our:
        best_raw, best_ours = max(g.rps for g in raws), max(g.rps for g in our)
        ratio = best_ours / best_raw
        mean = sum(g.rps for g in our) / len(our) / (sum(g.rps for g in raws) / len(raws))
        paired = statistics.median(o.rps / r.rps for r, o in zip(raws, our, strict=False))
        verdict = "meets" if ratio >= GOAL else "misses"
        print(
            f"ours / raw: {ratio:.2f} (best rounds: {best_ours:.0f} vs {best_raw:.0f} req/s; "
            f"mean of rounds {mean:.2f}; median of paired rounds {paired:.2f}); "
            f"{verdict} the goal of >= {GOAL}"
        )
    failed = sum(g.errors for g, _ in results)
    if failed:
        print(f"{failed} request(s) failed or lost")
    return 1 if failed else 0


def parts(results: list[tuple[Round, float]], raws: list[Round]) -> None:
    """``--parts``: each variant's mean rate against the raw loop's, and its CPU."""
    names = {g.name for g, _ in results}
    if not raws or len(names & {name for name, _, _ in PARTS.values()}) < 2:
        return
    raw_rps = statistics.mean(g.rps for g in raws)
    print("\nmean of rounds against the raw loop's:")
    for name, _, _ in PARTS.values():
        rounds = [g for g, _ in results if g.name == name]
        if rounds:
            rps, cpu = (
                statistics.mean(g.rps for g in rounds),
                statistics.mean(g.cpu_us for g in rounds),
            )
            print(
                f"  {name:24} {rps / raw_rps:5.2f}  ({rps:.0f} req/s, "
                f"{cpu:.0f} us of CPU a request)"
            )


if __name__ == "__main__":
    sys.exit(main())
