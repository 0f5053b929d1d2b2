"""Cassettes: record against the simulator over real HTTP, then replay with no key and no
network. The SDK and httpx2 are never patched by these tests; vcrpy does the intercepting."""

from __future__ import annotations

import functools
import json
import re
import socket
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

# httpcore2 and vcr (with yaml) are imported here, before any in-process pytester run,
# which would import them afresh and drop them afterwards: libyaml cannot be imported
# twice, and httpx2 maps the exceptions of the first httpcore2 it saw (a later copy's
# timeouts would escape unmapped and break other tests of this process).
import httpcore2  # noqa: F401
import httpx2
import openai
import pytest
import vcr

from pytest_llmbench.cassettes import cassette_name, cassette_path
from pytest_llmbench.sim import AnswerItem, SimConfig, Simulator

KEY = "sk-test-fake-RECOGNISABLE-9999"
ROWS = [{"qid": f"q{i}", "question": f"What is the code word number {i}?"} for i in range(3)]
SUITE = """
import pytest

ROWS = {rows!r}

@pytest.mark.llmbench(dataset=ROWS, temperatures=[0.0, 1.0], id="qid")
def test_words(case, llm):
    first = llm.generate_response("Question: " + case["question"], max_tokens=8)
    # depends on the first answer, so the fetch stage cannot plan it: the test sends it
    second = llm.generate_response("Is this right? " + first.text, max_tokens=8)
    assert second.text
    assert first.text == "W" + case["qid"], first.text
"""
EDITED = SUITE.replace("Question: ", "Q: ").replace("Is this right? ", "Right? ")
CASES = [f"test_suite.py::test_words[q{i}-t{t}]" for i in range(3) for t in ("0", "1")]


def answer_key() -> list[AnswerItem]:
    return [AnswerItem(question=r["question"], correct=f"W{r['qid']}", wrong=["X"]) for r in ROWS]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    # right at T=0 (p 0.9), mostly wrong at T=1 (p 0.9 - 0.6): recorded outcomes differ
    config = SimConfig(answer_key=answer_key(), temperature_slope=0.6, seed=3)
    with Simulator(config, port=0) as server:
        yield server


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port that accepts TCP connections and never answers; counts what reached it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        yield sock


def counting_listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def record(pytester: pytest.Pytester, sim: Simulator, *args: str) -> pytest.RunResult:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", KEY)
        return pytester.runpytest("--llm-base-url", sim.base_url, *args)


def report_cases(path: Path) -> dict[str, dict[str, Any]]:
    report = json.loads(path.read_text(encoding="utf-8"))
    return {c["nodeid"]: c for c in report["cases"]}


def cases(path: Path) -> dict[str, tuple[str, str | None]]:
    return {n: (c["outcome"], c["response"]) for n, c in report_cases(path).items()}


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


# ---------------------------------------------------------------------- record, replay
def test_record_then_replay_offline(
    pytester: pytest.Pytester, sim: Simulator, listener: socket.socket
) -> None:
    # Given a suite recorded against the simulator with a recognisable fake key
    pytester.makepyfile(test_suite=SUITE.format(rows=ROWS))
    recorded = record(pytester, sim, "--llm-record-mode", "once", "--llm-report", "rec.json")
    outcomes = recorded.parseoutcomes()
    assert outcomes["passed"] + outcomes["failed"] == 6 and outcomes["failed"] >= 1
    assert sim.stats()["chat_answered"] == 12  # the first calls prefetched, the second live
    folder = pytester.path / "cassettes" / "test_suite"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        cassette_name(c) + ".yaml" for c in CASES
    )
    text = "\n".join(p.read_text() for p in folder.iterdir())
    assert text.count("- request:") == 12
    for secret in ("authorization", "x-stainless", "openai-organization", "org-sim"):
        assert secret not in text.lower()
    # the server the answers came from is recorded: a replay is only for that server
    assert text.count(f"uri: {sim.base_url}/chat/completions") == 12

    # When the simulator is gone, the key unset, and its port taken by a listener that
    # only counts connections (the same base URL: the cassettes' origin)
    port = sim.port
    sim.stop()
    listener.close()
    listener = counting_listener(port)
    url = f"http://127.0.0.1:{port}/v1"
    # (were anything sent, it would wait for an answer: bounded, so a failure is quick)
    fail_fast = ("--llm-timeout", "5", "--llm-max-retries", "0")
    result = pytester.runpytest("--llm-base-url", url, *fail_fast, "--llm-report", "rep.json")

    # Then the default mode is "none", results are identical and nothing connected
    result.stdout.fnmatch_lines(["*llmbench cassettes: replaying only (mode none)*"])
    assert result.parseoutcomes() == outcomes
    assert cases(pytester.path / "rep.json") == cases(pytester.path / "rec.json")
    assert len(cases(pytester.path / "rep.json")) == 6
    assert connections(listener) == 0
    listener.close()
    assert files_containing(pytester.path, KEY) == []
    assert files_containing(pytester.path, KEY[:20]) == []


def test_missing_interaction_names_cassette_and_request(
    pytester: pytest.Pytester, sim: Simulator
) -> None:
    pytester.makepyfile(test_suite=SUITE.format(rows=ROWS))
    recorded = record(pytester, sim, "--llm-no-prefetch", "--llm-record-mode", "all")
    recorded.assert_outcomes(passed=4, failed=2)
    before = sim.stats()["requests_total"]
    # an edited prompt is a request no cassette holds
    pytester.makepyfile(test_suite=EDITED.format(rows=ROWS))
    result = pytester.runpytest(
        "--llm-base-url", sim.base_url, "--llm-record-mode", "none", "--llm-report", "r.json"
    )
    result.assert_outcomes(failed=6)
    assert sim.stats()["requests_total"] == before  # the simulator was reachable, yet no request
    message = (
        "no recorded answer in cassette cassettes/test_suite/test_words[q1-t1].yaml for POST "
        '/v1/chat/completions {"messages": [{"content": "Q: What is the code word number 1?", '
        '"role": "user"}], "max_to… (--llm-record-mode none: nothing was sent; record it with '
        "a key and --llm-record-mode new_episodes)"
    )
    assert message in result.stdout.str()
    report = report_cases(pytester.path / "r.json")
    assert {c["outcome"] for c in report.values()} == {"error"}  # not a wrong answer
    assert message[:120] in report["test_suite.py::test_words[q1-t1]"]["error"]


def test_once_new_episodes_and_default_with_key(pytester: pytest.Pytester, sim: Simulator) -> None:
    # without the fetch stage: every call goes through its case's cassette in the test
    pytester.makepyfile(test_suite=SUITE.format(rows=ROWS))
    run = functools.partial(record, pytester, sim, "--llm-no-prefetch", "--llm-record-mode")
    run("once").assert_outcomes(passed=4, failed=2)
    assert sim.stats()["chat_answered"] == 12
    # once: existing cassettes are replayed, and closed to new requests
    run("once").assert_outcomes(passed=4, failed=2)
    pytester.makepyfile(test_suite=EDITED.format(rows=ROWS))
    result = run("once")
    result.assert_outcomes(failed=6)
    result.stdout.fnmatch_lines(
        ["*(--llm-record-mode once: nothing was sent; the cassette exists*"]
    )
    assert sim.stats()["chat_answered"] == 12
    # new_episodes: the edited requests are recorded next to the old ones
    assert sum(run("new_episodes").parseoutcomes().values()) == 6
    assert sim.stats()["chat_answered"] == 24
    one = pytester.path / "cassettes" / "test_suite" / "test_words[q0-t0].yaml"
    assert one.read_text().count("- request:") == 4
    # with a key and no mode, cassettes are not used at all
    result = record(pytester, sim, "--llm-no-prefetch", "--llm-fresh")
    assert "llmbench cassettes" not in result.stdout.str()
    assert sim.stats()["chat_answered"] == 36


def test_xdist_record_and_replay_with_cassette_dir(
    pytester: pytest.Pytester, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_suite=SUITE.format(rows=ROWS))
    args = ("-n", "2", "--llm-cassette-dir", "recorded")
    recorded = record(pytester, sim, *args, "--llm-record-mode", "all", "--llm-report", "a.json")
    recorded.assert_outcomes(passed=4, failed=2)
    assert len(list((pytester.path / "recorded" / "test_suite").glob("*.yaml"))) == 6
    assert not (pytester.path / "cassettes").exists()
    url = sim.base_url
    sim.stop()
    # the environment names the directory and the server the cassettes were recorded on
    monkeypatch.setenv("LLMBENCH_CASSETTE_DIR", "recorded")
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    result = pytester.runpytest("-n", "2", "--llm-max-retries", "0", "--llm-report", "b.json")
    result.assert_outcomes(passed=4, failed=2)
    assert cases(pytester.path / "b.json") == cases(pytester.path / "a.json")
    assert files_containing(pytester.path, KEY) == []


# ---------------------------------------------------------------------- usage errors
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--batch-api", "--llm-record-mode", "none"],
            "ERROR: --llm-record-mode: cassettes cannot be combined with --batch-api *",
        ),
        (
            ["--llm-record-mode", "sometimes"],
            "ERROR: --llm-record-mode: invalid value 'sometimes': expected one of none, once, *",
        ),
    ],
)
def test_usage_errors(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_without_key_or_cassettes_the_key_error_stands(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE.format(rows=ROWS))
    result = pytester.runpytest("--llm-no-prefetch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "no OpenAI API key" in result.stdout.str() + result.stderr.str()


# ---------------------------------------------------------------------- units
def test_vcrpy_intercepts_httpx2(sim: Simulator, tmp_path: Path) -> None:
    pins = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"vcrpy>=8.2"' in pins  # older vcrpy lets httpx2 traffic through unseen
    assert tuple(int(p) for p in version("vcrpy").split(".")[:2]) >= (8, 2)
    client = openai.OpenAI(api_key=KEY, base_url=sim.base_url, max_retries=0)
    assert isinstance(client._client, httpx2.Client)  # openai 3 sends through httpx2
    messages: Any = [{"role": "user", "content": "hello"}]
    path = str(tmp_path / "c.yaml")
    with vcr.use_cassette(path, record_mode="once", match_on=["method", "path", "body"]):
        first = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert sim.stats()["chat_requests"] == 1
    with vcr.use_cassette(path, record_mode="none", match_on=["method", "path", "body"]):
        again = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert sim.stats()["chat_requests"] == 1  # served by vcrpy from inside httpx2
    assert again.choices[0].message.content == first.choices[0].message.content
    client.close()


def test_cassette_names_and_paths(tmp_path: Path) -> None:
    assert cassette_name("a/test_x.py::TestA::test_b[q1-t0]") == "TestA.test_b[q1-t0]"
    # replaced characters: pytest-recording's "-", plus a hash so that names stay unique
    slash, colon = cassette_name("t.py::test_b[q/1]"), cassette_name("t.py::test_b[q:1]")
    assert re.fullmatch(r"test_b\[q-1\]~[0-9a-f]{8}", slash) and slash != colon
    long = cassette_name("t.py::test_" + "é" * 200)
    assert len(long.encode()) <= 120 and re.fullmatch(r"test_é+\.\.\.[0-9a-f]{16}", long)
    assert long != cassette_name("t.py::test_" + "é" * 201)
    nodeid = "suites/test_x.py::test_y[q1-t0]"
    assert cassette_path(nodeid, tmp_path, None) == (
        tmp_path / "suites" / "cassettes" / "test_x" / "test_y[q1-t0].yaml"
    )
    assert cassette_path(nodeid, tmp_path, tmp_path / "c") == (
        tmp_path / "c" / "suites" / "test_x" / "test_y[q1-t0].yaml"
    )
