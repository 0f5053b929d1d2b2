"""Plan -> fetch -> replay: how a run reaches the account's rate limit.

pytest runs one test at a time per process, so ``-n 8`` alone keeps at most 8 requests in
flight. Instead, before any worker starts, the controlling process:

1. **plans**: runs the same pytest invocation in a subprocess with
   ``PYTEST_LLMBENCH_PHASE=plan``. There the ``llm`` fixture records each request that is
   not stored yet and stops the test with :class:`LLMPending` (a BaseException, so a
   test's ``except Exception`` cannot swallow it). ``--lf``, ``-k``, ``-m`` and
   ``--deselect`` select exactly what the real run will, because the subprocess gets the
   same arguments and a copy of the cache directory (its writes go to the copy, so the
   real ``--lf`` state is never touched).
2. **fetches** every planned request concurrently, paced by the shared budget, saving each
   answer the moment it arrives (live), or through the Batch API (``batch.py``).
3. lets the real session **replay**: the tests find their answers stored. Calls the plan
   could not know (a second call that depends on the first answer) run live, through the
   same budget.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .runtime import PHASE_ENV, is_worker

if TYPE_CHECKING:
    from .runtime import RunState

SPOOL_ENV = "PYTEST_LLMBENCH_SPOOL"
SHARED_ENV = "PYTEST_LLMBENCH_SHARED"
ONLY_ENV = "PYTEST_LLMBENCH_PLAN_ONLY"
#: exit statuses of a plan run that mean "planned": tests failing or none selected is fine
PLAN_OK = (0, 1, 5)


@dataclass(frozen=True)
class PlannedRequest:
    key: str
    nodeid: str
    ordinal: int
    endpoint: str
    body: dict[str, Any]


# ------------------------------------------------------------------------ plan phase
def plan_recorder(config: pytest.Config) -> Callable[[str, str, int, str, dict[str, Any]], None]:
    """The ``record`` callback of the plan phase: one JSON line per unanswered request."""
    path = Path(os.environ[SPOOL_ENV])

    def record(key: str, nodeid: str, ordinal: int, endpoint: str, body: dict[str, Any]) -> None:
        row = {"key": key, "nodeid": nodeid, "ordinal": ordinal, "endpoint": endpoint, "body": body}
        line = json.dumps(row, sort_keys=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    return record


def plan_filter(items: list[pytest.Item]) -> tuple[list[pytest.Item], list[pytest.Item]]:
    """In the plan phase only tests that use ``llm`` and did not opt out run (and, when
    the controller passed a list, only those without stored answers)."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    only_file = os.environ.get(ONLY_ENV)
    only = set(json.loads(Path(only_file).read_text(encoding="utf-8"))) if only_file else None
    for item in items:
        if only is not None and item.nodeid not in only:
            drop.append(item)
            continue
        marker = item.get_closest_marker("llmbench")
        opted_out = marker is not None and marker.kwargs.get("plan", True) is False
        uses_llm = "llm" in getattr(item, "fixturenames", ())
        (keep if uses_llm and not opted_out else drop).append(item)
    return keep, drop


def read_spool(path: Path) -> list[PlannedRequest]:
    """Planned requests, deduplicated by key, in the order they were recorded (a torn
    last line of a killed plan run is skipped: that test is simply not prefetched)."""
    return SpoolReader(path).read_new()


def _plan_command(
    config: pytest.Config, state: RunState, workdir: Path, only: Iterable[str] | None
) -> tuple[list[str], dict[str, str], Path, Path]:
    """The plan subprocess's command line and environment, its spool file and its log."""
    spool = workdir / "plan.jsonl"
    spool.unlink(missing_ok=True)
    only_file = workdir / "plan-only.json"
    only_file.unlink(missing_ok=True)
    if only is not None:
        only_file.write_text(json.dumps(sorted(only)), encoding="utf-8")
    args = list(config.invocation_params.args)
    cache_copy = workdir / "cache"
    shutil.rmtree(cache_copy, ignore_errors=True)
    cachedir = _cache_dir(config)
    if cachedir is not None and cachedir.exists():
        shutil.copytree(cachedir, cache_copy)
    extra = [
        "--maxfail=0",
        "-q",
        "-p",
        "no:randomly",
        "--no-header",
        "-rN",
        f"--basetemp={workdir / 'tmp'}",
    ]
    if not any(str(a).startswith("--rootdir") for a in args):
        # the same node ids as this process, whatever else the arguments name
        extra.append(f"--rootdir={config.rootpath}")
    if cachedir is not None:
        extra += ["-o", f"cache_dir={cache_copy}"]
    if config.pluginmanager.hasplugin("xdist"):
        extra += ["-n", "0"]
    if any(a.startswith(("--junitxml", "--junit-xml")) for a in args):
        extra.append(f"--junitxml={workdir / 'plan-junit.xml'}")
    if any(a.startswith("--llm-report") for a in args):
        extra.append(f"--llm-report={workdir / 'plan-report.json'}")
    env = dict(os.environ)
    env[PHASE_ENV] = "plan"
    env[SPOOL_ENV] = str(spool)
    if only is not None:
        env[ONLY_ENV] = str(only_file)
    env[SHARED_ENV] = json.dumps(state.shared_for_children())
    return [sys.executable, "-m", "pytest", *args, *extra], env, spool, workdir / "plan.log"


def _plan_failed(config: pytest.Config, state: RunState, log: Path, status: int) -> None:
    # collection errors, usage errors...: the real session reports them itself
    from .store import ensure_run_dir

    kept = ensure_run_dir(state.llm_config.run_dir) / "plan.log"
    shutil.copyfile(log, kept)
    tr: Any = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(
            f"llmbench: planning exited with status {status}; the rest runs without "
            f"prefetch (log: {kept})",
            yellow=True,
        )


def run_plan(
    config: pytest.Config, state: RunState, workdir: Path, only: Iterable[str] | None = None
) -> tuple[list[PlannedRequest], float]:
    """Run the plan subprocess; returns the planned requests and the seconds it took.

    ``only`` limits planning to those node ids (the rest of the selection is deselected
    in the subprocess), so a resumed run plans only what has no answer yet.
    """
    started = time.perf_counter()
    cmd, env, spool, log = _plan_command(config, state, workdir, only)
    with log.open("wb") as out:
        proc = subprocess.run(
            cmd,
            cwd=config.invocation_params.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    elapsed = time.perf_counter() - started
    if proc.returncode not in PLAN_OK:
        _plan_failed(config, state, log, proc.returncode)
        return [], elapsed
    return read_spool(spool), elapsed


class SpoolReader:
    """Reads the spool while the plan subprocess still writes it: complete lines only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seen: set[str] = set()

    def read_new(self) -> list[PlannedRequest]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line being written waits for the next read
        self.offset += end
        out = []
        for line in chunk[:end].decode("utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row["key"] not in self.seen:
                self.seen.add(row["key"])
                out.append(
                    PlannedRequest(
                        row["key"],
                        row.get("nodeid", ""),
                        row.get("ordinal", 0),
                        row["endpoint"],
                        row["body"],
                    )
                )
        return out


def _cache_dir(config: pytest.Config) -> Path | None:
    cache = getattr(config, "cache", None)
    return Path(cache._cachedir) if cache is not None else None


# ------------------------------------------------------------------------ controller
def llm_nodeids(items: Iterable[pytest.Item]) -> list[str]:
    """Node ids of the items that use ``llm`` and may be planned."""
    keep, _ = plan_filter(list(items))
    return [item.nodeid for item in keep]


def calls_model(items: Iterable[pytest.Item]) -> bool:
    """Whether any item uses ``llm`` (planned or not): then the run needs a key."""
    return any("llm" in getattr(item, "fixturenames", ()) for item in items)


def _flag_path(state: RunState, workerid: str) -> Path:
    return state.llm_config.run_dir / f"collected-{state.run_token}-{workerid}.json"


def write_collection_flag(
    config: pytest.Config, state: RunState, nodeids: list[str], calls: bool
) -> None:
    from .store import ensure_run_dir

    ensure_run_dir(state.llm_config.run_dir)
    workerid = getattr(config, "workerinput", {}).get("workerid", "main")
    data = {"plan": nodeids, "calls": calls}
    _flag_path(state, workerid).write_text(json.dumps(data), encoding="utf-8")


def read_collection_flag(state: RunState, workerid: str) -> tuple[list[str] | None, bool]:
    """The node ids a worker would plan (None when unknown: then plan everything), and
    whether any of its tests calls the model (True when unknown)."""
    try:
        data = json.loads(_flag_path(state, workerid).read_text(encoding="utf-8"))
        nodeids = [str(n) for n in data["plan"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None, True
    return nodeids, bool(data.get("calls", True))


def remove_collection_flags(state: RunState) -> None:
    run_dir = state.llm_config.run_dir
    if run_dir.is_dir():
        for stale in run_dir.glob(f"collected-{state.run_token}-*.json"):
            stale.unlink(missing_ok=True)


def prefetch_enabled(config: pytest.Config, state: RunState) -> bool:
    if is_worker(config) or state.phase != "run":
        return False
    if state.settings.get("llm_no_prefetch") and not state.llm_config.batch.enabled:
        return False
    if state.record_mode == "none":
        return False  # every answer is in a cassette: each test replays its own at once
    return runs_tests(config)


def runs_tests(config: pytest.Config) -> bool:
    """Whether this session calls test functions (not --collect-only, --setup-only...)."""
    opt = config.option
    shows = ("collectonly", "setuponly", "setupplan", "help")
    return not any(getattr(opt, name, False) for name in shows)


def unanswered(state: RunState, nodeids: list[str] | None) -> list[str] | None:
    """The node ids that have no stored answer at all: only those need planning.

    A case with an answer (a resumed or --lf run) replays; a call of it that is new
    anyway (an edited prompt, a dependent call) runs live through the shared budget.
    None means "plan the whole selection" (the selection is unknown).
    """
    if nodeids is None:
        return None
    answered = state.store.nodeids(since=state.fresh_since)
    return [n for n in nodeids if n not in answered]


def maybe_prefetch(config: pytest.Config, state: RunState, nodeids: list[str] | None) -> None:
    """Plan and fetch before the session runs (controller only)."""
    if not prefetch_enabled(config, state):
        return
    # Batch mode always plans the whole selection: a case with some answers may still
    # have a dependent call to ask, or one in a job still open from an interrupted run;
    # skipping it would send that call live, at full price, or pay for it twice.
    only = None if state.llm_config.batch.enabled else unanswered(state, nodeids)
    if only is not None and not only:
        return  # every selected case has its answers stored: a pure replay
    workdir = Path(tempfile.mkdtemp(prefix="llmbench-plan-"))
    try:
        if state.llm_config.batch.enabled:
            _batch_rounds(config, state, workdir)
        elif state.record_mode is not None:
            # cassettes load the planned cases' files up front: plan first, then fetch
            planned, plan_s = run_plan(config, state, workdir, only)
            if planned:
                state.check_credentials()
                fetch_live(config, state, planned, plan_s)
        else:
            stream_prefetch(config, state, workdir, only)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _batch_rounds(config: pytest.Config, state: RunState, workdir: Path) -> None:
    """Plan, batch, and plan again with the first answers until nothing new is asked.

    Each round is one plan subprocess and (when it found unanswered requests) one fetch
    through the Batch API; a test with a call that depends on an earlier answer needs one
    round per level, at most ``--llm-batch-max-rounds``. Requests still unanswered then,
    and requests whose body changed between rounds (a prompt that is not reproducible),
    fail with that reason instead of being sent again and again.
    """
    from .batch import BatchRunner, clear_errors, fetch_batch, make_runner, record_errors
    from .errors import LLMCallError

    settings = state.llm_config.batch
    state.mode = "batch"
    meta: dict[str, Any] = state.report_meta.setdefault("batch", {"jobs": [], "waited_s": 0.0})
    # failures of earlier invocations are asked again, as a live run would
    clear_errors(state.store)
    runner: BatchRunner | None = None
    asked: set[str] = set()
    slots: dict[tuple[str, int], str] = {}
    errors: dict[str, str] = {}
    rounds = 0
    plan_total = 0.0
    only: set[str] | None = None
    try:
        while True:
            planned, plan_s = run_plan(config, state, workdir, only)
            plan_total += plan_s
            fresh: list[PlannedRequest] = []
            for p in planned:
                if p.key in asked or state.is_answered(p.key):
                    continue  # answered, or failed in this invocation (left to live)
                earlier = slots.get((p.nodeid, p.ordinal))
                if earlier is not None and earlier != p.key:
                    errors[p.key] = (
                        f"call {p.ordinal} of this test sent a different request in plan round "
                        f"{rounds + 1} than before: a prompt that changes from run to run "
                        "(time, randomness) cannot be answered through the Batch API"
                    )
                    continue
                fresh.append(p)
            if not fresh:
                break
            if rounds >= settings.max_rounds:
                for p in fresh:
                    errors[p.key] = (
                        f"not answered: this test needs more than --llm-batch-max-rounds "
                        f"{settings.max_rounds} round(s) of dependent calls"
                    )
                break
            state.check_credentials()
            if runner is None:
                runner = make_runner(config, state)
            rounds += 1
            for p in fresh:
                asked.add(p.key)
                slots[(p.nodeid, p.ordinal)] = p.key
            fetch_batch(config, state, fresh, runner)
            # only a test that stopped at an unanswered call can ask something new
            only = {p.nodeid for p in planned}
    except LLMCallError as exc:
        pytest.exit(f"llmbench: a Batch API call failed: {exc}", returncode=1)
    finally:
        meta["rounds"] = rounds
        meta["plan_s"] = round(plan_total, 3)
        if runner is not None:
            found = [i for i in [*runner.resumed, *runner.job_ids] if i not in runner.lost]
            meta["jobs"] = [*meta["jobs"], *found]
            meta["waited_s"] = round(meta["waited_s"] + runner.waited, 3)
    live = settings.fallback == "live"
    notes: list[str] = list(runner.problems) if runner is not None else []
    job_failed = len(runner.failed_keys) if runner is not None else 0
    if job_failed:
        notes.append(
            f"{job_failed} request(s) failed in the Batch API"
            + ("; left to the live API" if live else "")
        )
    if runner is not None and runner.lost:
        notes.append(f"job(s) unknown to the API, submitted again: {', '.join(runner.lost)}")
    if errors:
        record_errors(state.store, errors, state.run_token)
        deep = sum(1 for e in errors.values() if "max-rounds" in e)
        if deep:
            notes.append(
                f"{deep} request(s) still unanswered after {rounds} round(s) (raise "
                "--llm-batch-max-rounds)" + ("; left to the live API" if live else "")
            )
        if len(errors) > deep:
            notes.append(f"{len(errors) - deep} request(s) changed between plan rounds")
    meta["failed"] = job_failed
    meta["unanswered"] = job_failed + len(errors)
    meta["notes"] = notes


def _summarise(state: RunState, progress: Any, planned: int, plan_s: float, wall: float) -> None:
    rate = progress.done / wall if wall > 0 else 0.0
    state.mode = "prefetch"
    state.summary_notes.append(
        f"llmbench prefetch: planned {planned} request(s) in {plan_s:.1f}s, fetched "
        f"{progress.done} in {wall:.1f}s ({rate:.1f}/s), {progress.failed} failed "
        f"(retried live in the run), 429s {progress.rate_limited}, retries {progress.retries}"
    )
    state.report_meta["prefetch"] = {
        # with streaming, plan_s overlaps the fetch; plan_lead_s is the wait before the
        # first request could be sent, the planning cost proper
        "plan_lead_s": state.report_meta.pop("plan_lead_s", round(plan_s, 3)),
        "planned": planned,
        "fetched": progress.done,
        "failed": progress.failed,
        "plan_s": round(plan_s, 3),
        "fetch_s": round(wall, 3),
        "rate_limited": progress.rate_limited,
    }


def fetch_live(
    config: pytest.Config, state: RunState, planned: list[PlannedRequest], plan_s: float
) -> None:
    """Send every planned request concurrently within the budget; store each answer."""
    import asyncio

    from .progress import Progress

    todo = [p for p in planned if not state.is_answered(p.key)]
    progress = Progress(config, "llmbench prefetch", total=len(todo), rpm=state.llm_config.rpm)
    started = time.perf_counter()
    asyncio.run(_fetch_all(state, todo, progress))
    progress.finish()
    _summarise(state, progress, len(planned), plan_s, time.perf_counter() - started)


class _Fetcher:
    """Sends planned requests through the client's one call path, saving each answer."""

    def __init__(self, state: RunState, progress: Any) -> None:
        import asyncio

        import openai

        self.state = state
        self.progress = progress
        self.shared = state.client._shared
        self.gate = asyncio.Semaphore(state.llm_config.max_concurrency)
        self.aclient = openai.AsyncOpenAI(**self.shared._client_kwargs())

    def _saver(self, req: PlannedRequest) -> Callable[[Any], None]:
        def save(raw: Any) -> None:
            self.state.store.put(
                req.key,
                nodeid=req.nodeid,
                ordinal=req.ordinal,
                endpoint=req.endpoint,
                request=req.body,
                response=raw.body,
                headers=raw.headers,
                latency_s=raw.latency,
                source="prefetch",
                replace=self.state.fresh_since is not None,
                attempts=raw.attempts,
                rate_limited=raw.rate_limited,
            )

        return save

    def _record_failure(self, req: PlannedRequest, exc: Any) -> None:
        """A request that no retry can mend (400, 401, 403, 404, 422, quota) fails its
        case in the run without being sent again; a retryable one is tried live."""
        from .store import Failure

        if exc.retryable:
            return
        run = self.state.run_token
        failure = Failure(str(exc), "prefetch", run, exc.attempts, exc.rate_limited)
        self.state.store.record_failures({req.key: failure})

    async def one(self, req: PlannedRequest) -> None:
        from .cassettes import case_scope
        from .errors import LLMCallError

        async with self.gate:
            try:
                with case_scope(req.nodeid):  # files the request under its case's cassette
                    raw = await self.shared.asend(
                        req.body, self.state.client.stats, self.aclient, self._saver(req)
                    )
            except LLMCallError as exc:
                self._record_failure(req, exc)
                self.progress.fail(exc)
                return
            usage = raw.body.get("usage") or {}
            self.progress.advance(
                raw.attempts - 1, raw.rate_limited, int(usage.get("total_tokens") or 0)
            )

    @property
    def slow_start(self) -> bool:
        """Limits unknown: the first request goes alone so the budget learns them."""
        return self.state.llm_config.rpm is None and self.state.llm_config.tpm is None

    async def close(self) -> None:
        await self.aclient.close()


async def _fetch_all(state: RunState, todo: list[PlannedRequest], progress: Any) -> None:
    from .cassettes import fetch_cassette

    fetcher = _Fetcher(state, progress)
    try:
        # with cassettes: one in-memory cassette of all planned cases, saved split per case
        with fetch_cassette(state, [r.nodeid for r in todo]):
            await fetcher.shared.slow_start(todo, fetcher.one)
    finally:
        await fetcher.close()


def stream_prefetch(
    config: pytest.Config, state: RunState, workdir: Path, only: Iterable[str] | None
) -> None:
    """Plan and fetch at once: requests are sent while the plan subprocess still finds
    more, so planning costs little more than the subprocess's start-up."""
    import asyncio

    from .progress import Progress

    progress = Progress(config, "llmbench prefetch", total=0, rpm=state.llm_config.rpm)
    progress.open_ended = True
    started = time.perf_counter()
    planned, plan_s, status, log = asyncio.run(_stream(config, state, workdir, only, progress))
    if status not in PLAN_OK:
        _plan_failed(config, state, log, status)
    if planned:
        progress.finish()
        _summarise(state, progress, planned, plan_s, time.perf_counter() - started)


async def _stream(
    config: pytest.Config,
    state: RunState,
    workdir: Path,
    only: Iterable[str] | None,
    progress: Any,
) -> tuple[int, float, int, Path]:
    import asyncio

    cmd, env, spool, log = _plan_command(config, state, workdir, only)
    queue: asyncio.Queue[PlannedRequest | None] = asyncio.Queue()
    reader = SpoolReader(spool)
    fetcher = _Fetcher(state, progress)
    learned = asyncio.Event()
    if not fetcher.slow_start:
        learned.set()
    started = time.perf_counter()
    plan_s = 0.0
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=config.invocation_params.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

        async def produce() -> None:
            nonlocal plan_s
            checked = False
            while True:
                try:  # a real wait on the subprocess, woken every 50 ms to read the spool
                    await asyncio.wait_for(proc.wait(), timeout=0.05)
                    exited = True
                except asyncio.TimeoutError:
                    exited = False
                for req in reader.read_new():
                    if state.is_answered(req.key):
                        continue
                    if not checked:
                        state.check_credentials()
                        checked = True
                        state.report_meta["plan_lead_s"] = round(time.perf_counter() - started, 3)
                    progress.total += 1
                    queue.put_nowait(req)
                if exited:
                    break
            plan_s = time.perf_counter() - started
            progress.open_ended = False
            for _ in range(workers):
                queue.put_nowait(None)

        async def consume(first: bool) -> None:
            while (req := await queue.get()) is not None:
                if not learned.is_set() and not first:
                    await learned.wait()
                await fetcher.one(req)
                learned.set()

        workers = state.llm_config.max_concurrency
        try:
            await asyncio.gather(produce(), *(consume(i == 0) for i in range(workers)))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await fetcher.close()
    return progress.total, plan_s, int(proc.returncode or 0), log
