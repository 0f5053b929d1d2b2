"""The plan process as a fork of the run's process (``plan_fork.py``).

Real pytest runs in subprocesses, on the built-in simulator: a conftest records, in
each process, its pid, its parent's and its command line. A fork keeps the command line
of the process it was forked from; a plan subprocess has its own (``python -m pytest``
with the plan's extra arguments).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.plan_fork import FORK_ENV

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks only on Linux")

CONFTEST = """
import json, os

import pytest

def pytest_configure(config):
    if hasattr(config, "workerinput"):
        return
    role = "plan" if os.environ.get("PYTEST_LLMBENCH_PHASE") else "run"
    with open("/proc/self/cmdline", "rb") as fh:
        cmdline = fh.read().decode().split("\\0")
    seen = {"pid": os.getpid(), "ppid": os.getppid(), "cmdline": cmdline}
    with open(f"process-{role}.json", "w") as fh:
        json.dump(seen, fh)
"""

SUITE = """
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0, 1.0], id="qid")
def test_q(case, llm):
    assert llm.generate_response(case["question"], max_tokens=8).ok
"""


def _project(pytester: pytest.Pytester, items: int = 6) -> None:
    rows = [{"qid": f"q{i}", "question": f"What is {i} + {i}?"} for i in range(items)]
    (pytester.path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_fork_suite=SUITE)
    pytester.makeini("[pytest]\n")


def _seen(pytester: pytest.Pytester, role: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pytester.path / f"process-{role}.json").read_text())
    return data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status != "Z"  # a zombie has exited; only its parent's wait is missing


@LINUX
@pytest.mark.parametrize("fork", ["1", "0"])
def test_the_plan_runs_in_a_fork_of_the_run_unless_turned_off(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, fork: str
) -> None:
    _project(pytester)
    monkeypatch.setenv(FORK_ENV, fork)
    result = pytester.runpytest_subprocess("--llm-sim", "-n", "2", "--llm-report", "r.json")
    result.assert_outcomes(passed=12)
    run, plan = _seen(pytester, "run"), _seen(pytester, "plan")
    # the run made the plan process, which has exited
    assert plan["ppid"] == run["pid"] and not _alive(plan["pid"])
    if fork == "1":
        # forked: the run's own command line, no interpreter started again
        assert plan["cmdline"] == run["cmdline"]
    else:
        # a subprocess: python -m pytest with the run's arguments and the plan's own
        assert plan["cmdline"] != run["cmdline"] and "--maxfail=0" in plan["cmdline"]
    # either way every case was planned and fetched once, before its test asked
    report = json.loads((pytester.path / "r.json").read_text())
    prefetch = report["run"]["prefetch"]
    assert (prefetch["planned"], prefetch["fetched"], prefetch["failed"]) == (12, 12, 0)
    assert all(c["requests"] == 1 and c["cached"] == 0 for c in report["cases"])


@LINUX
def test_a_fork_the_run_does_not_need_exits_with_it(pytester: pytest.Pytester) -> None:
    _project(pytester)
    first = pytester.runpytest_subprocess("--llm-sim", "-n", "0")
    first.assert_outcomes(passed=12)
    # every answer is stored now: the second run forks (a store exists) but plans nothing
    (pytester.path / "process-plan.json").unlink()
    pytester.makeconftest(
        CONFTEST
        + """
def pytest_sessionfinish(session):
    me = os.getpid()
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == me]
    with open("children.json", "w") as fh:
        json.dump(children, fh)

def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None
"""
    )
    second = pytester.runpytest_subprocess("--llm-sim", "-n", "0")
    second.assert_outcomes(passed=12)
    assert not (pytester.path / "process-plan.json").exists()  # nothing was planned
    children = json.loads((pytester.path / "children.json").read_text())
    assert len(children) == 1  # the waiting fork, during the session...
    assert not _alive(children[0])  # ...gone with the run


PROBE = """
import _thread, sys, threading
from pytest_llmbench.plan_fork import can_fork
alone = can_fork()
stop = threading.Event()
if sys.argv[1] == "threading":
    threading.Thread(target=stop.wait).start()
else:  # as execnet starts its threads in an xdist worker: threading does not list it
    started = threading.Event()
    _thread.start_new_thread(lambda: (started.set(), stop.wait()), ())
    started.wait()
print(alone, can_fork())
stop.set()
"""


@LINUX
@pytest.mark.parametrize(
    ("setting", "thread", "expected"),
    [
        (None, "threading", "True False"),
        (None, "_thread", "True False"),
        ("0", "threading", "False False"),
    ],
)
def test_no_fork_where_another_thread_runs_or_when_turned_off(
    setting: str | None, thread: str, expected: str
) -> None:
    # a fresh process (this one has xdist's threads): alone it may fork; once a second
    # thread runs it may not (the fork would copy whatever lock that thread holds)
    env = {k: v for k, v in os.environ.items() if k != FORK_ENV}
    if setting is not None:
        env[FORK_ENV] = setting
    out = subprocess.run(
        [sys.executable, "-c", PROBE, thread],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == expected.split()
