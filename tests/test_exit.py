"""How a process that ran llmbench cases exits (``runtime.collect_then_freeze``).

Real pytest processes, on the built-in simulator: a conftest registers an ``atexit``
handler when it is imported, before the plugin registers its own, so it runs after the
plugin's and sees what the plugin left for the interpreter's shutdown.
"""

from __future__ import annotations

import json

import pytest

CONFTEST = """
import atexit, gc, json, os

import pytest

ROOT = {root!r}
ROLE = "plan" if os.environ.get("PYTEST_LLMBENCH_PHASE") else "main"

def pytest_configure(config):
    global ROLE
    if hasattr(config, "workerinput"):  # an xdist worker of this run
        ROLE = config.workerinput["workerid"]

class Holder:
    def __init__(self):
        self.me = self  # a reference cycle: only the garbage collector frees it

    def __del__(self, open=open):
        with open(os.path.join(ROOT, "finalized-" + ROLE + ".txt"), "w") as fh:
            fh.write("finalized")

def _leave_garbage():
    gc.disable()  # it stays garbage until something collects it
    Holder()

@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # after pytest's own last collection (its cleanups) and after the plugin registered
    # its handler: runs before it, at exit
    atexit.register(_leave_garbage)
    with open(os.path.join(ROOT, "unconfigure-" + ROLE + ".json"), "w") as fh:
        json.dump({{"frozen": gc.get_freeze_count()}}, fh)

def _seen():
    with open(os.path.join(ROOT, "exit-" + ROLE + ".json"), "w") as fh:
        json.dump({{"frozen": gc.get_freeze_count()}}, fh)

atexit.register(_seen)
"""

SUITE = """
import pytest

@pytest.mark.llmbench(dataset=[{"id": "a", "q": "What is 2+2?"}], temperatures=[0.0])
def test_q(case, llm):
    assert llm.generate_response(case["q"], max_tokens=5).ok
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_process_that_ran_cases_exits_frozen_and_still_finalizes_its_garbage(
    pytester: pytest.Pytester, workers: str
) -> None:
    pytester.makeconftest(CONFTEST.format(root=str(pytester.path)))
    pytester.makepyfile(test_exit_suite=SUITE)
    result = pytester.runpytest_subprocess("--llm-sim", "-n", workers, "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    # Then the controller's shutdown had its objects frozen (its own final collections
    # skip them)...
    seen = json.loads((pytester.path / "exit-main.json").read_text("utf-8"))
    assert seen["frozen"] > 10_000, seen
    # ...and garbage in a reference cycle at exit was still finalized: the one
    # collection before the freeze did it, as the interpreter's own would have
    assert (pytester.path / "finalized-main.txt").read_text("utf-8") == "finalized"

    # ...and the objects were frozen when the session ended, before pytest's own final
    # collections (at unconfigure and in its cleanups; this looks between the two), in
    # every process of the run
    # (with -n 2: the worker that ran the one case; the other ran none and is left alone)
    def frozen(role: str) -> int:
        path = pytester.path / f"unconfigure-{role}.json"
        return int(json.loads(path.read_text("utf-8"))["frozen"])

    assert frozen("main") > 10_000 and frozen("plan") > 10_000
    if workers == "2":
        assert sorted(frozen(gw) > 10_000 for gw in ("gw0", "gw1")) == [False, True]


def test_an_in_process_run_leaves_the_calling_process_unfrozen(
    pytester: pytest.Pytester,
) -> None:
    # pytest.main() in a process that goes on (here pytester's in-process run inside this
    # session): nothing is frozen there, at the end of its session or later
    import gc

    pytester.makepyfile(test_exit_suite=SUITE)
    before = gc.get_freeze_count()
    result = pytester.runpytest_inprocess("--llm-sim", "-n", "0", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert gc.get_freeze_count() == before


def test_a_run_without_llmbench_cases_is_left_alone(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.format(root=str(pytester.path)))
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess("-n", "0", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert json.loads((pytester.path / "exit-main.json").read_text("utf-8")) == {"frozen": 0}


FROZEN_SEEN = """
import gc, json, os

import pytest

def pytest_configure(config):
    config.pluginmanager.register(Seen(), "seen")

class Seen:
    seen = []

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report):
        if report.when == "teardown":
            self.seen.append(gc.get_freeze_count())

    def pytest_sessionfinish(self, session):
        with open("frozen-during.json", "w") as fh:
            json.dump(self.seen, fh)
"""

MANY = """
import pytest

@pytest.mark.llmbench(dataset=[{"id": f"q{i}", "q": f"{i} + 1?"} for i in range(520)])
def test_q(case, llm):
    assert llm.generate_response(case["q"], max_tokens=5).ok
"""


def test_a_long_run_collects_and_freezes_as_it_goes(pytester: pytest.Pytester) -> None:
    # every 500 tests a process that exits after its session collects and freezes, so
    # the collection at its end walks only what the last tests left
    pytester.makeconftest(FROZEN_SEEN)
    pytester.makepyfile(test_exit_suite=MANY)
    result = pytester.runpytest_subprocess("--llm-sim", "-n", "0", "-p", "no:randomly")
    result.assert_outcomes(passed=520)
    seen = json.loads((pytester.path / "frozen-during.json").read_text("utf-8"))
    assert len(seen) == 520
    assert seen[498] == 0 and seen[499] > 10_000  # the 500th test's report froze them
