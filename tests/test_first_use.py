"""What a new user meets first: the key, answers from the right server, junit properties,
early option errors, one message per problem, honest counters.

Every test runs the plugin (or the client) the way a user does, against simulators over
real HTTP; a second simulator that accepts only one key stands in for the real API.
"""

from __future__ import annotations

import json
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench import ConfigError, LLMClient, LLMConfig
from pytest_llmbench.errors import FATAL_EXIT_STATUS
from pytest_llmbench.sim import SimConfig, Simulator
from pytest_llmbench.store import ResponseStore

from .helpers import answer_key
from .test_plugin import make_suite, read_report

#: the only key the stand-in for the real API accepts (obviously fake)
API_KEY = "sk-test-fake-standin-api-0001"


@pytest.fixture
def api(pytester: pytest.Pytester) -> Iterator[Simulator]:
    """A second server standing in for the real API: it checks the Authorization header."""
    with Simulator(SimConfig(api_keys=[API_KEY], p_correct=1.0, seed=2), port=0) as sim:
        yield sim


def use_api(monkeypatch: pytest.MonkeyPatch, api: Simulator) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)


def output(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


# ---------------------------------------------------------------------- 1. the key
def test_client_alone_reads_the_environment(
    api: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_api(monkeypatch, api)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-test-fake")
    monkeypatch.setenv("LLMBENCH_MAX_RETRIES", "2")
    config = LLMConfig(model="gpt-4o-mini", rpm=500, tpm=200_000)
    assert config.base_url == api.base_url and config.organization == "org-test-fake"
    assert config.max_retries == 2 and config.rpm == 500  # given values win
    with LLMClient(config) as client:
        r = client.generate_response("Say hi", temperature=0)
    assert r.ok and r.text
    assert api.stats()["by_status"] == {"200": 1}  # the server accepted the key it was sent


def test_client_without_a_key_says_so_and_sends_nothing(
    api: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)
    with LLMClient(LLMConfig()) as client, pytest.raises(ConfigError) as info:
        client.generate_response("Say hi")
    assert str(info.value) == (
        "no OpenAI API key: set OPENAI_API_KEY, or pass LLMConfig(api_key=...)"
    )
    assert api.stats()["requests_total"] == 0


# ---------------------------------------------------------------------- 2. origins
def test_simulator_answers_are_never_replayed_as_the_apis(
    pytester: pytest.Pytester, api: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = make_suite(pytester, 4, temps="[0.0]")
    api.configure(answer_key=answer_key(rows))
    # Given a run on the built-in simulator
    first = pytester.runpytest("--llm-sim", "--llm-report", "sim.json")
    assert sum(first.parseoutcomes().values()) == 4
    first.stdout.fnmatch_lines(["llmbench answers from the built-in simulator: 4 request(s)*"])

    # When the user follows the README: set a key, drop --llm-sim (OPENAI_BASE_URL points
    # at the stand-in for the real API)
    use_api(monkeypatch, api)
    second = pytester.runpytest("--llm-report", "api.json")

    # Then the API is asked every question: nothing of the simulator's is replayed
    second.assert_outcomes(passed=4)
    assert api.stats()["chat_answered"] == 4
    second.stdout.fnmatch_lines([f"llmbench answers from {api.base_url}: 4 request(s) sent*"])
    report = read_report(pytester.path / "api.json")
    assert report["run"]["origin"] == api.base_url and report["run"]["mode"] != "replay"
    assert report["totals"]["requests"] == 4 and report["totals"]["cached"] == 0

    # And each server's answers replay for that server alone
    again = pytester.runpytest("--llm-report", "again.json")
    again.assert_outcomes(passed=4)
    assert api.stats()["chat_answered"] == 4
    again.stdout.fnmatch_lines(["*4 answer(s) replayed from the store (recorded on http*"])
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL")
    sim_again = pytester.runpytest("--llm-sim", "--llm-report", "sim2.json")
    assert read_report(pytester.path / "sim2.json")["run"]["mode"] == "replay"
    assert sim_again.parseoutcomes() == first.parseoutcomes()


V1_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE responses (key TEXT PRIMARY KEY, nodeid TEXT NOT NULL, ordinal INTEGER NOT NULL,
    endpoint TEXT NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL,
    headers TEXT NOT NULL, latency_s REAL NOT NULL, source TEXT NOT NULL, batch_id TEXT,
    created_at REAL NOT NULL);
CREATE INDEX responses_nodeid ON responses (nodeid);
CREATE TABLE state (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_store_of_schema_1_is_migrated_with_origins(tmp_path: Path) -> None:
    # Given a store written by the previous version: one simulator answer (prefetched,
    # with its attempts in fake headers), one from OpenAI, one from an unknown server
    run_dir = tmp_path / ".llmbench"
    run_dir.mkdir()
    conn = sqlite3.connect(run_dir / "responses.sqlite3")
    conn.executescript(V1_SCHEMA)
    body = json.dumps({"choices": [{"message": {"content": "4"}}]})
    headers = {
        "sim": {"openai-organization": "org-sim", "x-llmbench-attempts": "3"},
        "openai": {"openai-organization": "user-abc", "openai-version": "2020-10-01"},
        "other": {"server": "uvicorn"},
    }
    for key, h in headers.items():
        row = (key, f"t.py::test[{key}]", 0, "/v1/chat/completions", "{}", body, json.dumps(h))
        conn.execute(
            "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, 0.5, 'prefetch', NULL, 1.0)", row
        )
    conn.commit()
    conn.close()

    # When the new version opens it, each answer keeps the origin its headers show
    with ResponseStore.open(run_dir, origin="simulator") as store:
        assert store.keys() == ["sim"]
        stored = store.get("sim")
        assert stored is not None and stored.attempts == 3
        assert "x-llmbench-attempts" not in stored.headers
        assert store.origins() == {"simulator": 1, "https://api.openai.com/v1": 1, "unknown": 1}
    with ResponseStore.open(run_dir, origin="https://api.openai.com/v1") as store:
        assert store.keys() == ["openai"] and "sim" not in store and "other" not in store


def test_a_cassette_recorded_on_the_simulator_never_stands_in_for_the_api(
    pytester: pytest.Pytester,
) -> None:
    make_suite(pytester, 2, temps="[0.0]")
    recorded = pytester.runpytest("--llm-sim", "--llm-record-mode", "once")
    assert sum(recorded.parseoutcomes().values()) == 2
    # replayed with no key and no simulator: the cassettes are not the API's answers
    result = pytester.runpytest("--llm-record-mode", "none", "--llm-report", "r.json")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*it was recorded on the built-in simulator (--llm-sim), not on https://api.openai*"]
    )
    # and with --llm-sim they replay, sending nothing
    replay = pytester.runpytest("--llm-sim", "--llm-record-mode", "none", "--llm-report", "s.json")
    assert replay.parseoutcomes() == recorded.parseoutcomes()
    assert read_report(pytester.path / "s.json")["totals"]["requests"] == 0


# ---------------------------------------------------------------------- 3. junitxml
@pytest.mark.parametrize("workers", ["0", "2"])
def test_junitxml_carries_the_llm_properties(pytester: pytest.Pytester, workers: str) -> None:
    make_suite(pytester, 3, temps="[0.0, 1.0]")
    result = pytester.runpytest("--llm-sim", "-n", workers, "--junitxml", "junit.xml")
    assert sum(result.parseoutcomes().values()) == 6
    cases = ET.parse(pytester.path / "junit.xml").getroot().iter("testcase")
    props = [{p.get("name"): p.get("value") for p in case.iter("property")} for case in cases]
    assert len(props) == 6
    for p in props:
        assert p["llm.calls"] == "1" and p["llm.suite"] == "test_qa"
        assert int(p["llm.total_tokens"]) > 0 and p["llm.model"] == "gpt-4o-mini"


# ---------------------------------------------------------------------- 4, 5. option values
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--llm-prices", "missing.json"], "ERROR: --llm-prices: missing.json: cannot read *"),
        (
            ["--llm-report", "nowhere/deeper/r.json"],
            "ERROR: --llm-report: directory */nowhere/deeper does not exist",
        ),
        (["--llm-report", "."], "ERROR: --llm-report: . is a directory; name a file"),
        (["--llm-base-url", "ftp://x"], "ERROR: --llm-base-url: must start with http:// *"),
        (
            ["--llm-budget", "redis://127.0.0.1:1/0"],
            "ERROR: --llm-budget: cannot reach the Redis budget at redis://127.0.0.1:1/0*",
        ),
    ],
)
def test_bad_option_values_stop_the_run_before_any_request(
    pytester: pytest.Pytester,
    api: Simulator,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    make_suite(pytester, 2)
    use_api(monkeypatch, api)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    text = output(result)
    assert "Value error" not in text and "INTERNALERROR" not in text
    assert "Traceback" not in text
    assert api.stats()["requests_total"] == 0
    assert not (pytester.path / "nowhere").exists()


def test_a_path_option_outside_the_project_in_two_arguments(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    make_suite(pytester, 2, temps="[0.0]")
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "run"
    # pytest (no ini file) would take the value for a test path when choosing rootdir
    result = pytester.runpytest("--llm-sim", "--llm-run-dir", str(elsewhere))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --llm-run-dir: *write --llm-run-dir={elsewhere}*"])
    # written as one argument it prefetches, and the next run replays
    first = pytester.runpytest("--llm-sim", f"--llm-run-dir={elsewhere}")
    first.stdout.fnmatch_lines(["llmbench prefetch: planned 2 request(s)*"])
    again = pytester.runpytest("--llm-sim", f"--llm-run-dir={elsewhere}")
    again.stdout.fnmatch_lines(["*0 request(s) sent in this run, 2 answer(s) replayed*"])


# ---------------------------------------------------------------------- 6. cassette replay
def test_cassette_replay_is_not_paced_and_sends_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = make_suite(pytester, 3, temps="[0.0]")
    # Given cassettes recorded on a server that taught the budget a slow limit
    with Simulator(SimConfig(answer_key=answer_key(rows), rpm=60), port=0) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        rec = pytester.runpytest("--llm-base-url", sim.base_url, "--llm-record-mode", "once")
        rec.assert_outcomes(passed=3)
        url = sim.base_url
    budget = pytester.path / ".llmbench" / "budget-gpt-4o-mini.json"
    learned = budget.read_bytes()
    assert json.loads(learned)["requests_server_limit"] == 60

    # When they are replayed with no key
    monkeypatch.delenv("OPENAI_API_KEY")
    result = pytester.runpytest("--llm-base-url", url, "--llm-report", "r.json")

    # Then nothing is sent, nothing is paced (the budget is not even read), and the
    # summary says so
    result.assert_outcomes(passed=3)
    report = read_report(pytester.path / "r.json")
    assert report["run"]["mode"] == "replay"
    assert report["totals"]["requests"] == 0 and report["totals"]["cached"] == 3
    assert budget.read_bytes() == learned
    result.stdout.fnmatch_lines(["*0 request(s) sent*3 answer(s) replayed from cassettes*"])


# ---------------------------------------------------------------------- 7. one message
WRONG_AND_BROKEN = """
import pytest
from pytest_llmbench import check

@pytest.mark.llmbench(dataset=[{"qid": "a", "q": "What is 1+1?"}], id="qid")
def test_wrong(case, llm):
    r = llm.generate_response(case["q"])
    check(False, question=case["q"], expected="2", answer=r.text)

@pytest.mark.llmbench(dataset=[{"qid": "b", "q": "x"}], id="qid")
def test_api_error(case, llm):
    llm.generate_response(case["q"], temperature=5)  # this call's own mistake: not fatal
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_each_failure_is_told_once(pytester: pytest.Pytester, workers: str) -> None:
    pytester.makepyfile(test_suite=WRONG_AND_BROKEN)
    # -rN: no short test summary, which repeats each message (whole, on CI)
    result = pytester.runpytest("--llm-sim", "-n", workers, "-rN")
    result.assert_outcomes(failed=2)
    text = output(result)
    assert "During handling of the above exception" not in text
    assert text.count("expected 2, got") == 1
    assert text.count("API error:") == 1


def test_a_dataset_error_is_told_once(pytester: pytest.Pytester) -> None:
    (pytester.path / "qa.jsonl").write_text('{"id": "a"}\n{"id": "a"}\n', encoding="utf-8")
    pytester.makepyfile(
        test_suite="""
import pytest

@pytest.mark.llmbench(dataset="qa.jsonl", id="id")
def test_x(case, llm):
    pass
"""
    )
    result = pytester.runpytest("--llm-sim", "-rN")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    text = output(result)
    assert text.count("qa.jsonl:2: duplicate id 'a' (also on line 1)") == 1
    assert "During handling" not in text


NOT_PLANNED = """
import pytest

@pytest.mark.llmbench(dataset=[{"qid": "a", "q": "hi"}], id="qid", plan=False)
def test_live(case, llm):
    llm.generate_response(case["q"])
"""


@pytest.mark.parametrize(
    ("args", "suite"),
    [
        (["-n", "0"], None),
        (["-n", "2"], None),
        (["-n", "2", "--llm-no-prefetch"], None),
        (["-n", "2"], NOT_PLANNED),
    ],
)
def test_no_key_is_one_usage_error(
    pytester: pytest.Pytester, args: list[str], suite: str | None
) -> None:
    if suite is None:
        make_suite(pytester, 2)
    else:
        pytester.makepyfile(test_suite=suite)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = output(result)
    assert "ERROR: no OpenAI API key: set OPENAI_API_KEY, or add --llm-sim" in text
    assert "_pytest.outcomes.Exit" not in text and "INTERNALERROR" not in text


# ---------------------------------------------------------------------- 8. counters
def test_a_call_that_fails_for_good_counts_what_it_sent(
    pytester: pytest.Pytester, api: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_suite(pytester, 1, temps="[0.0]")
    use_api(monkeypatch, api)
    api.configure(script=["429", "429", "500"])
    result = pytester.runpytest(
        "--llm-no-prefetch", "--llm-max-retries", "2", "--llm-backoff-max", "0.05",
        "--llm-report", "r.json",
    )  # fmt: skip
    result.assert_outcomes(failed=1)
    case = read_report(pytester.path / "r.json")["cases"][0]
    assert case["outcome"] == "error"
    assert (case["requests"], case["retries"], case["rate_limited"]) == (3, 2, 2)
    assert api.stats()["chat_requests"] == 3


def test_a_refusal_in_the_prefetch_is_not_sent_again(
    pytester: pytest.Pytester, api: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_suite(pytester, 5, temps="[0.0]")
    monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fake-wrong-key-0002")  # a 401 for each
    result = pytester.runpytest("--llm-report", "r.json")
    # a wrong key is fatal: every other request would be refused too, so none is sent
    # (the limits are unknown, so the first request goes alone)
    assert result.ret == FATAL_EXIT_STATUS
    assert api.stats()["chat_requests"] == 1
    # the report is written even when the run stopped before its tests ran (their
    # collection waits for the first request to go, and the refusal is quick), and says
    # why; the cases that did run (if the collection won the race) made no other request
    report = read_report(pytester.path / "r.json")
    assert "authentication failed (401)" in report["run"]["stopped"]
    cases: list[dict[str, Any]] = report["cases"]
    assert sum(c["requests"] for c in cases) <= 1
    assert all("401" in c["error"] for c in cases if c["outcome"] == "error")
    # a failure is not an answer: the next run asks again
    pytester.runpytest()
    assert api.stats()["chat_requests"] == 2


def test_the_short_summary_says_what_went_wrong(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # pytest cuts the line to the terminal's width
    pytester.makepyfile(test_suite=WRONG_AND_BROKEN)
    result = pytester.runpytest("--llm-sim", "-rf")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["FAILED test_suite.py::test_wrong[[]a[]] - Failed: expected 2, got '*'"]
    )
    # the failure block itself: the three lines of check, once (on CI, where pytest's short
    # summary repeats whole messages, they appear there again)
    failures = output(result).split("short test summary info")[0]
    assert failures.count("question: What is 1+1?") == 1
