"""How a run stops: a fatal refusal ends it at once, Ctrl-C and SIGTERM keep what is in
flight, and the tests that run while the prefetch fetches wait for their own answers.

Every run here is a real pytest process (``runpytest_subprocess``, ``-n 2`` where it
matters) against a simulator over HTTP that counts what it was sent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.errors import FATAL_EXIT_STATUS
from pytest_llmbench.interrupts import in_pytest
from pytest_llmbench.sim import SimConfig, Simulator

from .helpers import FAKE_KEY, wait_for
from .test_plugin import read_report, write_dataset

SUITE = """
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0], id="qid")
def test_qa(case, llm):
    r = llm.generate_response(case["question"])
    assert r.text
"""

#: each kind of refusal that every other request would get too, and a phrase of its line
FATAL: dict[str, tuple[dict[str, Any], list[str], str]] = {
    "401 wrong key": ({"api_keys": ["sk-test-fake-other-key-0009"]}, [], "(401)"),
    "403 no access": ({"forbidden_models": ["gpt-4o-mini"]}, [], "(403)"),
    "429 quota": ({"quota_exceeded": True}, [], "insufficient_quota"),
    "404 model": ({}, ["--llm-model", "gpt-9-nonexistent"], "(404)"),
    # a reasoning model the client does not know by name (gpt-5 itself is refused at
    # collection): the API's first refusal of temperature 0 stops the run
    "400 parameter": (
        {"models": ["acme-reasoner-1"], "reasoning_models": ["acme-reasoner"]},
        ["--llm-model", "acme-reasoner-1"],
        "does not accept parameter",
    ),
}

#: the kinds run with two xdist workers (one worker's refusal stops the other); the rest
#: run in one process, which is cheaper and takes the same path to the stop
ACROSS_WORKERS = ("401 wrong key", "429 quota")


def workers(kind: str) -> str:
    return "2" if kind in ACROSS_WORKERS else "0"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    with Simulator(SimConfig(seed=3), port=0) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
        yield sim


def suite(pytester: pytest.Pytester, n: int) -> None:
    write_dataset(pytester.path / "data.jsonl", n)
    pytester.makepyfile(test_suite=SUITE)
    pytester.makeini("[pytest]\n")


def text_of(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


# ---------------------------------------------------------------------- fatal refusals
@pytest.mark.parametrize("mode", ["prefetch", "live"])
@pytest.mark.parametrize("kind", list(FATAL))
def test_a_fatal_refusal_stops_the_run_at_once(
    pytester: pytest.Pytester, api: Simulator, kind: str, mode: str
) -> None:
    sim_config, args, phrase = FATAL[kind]
    api.configure(**sim_config)
    suite(pytester, 60)
    extra = ["--llm-no-prefetch"] if mode == "live" else []
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-n", workers(kind), "-rN", *args, *extra)
    wall = time.monotonic() - started
    assert result.ret == FATAL_EXIT_STATUS, text_of(result)
    sent = api.stats()["chat_requests"]
    # limits unknown: the prefetch sends its first request alone; live, each worker one
    assert 1 <= sent <= (1 if mode == "prefetch" else int(workers(kind)) or 1)
    text = text_of(result)
    stop_lines = [line for line in text.splitlines() if "stored answers are kept" in line]
    assert stop_lines and all(phrase in line for line in stop_lines), text
    assert "Traceback" not in text and "INTERNALERROR" not in text
    assert wall < 30  # not 60 cases' worth of refusals (a generous bound on a busy CI)


#: in batch mode the key is refused at upload, the quota at the job's creation, and the
#: rest in the job's output lines (the job's answers are stored; nothing more is sent)
BATCH_PHRASE = {
    "401 wrong key": "(401)",
    "403 no access": "HTTP 403",
    "429 quota": "insufficient_quota",
    "404 model": "HTTP 404",
    "400 parameter": "unsupported_value",
}


@pytest.mark.parametrize("kind", list(FATAL))
def test_a_fatal_refusal_in_batch_mode_stops_the_run(
    pytester: pytest.Pytester, api: Simulator, kind: str
) -> None:
    sim_config, args, _ = FATAL[kind]
    api.configure(batch_validating_seconds=0.05, batch_finalizing_seconds=0.05, **sim_config)
    suite(pytester, 20)
    result = pytester.runpytest_subprocess("-n", workers(kind), "-rN", "--batch-api", *args)
    assert result.ret == FATAL_EXIT_STATUS, text_of(result)
    stats = api.stats()
    assert stats["chat_requests"] == 0  # no case went on to the live API
    assert stats["batches_created"] <= 1
    text = text_of(result)
    assert BATCH_PHRASE[kind] in text and "stored answers are kept" in text
    assert "Traceback" not in text


def test_after_the_fix_the_same_command_resumes(pytester: pytest.Pytester, api: Simulator) -> None:
    suite(pytester, 30)
    first = pytester.runpytest_subprocess("-n", "2", "-rN", "--llm-limit", "10")
    first.assert_outcomes(passed=10)
    api.configure(quota_exceeded=True)  # the account runs dry
    second = pytester.runpytest_subprocess("-n", "2", "-rN")
    assert second.ret == FATAL_EXIT_STATUS
    assert api.stats()["chat_requests"] == 11  # one refusal; nothing stored was asked again
    api.configure(quota_exceeded=False)  # credit bought: the same command resumes
    third = pytester.runpytest_subprocess("-n", "2", "-rN")
    third.assert_outcomes(passed=30)
    stats = api.stats()
    assert stats["duplicate_bodies"] == 0 and stats["chat_answered"] == 30


def test_a_project_without_benchmarks_is_left_alone(
    pytester: pytest.Pytester, api: Simulator
) -> None:
    # the plugin is active in every run of its environment, and a key is often set there
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess("-n", "0")
    result.assert_outcomes(passed=1)
    assert not (pytester.path / ".llmbench").exists()  # no run directory, no planning


# ---------------------------------------------------------------------- interrupts
def start_run(root: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:randomly", "-rN", *args]
    return subprocess.Popen(
        cmd,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as in a terminal
    )


def journal_says(run_dir: Path, status: str) -> bool:
    """Whether the run's fetch journal has ended with ``status``."""
    return any(
        f'"status": "{status}"' in path.read_text(encoding="utf-8")
        for path in run_dir.glob("fetch-*.journal")
    )


@pytest.mark.parametrize(
    ("signame", "workers"),
    [("SIGINT", "0"), ("SIGTERM", "2"), ("SIGINT to the group", "2")],
)
def test_an_interrupt_keeps_what_is_in_flight(
    pytester: pytest.Pytester, api: Simulator, signame: str, workers: str
) -> None:
    api.configure(latency={"kind": "fixed", "mean": 1.0})
    suite(pytester, 200)
    proc = start_run(pytester.path, "-n", workers, "--llm-rpm", "6000")
    # the first answers have arrived, more are in flight
    wait_for(lambda: api.stats()["chat_answered"] >= 1, "the first answers", timeout=60)
    if signame.endswith("group"):  # a terminal's Ctrl-C: the workers get it too
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, signame))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    first = api.stats()
    assert first["chat_answered"] < 200  # it really stopped sending
    assert first["undelivered"] == 0  # nothing answered was dropped on the floor
    lines = [line for line in out.splitlines() if "interrupted:" in line]
    assert lines and "answers stored; run the same command to resume" in lines[0], out
    assert "asyncio" not in out, out
    # no traceback, but for a worker the group's SIGINT caught still importing execnet
    # (xdist's bootstrap, before any plugin loads: seen on a slow machine in CI)
    for block in out.split("Traceback (most recent call last):")[1:]:
        frames = block.split("KeyboardInterrupt", 1)[0]
        assert signame.endswith("group") and "execnet" in frames, out
        assert "pytest_llmbench" not in frames and "_pytest" not in frames, out
    # the rerun pays for nothing twice
    rerun = start_run(pytester.path, "-n", workers, "--llm-rpm", "6000")
    rerun.communicate(timeout=120)
    assert rerun.returncode == 0
    stats = api.stats()
    assert stats["duplicate_bodies"] == 0 and stats["chat_answered"] == 200


# stands for execnet's wait on a worker still starting, which a terminal's Ctrl-C also
# reaches: the worker dies, and the EOFError of execnet's `finally: channel.waitclose()`
# replaces the interrupt raised in the wait (seen in CI as an INTERNALERROR, exit 3)
STARTING_WORKER = """
import os, threading
from pathlib import Path

def pytest_sessionstart(session):
    if hasattr(session.config, "workerinput") or os.environ.get("PYTEST_LLMBENCH_PHASE"):
        return
    Path("controller-starting-workers").touch()
    try:
        threading.Event().wait(60)  # until the test's SIGINT
    finally:
        raise EOFError("couldn't load message header, expected 9 bytes, got 0")
"""


def test_an_interrupt_while_xdist_starts_its_workers_is_still_an_interrupt(
    pytester: pytest.Pytester, api: Simulator
) -> None:
    api.configure(latency={"kind": "fixed", "mean": 1.0})
    suite(pytester, 200)
    pytester.makeconftest(STARTING_WORKER)
    proc = start_run(pytester.path, "-n", "2", "--llm-rpm", "6000")
    marker = pytester.path / "controller-starting-workers"
    wait_for(marker.exists, "the controller starting its workers", timeout=60)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "INTERNALERROR" not in out and "EOFError" not in out, out
    lines = [line for line in out.splitlines() if "interrupted:" in line]
    assert lines and "answers stored; run the same command to resume" in lines[0], out
    assert api.stats()["undelivered"] == 0


def test_an_interrupt_in_pytests_own_code_waits_for_the_end_of_the_test() -> None:
    """Where the first signal finds the main thread decides whether it raises there: in a
    test or this plugin (waiting for an answer) it does; in pytest's or pluggy's code
    between a test's phases it does not (a KeyboardInterrupt raised inside pytest's hook
    machinery once left a capture wrapper half-run, whose traceback then reached the
    output): pytest stops at the end of the test instead."""
    import copy

    def caught() -> Any:
        return sys._getframe()

    class Grab:
        frames: list[Any] = []

        def __deepcopy__(self, memo: Any) -> Grab:
            Grab.frames.append(sys._getframe(1))  # the copy module's frame
            return self

    machinery: dict[str, Any] = {"__name__": "_pytest.runner", "sys": sys, "copy": copy}
    exec("def phase():\n    return sys._getframe()", machinery)
    exec("def through_stdlib(grab):\n    copy.deepcopy(grab)", machinery)
    machinery["through_stdlib"](Grab())
    assert in_pytest(machinery["phase"]())  # pytest's own code
    assert in_pytest(Grab.frames[0])  # the standard library, called by pytest
    assert not in_pytest(caught())  # a test's code, called by pytest
    assert not in_pytest(None)


def test_a_second_interrupt_exits_at_once(pytester: pytest.Pytester, api: Simulator) -> None:
    api.configure(latency={"kind": "fixed", "mean": 30.0})  # longer than the test's bound
    suite(pytester, 20)
    # all 20 in flight at once (the adaptive limit would send one until answers come back)
    proc = start_run(
        pytester.path, "-n", "0", "--llm-rpm", "6000", "--llm-drain-timeout", "60",
        "--llm-concurrency-fixed",
    )  # fmt: skip
    wait_for(lambda: api.stats()["chat_requests"] >= 20, "the requests in flight", timeout=60)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    # the first signal is being handled once the fetch journal records the interrupt
    run_dir = pytester.path / ".llmbench"
    wait_for(lambda: journal_says(run_dir, "interrupted"), "the first signal's handling")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - started < 20  # neither the drain (60 s) nor the latency (30 s)
    assert api.stats()["chat_answered"] == 0  # it did not wait for the answers in flight
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "interrupted twice" in out and "Traceback" not in out


# ---------------------------------------------------------------------- overlap
TIMED_SUITE = """
import json, time
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0, 1.0], id="qid")
def test_qa(case, llm, request):
    r = llm.generate_response(case["question"])
    with open("ran.jsonl", "a") as fh:
        fh.write(json.dumps({"id": request.node.nodeid, "at": time.time()}) + "\\n")
    assert r.text.endswith("0")
"""


def overlap_run(pytester: pytest.Pytester, sim: Simulator, *args: str) -> dict[str, Any]:
    (pytester.path / "ran.jsonl").unlink(missing_ok=True)
    result = pytester.runpytest_subprocess(
        "-n", "2", "-rN", "--llm-rpm", "400", "--llm-report", "r.json", *args
    )
    assert result.ret in (0, 1), text_of(result)
    ran = [json.loads(line) for line in (pytester.path / "ran.jsonl").read_text().splitlines()]
    report = read_report(pytester.path / "r.json")
    stats = sim.stats()
    return {"ran": ran, "report": report, "stats": stats}


def test_tests_run_while_the_prefetch_fetches_and_results_match(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dataset(pytester.path / "data.jsonl", 40)
    pytester.makepyfile(test_suite=TIMED_SUITE)
    pytester.makeini("[pytest]\n")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    runs = {}
    for name, extra in (("overlap", []), ("no-overlap", ["--llm-no-overlap"])):
        config = SimConfig(seed=5, latency={"kind": "fixed", "mean": 0.2})
        with Simulator(config, port=0) as sim:
            monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
            run_dir = pytester.path / f"run-{name}"
            runs[name] = overlap_run(pytester, sim, f"--llm-run-dir={run_dir}", *extra)
    for run in runs.values():
        # each planned request sent exactly once, and no case ran twice or live
        assert run["stats"]["chat_requests"] == 80 and run["stats"]["duplicate_bodies"] == 0
        assert len(run["ran"]) == 80 == len({r["id"] for r in run["ran"]})
        assert all(c["requests"] == 1 and c["cached"] == 0 for c in run["report"]["cases"])

    def outcomes(run: dict[str, Any]) -> dict[str, tuple[str, str]]:
        return {c["nodeid"]: (c["outcome"], c["response"]) for c in run["report"]["cases"]}

    assert outcomes(runs["overlap"]) == outcomes(runs["no-overlap"])
    # 80 requests at 400 a minute take ~12 s: with the overlap, many tests ran before the
    # second in which the last answer arrived (the workers start while the fetch runs, and
    # on a loaded machine that alone can take 6 s); without it, every test ran after it
    for name, run in runs.items():
        last_answer = max(float(s) for s in run["stats"]["answered_per_second"])
        ran_before = sum(r["at"] < last_answer for r in run["ran"])
        assert ran_before >= 10 if name == "overlap" else ran_before == 0, (name, ran_before)
