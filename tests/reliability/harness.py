"""The battery's harness for real runs: a generated project, its pytest processes, their
process trees, and the simulator's and the store's accounts of what was paid.

Used by ``test_faults.py``, ``test_storms.py``, ``test_kills.py`` and
``test_concurrency_stress.py``. Every run is ``python -m pytest`` in a subprocess of its
own session (so a SIGKILL of its group leaves nothing behind), against a simulator
started by the test in this process, over HTTP, with a fake key.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_llmbench.report import validate_report
from pytest_llmbench.sim import Simulator
from pytest_llmbench.sim.answers import body_hash
from pytest_llmbench.store import STORE_FILENAME, ResponseStore

from ..helpers import FAKE_KEY, UNNEEDED_PLUGINS, wait_for

#: a run that takes longer than this is stuck: it is killed and the test fails
RUN_TIMEOUT_S = 120.0

#: one call per case, graded on the exact answer: a case cannot pass without a real one
ONE_CALL = """
import pytest

@pytest.mark.llmbench(dataset="{dataset}", temperatures=[0.0], id="qid"{extra})
def {name}(case, llm):
    r = llm.generate_response(case["question"], max_tokens=8)
    assert r.text == case["answer"], (case["qid"], r.text)
"""

#: ONE_CALL as ``test_qa`` over ``data.jsonl``: the battery's plain suite
QA_SUITE = ONE_CALL.format(dataset="data.jsonl", extra="", name="test_qa")
#: a Batch API job that is done at once (the simulator's job phases shortened)
FAST_BATCHES = {
    "batch_validating_seconds": 0.05,
    "batch_finalizing_seconds": 0.05,
    "batch_requests_per_second": None,
}

#: two calls per case, the second built from the first answer: the plan cannot know it,
#: so it is sent live while the tests run (the replay stage has work of its own)
TWO_CALLS = """
import pytest

@pytest.mark.llmbench(dataset="{dataset}", temperatures=[0.0], id="qid"{extra})
def {name}(case, llm):
    first = llm.generate_response(case["question"], max_tokens=8)
    assert first.text == case["answer"], (case["qid"], first.text)
    second = llm.generate_response("Spell backwards: " + first.text, max_tokens=8)
    assert second.text == case["answer"][::-1], (case["qid"], second.text)
"""


def rows(n: int, prefix: str = "q") -> list[dict[str, str]]:
    """``n`` questions with pairwise distinct answers, so a mixed-up answer cannot pass."""
    return [
        {
            "qid": f"{prefix}{i:04d}",
            "question": f"What is the secret word of {prefix} item {i}?",
            "answer": f"W{prefix}{i}z",
        }
        for i in range(n)
    ]


def answer_key(items: Iterable[Mapping[str, str]], *, dependent: bool = False) -> list[Any]:
    """The simulator's answer key: every question answered right (``p_correct`` 1)."""
    key: list[dict[str, Any]] = []
    for it in items:
        key.append({"question": it["question"], "correct": it["answer"], "wrong": ["nope"]})
        if dependent:
            key.append(
                {
                    "question": "Spell backwards: " + it["answer"],
                    "correct": it["answer"][::-1],
                    "wrong": ["nope"],
                }
            )
    return key


class KnownProblem(AssertionError):
    """A failure the battery found and reported: a test that raises it is marked
    ``xfail(raises=KnownProblem, strict=True)`` with the reason, so any other failure
    of that test still fails, and a fix makes it pass (and the mark must go)."""


@dataclass
class Finished:
    """A run that ended (by itself, or killed)."""

    returncode: int
    output: str

    def line(self, pattern: str) -> str:
        """The first output line matching ``pattern`` (a regular expression)."""
        for line in self.output.splitlines():
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.output[-3000:]}")


class Run:
    """One ``python -m pytest`` process of a project, started in a session of its own."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log = log

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[int]:
        """The pids of the run's processes: pytest's, its descendants, and the plan
        subprocess (a session of its own, but a child of pytest all the same)."""
        return [self.pid, *descendants(self.pid)]

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> Finished:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(
                f"the run did not end within {timeout:.0f} s:\n{self.output()[-3000:]}"
            ) from None
        return Finished(code, self.output())

    def kill_all(self) -> None:
        """SIGKILL every process of the run (cleanup: what the tests kill is chosen)."""
        for pid in self.tree():
            _kill(pid)
        _killpg(self.pid)
        self.proc.wait()


@dataclass
class Project:
    """A generated benchmark project in ``path``, answered by ``sim``."""

    path: Path
    sim: Simulator
    env_extra: dict[str, str] = field(default_factory=dict)
    runs: int = 0

    def __post_init__(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
        self.tmp = self.path / "tmp"  # TMPDIR of the runs: the plan spools live here
        self.tmp.mkdir(exist_ok=True)
        self.base_url = self.sim.base_url  # the store files answers under it

    @property
    def run_dir(self) -> Path:
        return self.path / ".llmbench"

    def dataset(self, name: str, items: Sequence[Mapping[str, str]]) -> None:
        text = "".join(json.dumps(dict(r)) + "\n" for r in items)
        (self.path / name).write_text(text, encoding="utf-8")

    def suite(
        self,
        module: str,
        template: str,
        dataset: str,
        name: str = "test_qa",
        extra: str = "",
    ) -> None:
        text = template.format(dataset=dataset, name=name, extra=extra)
        (self.path / f"{module}.py").write_text(text, encoding="utf-8")

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LLMBENCH_", "PYTEST_LLMBENCH_", "OPENAI_", "PYTEST_XDIST"))
            and k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_CURRENT_TEST")
        }
        env.update(
            OPENAI_API_KEY=FAKE_KEY,
            LLMBENCH_BASE_URL=self.base_url,
            TMPDIR=str(self.tmp),
            PYTHONUNBUFFERED="1",  # the output file shows each stage as it happens
        )
        env.update(self.env_extra)
        return env

    def start(self, *args: str) -> Run:
        self.runs += 1
        log = self.path / f"run-{self.runs}.log"
        cmd = [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider"]
        # plugins of this environment that the runs do not need: a quarter of a second of
        # start-up less for each of the battery's hundred-odd pytest processes
        for name in UNNEEDED_PLUGINS:
            cmd += ["-p", f"no:{name}"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*cmd, *args],
                cwd=self.path,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Run(proc, log)

    def run(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> Finished:
        run = self.start(*args)
        try:
            return run.wait(timeout)
        finally:
            if run.alive():
                run.kill_all()

    def report(self, name: str = "report.json") -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / name).read_text(encoding="utf-8"))
        problems = validate_report(data)
        assert problems == [], problems
        return data

    @contextmanager
    def store(self) -> Iterator[ResponseStore]:
        # answers are filed under the server that gave them: the simulator's base URL
        with ResponseStore.open(self.run_dir, origin=self.base_url) as store:
            yield store

    def stored_hashes(self) -> dict[str, str]:
        """``{simulator body hash: store key}`` of every stored answer."""
        if not (self.run_dir / STORE_FILENAME).exists():
            return {}
        with self.store() as store:
            found = store.get_many(store.keys())
        return {body_hash(s.request): key for key, s in found.items()}


def litter(project: Project) -> str:
    """What killed runs left behind, e.g. ``2 fetch journals, 1 plan temp dir`` ("" for
    nothing): files a run removes when it ends, which a SIGKILL keeps it from doing."""
    kinds = {
        "fetch journal": list(project.run_dir.glob("fetch-*.journal")),
        "collection flag": list(project.run_dir.glob("collected-*.json")),
        "stop file": list(project.run_dir.glob("stop-*.json")),
        "plan temp dir": list(project.tmp.glob("llmbench-plan-*")),
    }
    return ", ".join(f"{len(v)} {k}{'s' if len(v) != 1 else ''}" for k, v in kinds.items() if v)


def check_clean(text: str) -> None:
    """No traceback and no internal error anywhere in a run's output."""
    for marker in ("Traceback (most recent call last)", "INTERNALERROR"):
        assert marker not in text, text[-4000:]


# ------------------------------------------------------------------- paid twice
@dataclass
class RunAccount:
    """What the simulator answered during one run, against what the store gained."""

    answered: int  # answers delivered (the simulator's ``chat_answered``)
    newly_stored: int  # answers stored by the end that were not at the start
    paid_twice: int  # answers to a body that was stored when the run began
    asked_again: int  # answers to a body answered before, not stored at the start

    @property
    def not_stored(self) -> int:
        """Answers delivered but not stored by the end: cut off by a kill between the
        server and the store (or, in a run nobody killed, asked twice in the run)."""
        return self.answered - self.newly_stored - self.paid_twice


class PaidTwice:
    """The simulator's account of a sequence of runs (:class:`RunAccount` per run).

    Before each run, :meth:`before_run` notes the answers the store holds, the simulator's
    answer count and its per-body repeat counts; :meth:`after_run` closes the run's
    account. A body answered again that was stored when the run began is a stored answer
    paid twice (never allowed). One answered again that was not stored was cut off by an
    earlier kill, so at most as many as earlier runs left unstored.
    """

    def __init__(self, project: Project) -> None:
        self.project = project
        self.runs: list[RunAccount] = []
        self._stored: set[str] = set()
        self._answered = 0
        self._repeats: dict[str, int] = {}

    def before_run(self) -> None:
        self._stored = set(self.project.stored_hashes())
        stats = self.project.sim.stats()
        self._answered = int(stats["chat_answered"])
        self._repeats = dict(stats["duplicate_body_hashes"])

    def after_run(self) -> RunAccount:
        stats = self.project.sim.stats()
        paid = again = 0
        for h, times in dict(stats["duplicate_body_hashes"]).items():
            new = times - self._repeats.get(h, 0)
            if new > 0 and h in self._stored:
                paid += new
            elif new > 0:
                again += new
        stored = set(self.project.stored_hashes())
        account = RunAccount(
            answered=int(stats["chat_answered"]) - self._answered,
            newly_stored=len(stored - self._stored),
            paid_twice=paid,
            asked_again=again,
        )
        self.runs.append(account)
        return account

    @property
    def paid_twice(self) -> int:
        return sum(r.paid_twice for r in self.runs)

    @property
    def asked_again(self) -> int:
        return sum(r.asked_again for r in self.runs)

    @property
    def cut_off(self) -> int:
        return sum(r.not_stored for r in self.runs)


# ------------------------------------------------------------------- processes
def _ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields start after the last ")"
        fields_ = stat[stat.rfind(")") + 2 :].split()
        out[int(entry)] = int(fields_[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), from ``/proc``."""
    ppids = _ppids()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop(0)
        kids = sorted(p for p, pp in ppids.items() if pp == parent)
        found += kids
        frontier += kids
    return found


def environ(pid: int) -> dict[str, str]:
    """A process's environment (empty when it has gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


#: how execnet starts an xdist worker (``popen`` gateway): its command line ends so
_EXECNET = "exec(eval(sys.stdin.readline()))"


def xdist_workers(run: Run) -> list[int]:
    """The run's xdist worker processes (children of pytest started by execnet)."""
    return [p for p in descendants(run.pid) if _EXECNET in cmdline(p) and alive(p)]


def plan_process(run: Run) -> int | None:
    """The run's plan process, if one is running: the one whose output goes to the
    plan's log (a fork of the run keeps the run's command line and the environment it
    started with, as ``/proc`` shows them, so neither tells)."""
    for p in descendants(run.pid):
        if plan_spool(p) is not None and alive(p):
            return p
    return None


def plan_spool(pid: int) -> Path | None:
    """The spool a plan process writes (beside its log, its standard output), or None
    for a process that is not one."""
    try:
        out = Path(os.readlink(f"/proc/{pid}/fd/1"))
    except OSError:
        return None
    if out.name == "plan.log" and out.parent.name.startswith("llmbench-plan-"):
        return out.parent / "plan.jsonl"
    return None


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _killpg(pid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def sigkill(pid: int) -> None:
    """SIGKILL one process (not its group: what happens to the rest is the point)."""
    _kill(pid)


def wait_gone(pids: Iterable[int], what: str, timeout: float = 20.0) -> None:
    """Wait until every one of ``pids`` has exited; fails naming the ones still there."""
    left = list(pids)

    def gone() -> bool:
        left[:] = [p for p in left if alive(p)]
        return not left

    try:
        wait_for(gone, what, timeout=timeout, interval=0.02)
    except AssertionError:
        described = {p: cmdline(p)[:120] for p in left}
        for p in left:
            _kill(p)
        raise AssertionError(f"{what}: still running after {timeout:.0f} s: {described}") from None
