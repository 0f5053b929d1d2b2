"""The plugin as users run it: pytester runs, the simulator over HTTP, xdist with -n 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.report import validate_report
from pytest_llmbench.sim import SimConfig, Simulator

from .helpers import FAKE_KEY, answer_key, wait_for

SUITE = """
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", temperatures={temps}, id="qid")
def test_qa(case, llm):
    r = llm.generate_response(case["question"], max_tokens=8)
    assert r.text == case["answer"], (case["question"], r.text)
"""


def write_dataset(path: Path, n: int) -> list[dict[str, Any]]:
    rows = [
        {"qid": f"q{i:04d}", "question": f"What is item {i}?", "answer": f"A{i}"} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def make_suite(
    pytester: pytest.Pytester, n: int, temps: str = "[0.0, 1.0]"
) -> list[dict[str, Any]]:
    rows = write_dataset(pytester.path / "data.jsonl", n)
    pytester.makepyfile(test_suite=SUITE.format(temps=temps))
    return rows


@pytest.fixture
def server(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    """A simulator outside the pytest runs under test, so its counts span several runs."""
    with Simulator(SimConfig(seed=1), port=0) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
        monkeypatch.setenv("LLMBENCH_BASE_URL", sim.base_url)
        yield sim


def collected(pytester: pytest.Pytester, *args: str) -> list[str]:
    lines = pytester.runpytest("--collect-only", "-q", *args).stdout.lines
    return [line for line in lines if "::" in line]


def read_report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


# ---------------------------------------------------------------------- ids and datasets
def test_ids_are_item_and_temperature(pytester: pytest.Pytester) -> None:
    make_suite(pytester, 2, "[0.0, 0.5, 1]")
    assert collected(pytester) == [
        f"test_suite.py::test_qa[q000{i}-{t}]" for i in range(2) for t in ("t0", "t0.5", "t1")
    ]


def test_samples_and_temperature_override(pytester: pytest.Pytester) -> None:
    write_dataset(pytester.path / "data.jsonl", 1)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0], id="qid", samples=2)
        def test_s(case, temperature, sample_index):
            pass
        """
    )
    ids = collected(pytester, "--llm-temperatures", "0.2,0.7")
    assert [i.split("::")[1] for i in ids] == [
        "test_s[q0000-t0.2-s0]",
        "test_s[q0000-t0.2-s1]",
        "test_s[q0000-t0.7-s0]",
        "test_s[q0000-t0.7-s1]",
    ]


def test_hash_ids_survive_reordering_and_appending(pytester: pytest.Pytester) -> None:
    rows = [{"q": "alpha"}, {"q": "beta"}, {"q": "gamma"}]
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llmbench(dataset="data.jsonl")
        def test_h(case):
            pass
        """
    )

    def ids(data: list[dict[str, str]]) -> set[str]:
        (pytester.path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        out = pytester.runpytest("--collect-only", "-q").stdout.lines
        return {line for line in out if "::test_h[" in line}

    first = ids(rows)
    assert len(first) == 3
    assert ids(list(reversed(rows))) == first
    assert ids([{"q": "new"}, *rows]) > first


@pytest.mark.parametrize("fmt", ["json", "csv", "iterable"])
def test_other_dataset_formats(pytester: pytest.Pytester, fmt: str) -> None:
    if fmt == "json":
        pytester.path.joinpath("d.json").write_text('[{"id": "a", "x": 1}, {"id": "b", "x": 2}]')
        source = '"d.json"'
    elif fmt == "csv":
        pytester.path.joinpath("d.csv").write_text("id,x\na,1\nb,2\n")
        source = '"d.csv"'
    else:
        source = '[{"id": "a", "x": 1}, {"id": "b", "x": 2}]'
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.llmbench(dataset={source}, id="id", temperatures=[0])
        def test_f(case):
            assert str(case["x"]) in ("1", "2")
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=2)
    assert "::test_f[a-t0] PASSED" in result.stdout.str()
    assert "::test_f[b-t0] PASSED" in result.stdout.str()


@pytest.mark.parametrize(
    ("content", "marker_extra", "message"),
    [
        ('{"qid": "a"}\n{"qid": \n', "", "*data.jsonl:2: *invalid JSON*"),
        ('{"qid": "a"}\n{"other": 1}\n', "", "*data.jsonl:2: field 'qid'*"),
        ('{"qid": "a"}\n{"qid": "a"}\n', "", "*data.jsonl:2*duplicate*line 1*"),
        ("", "", "*data.jsonl*empty*"),
        ('{"qid": "a"}\n', ', required=["question"]', "*data.jsonl:1: field 'question'*"),
    ],
)
def test_bad_datasets_fail_at_collection(
    pytester: pytest.Pytester, content: str, marker_extra: str, message: str
) -> None:
    pytester.path.joinpath("data.jsonl").write_text(content)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.llmbench(dataset="data.jsonl", id="qid"{marker_extra})
        def test_d(case):
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting*", message])
    assert "Traceback" not in result.stdout.str() and "site-packages" not in result.stdout.str()


def test_missing_dataset_and_bad_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llmbench(dataset="nowhere.jsonl")
        def test_m(case):
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*nowhere.jsonl*"])
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llmbench(dataset=[{"a": 1}], temperature=[0])
        def test_m(case):
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "unknown argument(s) ['temperature']; allowed:" in result.stdout.str()


def test_limit_and_seeded_sample(pytester: pytest.Pytester) -> None:
    make_suite(pytester, 20, "[0]")

    assert collected(pytester, "--llm-limit", "3") == [
        f"test_suite.py::test_qa[q000{i}-t0]" for i in range(3)
    ]
    sample = collected(pytester, "--llm-sample", "5", "--llm-seed", "7")
    assert len(sample) == 5
    assert collected(pytester, "--llm-sample", "5", "--llm-seed", "7") == sample
    assert collected(pytester, "--llm-sample", "5", "--llm-seed", "8") != sample


# ---------------------------------------------------------------------- runs on the simulator
def test_run_gates_and_report(pytester: pytest.Pytester, server: Simulator) -> None:
    # Given 20 questions of which the simulator answers ~90% right at T=0
    rows = make_suite(pytester, 20, "[0.0]")
    server.configure(answer_key=answer_key(rows), p_correct=0.9)
    # When a gate below the measured accuracy is given, cases fail but the run passes
    result = pytester.runpytest("--llm-gate", "test_qa:accuracy>=0.5", "--llm-report", "r.json")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*llmbench summary*", "*test_qa*", "*PASS test_qa:accuracy>=0.5*"])
    report = read_report(pytester.path / "r.json")
    assert validate_report(report) == []
    assert report["totals"]["cases"] == 20
    assert report["totals"]["passed"] == outcomes["passed"]
    assert report["run"]["exit_status"] == 0
    assert {c["item_id"] for c in report["cases"]} == {r["qid"] for r in rows}
    # When the gate is above it, the run fails and names the gate, value and interval
    result = pytester.runpytest("--llm-gate", "test_qa:accuracy>=0.99")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*FAIL test_qa:accuracy>=0.99*measured 0.*95% CI*"])
    # A gate naming no suite fails instead of passing silently
    result = pytester.runpytest("--llm-gate", "test_typo:accuracy>=0.1")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*FAIL test_typo*no results*"])
    # Gates also come from the ini file
    pytester.makeini("[pytest]\nllm_gate =\n    test_qa:accuracy>=0.5\n    test_qa:errors==0\n")
    result = pytester.runpytest()
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*PASS test_qa:errors==0*"])


def test_without_gates_pytest_rule_stands(pytester: pytest.Pytester, server: Simulator) -> None:
    rows = make_suite(pytester, 10, "[0.0]")
    server.configure(answer_key=answer_key(rows), p_correct=0.5)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED


PLAIN_FAILURES = """
import pytest

@pytest.fixture
def noisy(request):
    yield request.param
    if request.param % 20 == 0:
        print(f"teardown of {request.param}")

@pytest.mark.parametrize("noisy", range(70), indirect=True)
def test_plain(noisy):
    print("in the test")
    assert noisy < 0
"""


def failures_section(result: pytest.RunResult) -> str:
    out = result.stdout.str()
    section = out.split("= FAILURES =", 1)[1].split("short test summary info", 1)[0]
    return "\n".join(line for line in section.splitlines() if not line.startswith("scanned:"))


def test_many_failures_print_as_pytest_prints_them(pytester: pytest.Pytester) -> None:
    # Given 70 failing tests, some with teardown output: more than MANY, so the
    # plugin shortens the list pytest scans for each failure's teardown output
    pytester.makepyfile(test_plain=PLAIN_FAILURES)
    pytester.makeini("[pytest]\n")
    # (a plain hook runs while the summary sections print: what pytest scans then)
    pytester.makeconftest(
        "def pytest_terminal_summary(terminalreporter):\n"
        "    print('scanned:', len(terminalreporter.stats.get('', [])))\n"
    )
    # When they run with the plugin and without it
    ours = pytester.runpytest_subprocess("-p", "no:randomly", "-n", "0", "-rA")
    theirs = pytester.runpytest_subprocess(
        "-p", "no:randomly", "-n", "0", "-rA", "-p", "no:llmbench"
    )
    # Then the FAILURES section is the same, teardown output included, and so are the
    # PASSES and short summary sections (-rA) and the counts
    ours.assert_outcomes(failed=70)
    theirs.assert_outcomes(failed=70)
    section = failures_section(ours)
    assert section == failures_section(theirs)
    assert section.count("Captured stdout teardown") == 4, section[:3000]
    # the 4 teardowns with output, not the 140 setups and teardowns
    ours.stdout.fnmatch_lines(["scanned: 4"])
    theirs.stdout.fnmatch_lines(["scanned: 140"])
    assert "teardown of 40" in section

    def tail(result: pytest.RunResult) -> list[str]:
        lines = result.stdout.str().split("short test summary info", 1)[1].splitlines()
        return [line for line in lines[:-1] if not line.startswith("scanned:")]

    assert tail(ours) == tail(theirs)


def test_api_error_is_a_short_error_not_a_traceback(
    pytester: pytest.Pytester, server: Simulator
) -> None:
    make_suite(pytester, 1, "[0.0]")
    server.configure(quota_exceeded=True)
    result = pytester.runpytest("--llm-no-prefetch", "--llm-report", "r.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*API error: OpenAI quota exhausted (insufficient_quota)*"])
    assert "site-packages" not in result.stdout.str()
    case = read_report(pytester.path / "r.json")["cases"][0]
    assert case["outcome"] == "error" and "quota" in case["error"]


def test_xdist_report_equals_single_process(pytester: pytest.Pytester, server: Simulator) -> None:
    rows = make_suite(pytester, 30, "[0.0, 1.0]")
    server.configure(answer_key=answer_key(rows))
    single = pytester.runpytest_subprocess("-p", "no:randomly", "--llm-report", "one.json")
    multi = pytester.runpytest_subprocess("-n", "2", "--llm-report", "two.json")
    assert single.parseoutcomes() == multi.parseoutcomes()
    one, two = (read_report(pytester.path / n) for n in ("one.json", "two.json"))
    keep = ("cases", "passed", "failed", "errors", "accuracy", "prompt_tokens", "completion_tokens")
    assert [{k: s[k] for k in keep} for s in one["suites"]] == [
        {k: s[k] for k in keep} for s in two["suites"]
    ]
    assert [(c["nodeid"], c["outcome"], c["response"]) for c in one["cases"]] == [
        (c["nodeid"], c["outcome"], c["response"]) for c in two["cases"]
    ]
    assert two["run"]["workers"] == 2


def test_lf_reruns_failures_from_the_store(pytester: pytest.Pytester, server: Simulator) -> None:
    # Given 300 items x 3 temperatures run with -n 2
    rows = make_suite(pytester, 300, "[0.0, 0.5, 1.0]")
    server.configure(answer_key=answer_key(rows))
    first = pytester.runpytest_subprocess("-n", "2")
    failed = first.parseoutcomes()["failed"]
    assert failed > 0
    assert server.stats()["chat_answered"] == 900
    server.reset_stats()
    # When the failures are rerun with --lf
    again = pytester.runpytest_subprocess("-n", "2", "--lf")
    # Then exactly those run, are re-graded from the store and cost no request
    again.assert_outcomes(failed=failed)
    assert server.stats()["chat_requests"] == 0


def test_kill_and_resume_never_pays_twice(pytester: pytest.Pytester, server: Simulator) -> None:
    # Given a suite whose calls take ~0.1 s each, run live with -n 2
    rows = make_suite(pytester, 60, "[0.0, 1.0]")
    server.configure(answer_key=answer_key(rows), latency={"kind": "fixed", "mean": 0.1})
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-n",
        "2",
        "-p",
        "no:cacheprovider",
        "--llm-no-prefetch",
        "-q",
    ]
    proc = subprocess.Popen(
        args,
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    stats = server.stats
    wait_for(lambda: stats()["chat_answered"] >= 40, "40 answers", timeout=60)
    # When both workers are blocked in a hung request (so every answer they received has
    # been saved: each worker sends its next request only after storing the last one)...
    server.configure(script=["hang", "hang"], hang_seconds=60)
    wait_for(
        lambda: stats()["faults_injected"].get("hang", 0) == 2 and stats()["in_flight"] == 2,
        "both workers in a hung request",
        timeout=60,
    )
    # ...the run is killed with SIGKILL half-way through
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    answered = server.stats()["chat_answered"]
    assert 40 <= answered < 120, server.stats()
    # Then a second run completes the suite without asking anything answered twice
    result = pytester.runpytest_subprocess("-n", "2", "--llm-no-prefetch", "--llm-report", "r.json")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 120, outcomes
    stats = server.stats()
    assert stats["duplicate_bodies"] == 0, stats["duplicate_body_hashes"]
    assert stats["chat_answered"] == 120, stats
    assert read_report(pytester.path / "r.json")["totals"]["cached"] == answered


def test_key_never_leaks(
    pytester: pytest.Pytester, server: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-test-fake-key-RECOGNISABLE-55555"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    rows = make_suite(pytester, 5, "[0.0]")
    server.configure(answer_key=answer_key(rows))
    result = pytester.runpytest_subprocess(
        "-n", "2", "--llm-report", "r.json", "--junitxml", "j.xml", "-rA", "-v"
    )
    server.configure(require_api_key=True, api_keys=["sk-test-only-this-one"])
    failing = pytester.runpytest_subprocess("--llm-fresh", "--llm-no-prefetch")
    text = result.stdout.str() + result.stderr.str() + failing.stdout.str() + failing.stderr.str()
    assert "Incorrect API key" in text or "authentication failed" in text
    assert secret not in text
    for path in pytester.path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_the_plan_hands_each_prompts_token_count_to_the_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from pytest_llmbench import tokens
    from pytest_llmbench.plan import SPOOL_ENV, plan_recorder, read_spool
    from pytest_llmbench.tokens import request_prompt_tokens

    spool = tmp_path / "plan.jsonl"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "2 + 2?"}]}
    monkeypatch.setenv(SPOOL_ENV, str(spool))  # as the controller sets it for the plan
    monkeypatch.setattr(tokens, "_BACKGROUND", {})  # a fresh plan process
    # a recorder for each test, as the plugin makes them: the first request goes at once
    # while the encoding loads, once for the process however many recorders ask
    for i in range(3):
        plan_recorder(None)(f"k1-{i}", f"t.py::a{i}", 0, "/v1/chat/completions", body)  # type: ignore[arg-type]
    loaders = [t for t in threading.enumerate() if t.name == "llmbench-tokens"]
    assert len(tokens._BACKGROUND) == 1 and len(loaders) <= 1
    for thread in loaders:
        thread.join(30)
    plan_recorder(None)("k2", "t.py::b", 0, "/v1/chat/completions", body)  # type: ignore[arg-type]
    row = {"key": "k3", "nodeid": "t.py::c", "endpoint": "/v1/chat/completions", "body": body}
    with spool.open("a") as fh:  # a spool of an older plan, or a count that is not one
        fh.write(json.dumps(row) + "\n" + json.dumps({**row, "key": "k4", "prompt_tokens": -1}))
        fh.write("\n")
    first, _, _, counted, unknown, bad = read_spool(spool)
    assert counted.prompt_tokens == request_prompt_tokens(body) > 0
    # the fetch counts the rest itself
    assert first.prompt_tokens is None
    assert unknown.prompt_tokens is None and bad.prompt_tokens is None


# ---------------------------------------------------------------------- prefetch engine
def test_prefetch_sends_each_planned_request_once(
    pytester: pytest.Pytester, server: Simulator
) -> None:
    rows = make_suite(pytester, 40, "[0.0, 1.0]")
    server.configure(answer_key=answer_key(rows), latency={"kind": "fixed", "mean": 0.05})
    result = pytester.runpytest_subprocess("-n", "2", "--llm-report", "r.json")
    stats = server.stats()
    assert stats["chat_requests"] == 80
    assert stats["duplicate_bodies"] == 0
    assert stats["peak_in_flight"] > 2  # more than the two workers could have in flight
    report = read_report(pytester.path / "r.json")
    assert report["run"]["mode"] == "prefetch"
    assert report["run"]["prefetch"]["fetched"] == 80
    result.stdout.fnmatch_lines(["*llmbench prefetch: planned 80 request(s)*"])


#: what only a process that sends imports (budget, file lock, retries, wire)
SEND_PATH = ("pytest_llmbench.transport", "pytest_llmbench.budget", "tenacity", "filelock")
LOADED = """
import os, sys

def pytest_unconfigure(config):
    if os.environ.get("PYTEST_LLMBENCH_PHASE") == "plan":
        name = "plan"
    else:
        name = getattr(config, "workerinput", {{}}).get("workerid", "controller")
    with open(os.path.join({out!r}, name), "w") as fh:
        fh.write(" ".join(m for m in {mods!r} if m in sys.modules))
"""


def test_only_the_processes_that_send_load_the_send_path(
    pytester: pytest.Pytester, server: Simulator, tmp_path: Path
) -> None:
    """Each pytest process of a run starts faster for what it does not import: the plan
    subprocess and workers that replay never load the budget, retries or the wire."""
    rows = make_suite(pytester, 10, "[0.0]")
    server.configure(answer_key=answer_key(rows), p_correct=1.0)
    pytester.makeconftest(LOADED.format(out=str(tmp_path), mods=SEND_PATH))
    result = pytester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=10)
    assert server.stats()["chat_requests"] == 10  # all fetched by the controller
    loaded = {p.name: p.read_text().split() for p in tmp_path.iterdir()}
    assert sorted(loaded) == ["controller", "gw0", "gw1", "plan"]
    assert loaded["plan"] == loaded["gw0"] == loaded["gw1"] == []
    assert loaded["controller"] == list(SEND_PATH)  # the fetch sent: the check sees it


def test_prefetch_and_live_give_identical_results(
    pytester: pytest.Pytester, server: Simulator
) -> None:
    rows = make_suite(pytester, 25, "[0.0, 0.7]")
    server.configure(answer_key=answer_key(rows))
    pytester.runpytest_subprocess("--llm-report", "pre.json", "--llm-run-dir", "pre")
    server.reset_stats()  # also restarts the simulator's per-body draw counters
    pytester.runpytest_subprocess(
        "--llm-report", "live.json", "--llm-run-dir", "live", "--llm-no-prefetch"
    )
    pre, live = (read_report(pytester.path / n) for n in ("pre.json", "live.json"))
    assert pre["run"]["mode"] == "prefetch" and live["run"]["mode"] == "live"
    assert [(c["nodeid"], c["outcome"]) for c in pre["cases"]] == [
        (c["nodeid"], c["outcome"]) for c in live["cases"]
    ]
    assert [c["response"] for c in pre["cases"]] == [c["response"] for c in live["cases"]]


def test_dependent_calls_and_opt_out(pytester: pytest.Pytester, server: Simulator) -> None:
    rows = write_dataset(pytester.path / "data.jsonl", 6)
    server.configure(answer_key=answer_key(rows), p_correct=1.0)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0], id="qid")
        def test_two_calls(case, llm):
            first = llm.generate_response(case["question"])
            second = llm.generate_response("Check this answer: " + first.text)
            assert first.text == case["answer"] and second.text

        @pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0], id="qid", plan=False)
        def test_opted_out(case, llm):
            assert llm.generate_response(case["question"] + " again").text

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "--llm-report", "r.json")
    result.assert_outcomes(passed=13)
    stats = server.stats()
    # 6 first calls prefetched, 6 dependent second calls and 6 opted-out calls made live
    assert stats["chat_answered"] == 18
    assert stats["duplicate_bodies"] == 0
    report = read_report(pytester.path / "r.json")
    assert report["run"]["prefetch"]["fetched"] == 6
