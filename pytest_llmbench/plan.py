"""Planning: which requests a run will make, found by running the tests up to their
first unanswered call in a second process.

The controlling process runs the same pytest invocation in a second process (a fork
made at configure time, ``plan_fork.py``; else a subprocess) with
``PYTEST_LLMBENCH_PHASE=plan``. There the ``llm`` fixture records each request that has
no stored answer (:func:`plan_recorder`, one JSON line per request in a spool file) and
stops the test with ``LLMPending``. ``--lf``, ``-k``, ``-m`` and ``--deselect`` select
exactly what the real run will, because the plan gets the same arguments, the same
rootdir and a copy of the cache directory (its writes go to the copy, so the real ``--lf``
state is never touched). :class:`SpoolReader` reads the spool while it is still being
written, so fetching (``engine.py``, ``batch.py``) starts before planning ends.

With xdist the controller never collects: each worker writes a collection flag (the node
ids it would plan, and whether any test calls the model) that the controller reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .progress import note
from .runtime import PHASE_ENV
from .store import PlannedRequest as PlannedRequest  # the planned requests are store records
from .tokens import (
    counts_exactly_now,
    exact_available,
    request_prompt_tokens,
    warm_in_background,
)

if TYPE_CHECKING:
    from .runtime import RunState

SPOOL_ENV = "PYTEST_LLMBENCH_SPOOL"
SHARED_ENV = "PYTEST_LLMBENCH_SHARED"
ONLY_ENV = "PYTEST_LLMBENCH_PLAN_ONLY"
#: exit statuses of a plan run that mean "planned": tests failing or none selected is fine
PLAN_OK = (0, 1, 5)


# ------------------------------------------------------------------------ plan phase
#: the plan phase's ``record(key, nodeid, ordinal, endpoint, body)``
Recorder = Callable[[str, str, int, str, dict[str, Any]], None]


def plan_recorder(config: pytest.Config) -> Recorder:
    """The ``record`` callback of the plan phase: one JSON line per unanswered request,
    with its prompt's token count (counted here, in parallel with the fetch, which then
    need not count it for the budget). Loading the encoding takes 0.2 s: it loads in a
    thread from the first request on, and the requests recorded meanwhile go without a
    count (the fetch counts those), so the first line is not held up."""
    path = Path(os.environ[SPOOL_ENV])

    def record(key: str, nodeid: str, ordinal: int, endpoint: str, body: dict[str, Any]) -> None:
        row = {"key": key, "nodeid": nodeid, "ordinal": ordinal, "endpoint": endpoint, "body": body}
        if _tokens_loaded(body.get("model")):
            with contextlib.suppress(Exception):  # a body it cannot count: the fetch says why
                row["prompt_tokens"] = request_prompt_tokens(body)
        line = json.dumps(row, sort_keys=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    return record


def _tokens_loaded(model: object) -> bool:
    """Whether ``model``'s prompts can be counted without waiting: always without the
    ``tokens`` extra (the estimate); with it, once its encoding has loaded (the first
    call starts loading it in a thread, once for the process: a recorder is made for
    each test)."""
    if not exact_available():
        return True
    name = model if isinstance(model, str) else None
    ready = counts_exactly_now(name)  # before a load starts: the first call never waits
    warm_in_background(name)
    return ready


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


def plan_command(
    config: pytest.Config, state: RunState, workdir: Path, only: Iterable[str] | None
) -> tuple[list[str], dict[str, str], Path, Path]:
    """The plan's pytest arguments (after ``python -m pytest``) and environment, its
    spool file and its log."""
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
    return [*args, *extra], env, spool, workdir / "plan.log"


def plan_failed(state: RunState, log: Path, status: int) -> str:
    """The line saying planning failed (its log is kept in the run directory); collection
    errors, usage errors...: the real session reports them itself."""
    from .store import ensure_run_dir

    kept = ensure_run_dir(state.llm_config.run_dir) / "plan.log"
    shutil.copyfile(log, kept)
    line = f"llmbench: planning exited with status {status}; the rest runs without prefetch"
    return f"{line} (log: {kept})"


def run_plan(
    config: pytest.Config, state: RunState, workdir: Path, only: Iterable[str] | None = None
) -> tuple[list[PlannedRequest], float]:
    """Run the plan subprocess; returns the planned requests and the seconds it took.

    ``only`` limits planning to those node ids (the rest of the selection is deselected
    in the subprocess), so a resumed run plans only what has no answer yet.
    """
    started = time.perf_counter()
    args, env, spool, log = plan_command(config, state, workdir, only)
    with log.open("wb") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", *args],
            cwd=config.invocation_params.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    elapsed = time.perf_counter() - started
    if proc.returncode not in PLAN_OK:
        note(config, plan_failed(state, log, proc.returncode), yellow=True)
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
                        _count(row.get("prompt_tokens")),
                    )
                )
        return out


def _count(value: object) -> int | None:
    """A spool line's token count: a count, or None (then the fetch counts)."""
    return value if type(value) is int and value >= 0 else None


def _cache_dir(config: pytest.Config) -> Path | None:
    """pytest's cache directory, resolved as pytest resolves it (None without the cache
    plugin, ``-p no:cacheprovider``)."""
    if getattr(config, "cache", None) is None:
        return None
    raw = os.path.expanduser(os.path.expandvars(str(config.getini("cache_dir"))))
    return config.rootpath / raw  # an absolute ini value replaces the root


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

    workerid = getattr(config, "workerinput", {}).get("workerid", "main")
    data = {"plan": nodeids, "calls": calls}
    path = _flag_path(state, workerid)
    try:
        ensure_run_dir(state.llm_config.run_dir)
        path.write_text(json.dumps(data), encoding="utf-8")
    except OSError:
        # no room (a full disk): without a flag the controller plans everything, and the
        # run meets the full disk where it can say so (saving an answer stops the run)
        path.unlink(missing_ok=True)


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


def runs_tests(config: pytest.Config) -> bool:
    """Whether this session calls test functions (not --collect-only, --setup-only...)."""
    opt = config.option
    shows = ("collectonly", "setuponly", "setupplan", "help")
    return not any(getattr(opt, name, False) for name in shows)
