"""Bad input: datasets, ids, options and models a user gets wrong.

Malformed JSONL lines, duplicate ids, a CSV missing a column, non-UTF-8 bytes and ids
that clash once made valid pytest ids all fail at collection, in one run, each with a
line naming the file, line and field; a 1 MB prompt fails its case with the server's
refusal and what to shorten, without flooding the output; an invalid ``--llm-gate`` is a
usage error naming the gate; a model the server answers 404 stops the run naming the
model. No traceback anywhere. The simulator runs over HTTP with gpt-4o-mini's tier-1
tokens-per-minute limit (200,000), which a 1 MB prompt exceeds as it would on the API.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from pytest_llmbench.errors import FATAL_EXIT_STATUS
from pytest_llmbench.sim import SimConfig, Simulator

from ..helpers import FAKE_KEY

SUITE = """
import pytest

@pytest.mark.llmbench(dataset={dataset!r}, temperatures=[0.0], id="qid"{extra})
def test_{name}(case, llm):
    r = llm.generate_response(case["question"], max_tokens=8)
    assert r.text == case["answer"], r.text  # no case passes without its own answer
"""

#: each bad dataset: (file name, bytes, extra marker arguments, what its error must say)
DATASETS: dict[str, tuple[str, bytes, str, str]] = {
    "malformed line": (
        "malformed.jsonl",
        b'{"qid": "a", "question": "q1"}\n{"qid": "b", "question": \n',
        "",
        "malformed.jsonl:2: invalid JSON: Expecting value",
    ),
    "duplicate id": (
        "dup.jsonl",
        b'{"qid": "a", "question": "q1"}\n{"qid": "a", "question": "q2"}\n',
        "",
        "dup.jsonl:2: duplicate id 'a' (also on line 1)",
    ),
    "CSV missing a column": (
        "short.csv",
        b"qid,prompt\na,q1\nb,q2\n",
        ', required=["question"]',
        "short.csv:2: field 'question': required field missing",
    ),
    "non-UTF-8 bytes": (
        "latin1.jsonl",
        b'{"qid": "a", "question": "q1"}\n{"qid": "b", "question": "caf\xe9"}\n',
        "",
        "latin1.jsonl:2: not UTF-8 text: byte 0xe9 at column 30",
    ),
    "ids that are not pytest ids": (
        "ids.jsonl",
        b'{"qid": "a/b", "question": "q1"}\n{"qid": "a:b", "question": "q2"}\n',
        "",
        "ids.jsonl:2: id 'a:b' becomes 'a_b' in node ids, like 'a/b' on line 1",
    ),
}


def text_of(result: pytest.RunResult) -> str:
    text = result.stdout.str() + "\n" + result.stderr.str()
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    assert "site-packages" not in text, text
    return text


def write_suite(pytester: pytest.Pytester, name: str, dataset: str, extra: str = "") -> None:
    source = SUITE.format(dataset=dataset, extra=extra, name=name)
    pytester.makepyfile(**{f"test_{name}": source})


def test_bad_input(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, survives: Callable[..., Any]
) -> None:
    pytester.makeini("[pytest]\n")
    small = {"qid": "small: [2]", "question": "What is 2 + 2?", "answer": "4"}
    key = [{"question": small["question"], "correct": "4", "wrong": ["5"]}]
    with Simulator(SimConfig(tpm=200_000, answer_key=key, p_correct=1.0), port=0) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
        monkeypatch.setenv("LLMBENCH_BASE_URL", sim.base_url)
        checked: list[str] = []

        # Given a project whose datasets are each wrong in one way
        for n, (file, content, extra, _) in enumerate(DATASETS.values()):
            (pytester.path / file).write_bytes(content)
            write_suite(pytester, f"bad{n}", file, extra)
        # When it runs, then collection stops with one error per file, each naming the
        # file, line and field at fault, and nothing is sent
        result = pytester.runpytest("-p", "no:cacheprovider")
        text = text_of(result)
        assert result.ret == pytest.ExitCode.INTERRUPTED
        for what, (_, _, _, message) in DATASETS.items():
            errors = [line for line in text.splitlines() if line.startswith(message)]
            assert len(errors) == 1, (what, text)
            checked.append(what)
        assert sim.stats()["requests_total"] == 0
        for path in pytester.path.glob("test_bad*.py"):
            path.unlink()

        # Given a 1 MB prompt beside a small one (and ids pytest could not take as they are)
        rows = [{"qid": "huge prompt/1", "question": "word " * 200_000, "answer": "-"}, small]
        data = "".join(json.dumps(r) + "\n" for r in rows)
        (pytester.path / "big.jsonl").write_text(data, encoding="utf-8")
        assert len(data) > 1_000_000
        write_suite(pytester, "big", "big.jsonl")
        result = pytester.runpytest("-n", "2", "--llm-report", "r.json")
        text = text_of(result)
        # Then its case fails with the server's refusal and what to do, not retried; the
        # other passes; ids became valid node ids; the prompt is not echoed
        result.assert_outcomes(passed=1, failed=1)
        assert "request too large for the gpt-4o-mini tokens-per-minute limit: shorten" in text
        assert len(text) < 20_000 and "word word word" not in text
        report = json.loads((pytester.path / "r.json").read_text(encoding="utf-8"))
        outcomes = {c["nodeid"].split("::")[1]: c["outcome"] for c in report["cases"]}
        assert outcomes == {
            "test_big[huge_prompt_1-t0]": "error",
            "test_big[small___2_-t0]": "passed",
        }
        retries, lost = report["totals"]["retries"], len(rows) - report["totals"]["cases"]
        assert retries == 0 and sim.stats()["rate_limit_429"] == 1
        checked.append("1 MB prompt")

        # When a gate is malformed, then a usage error names it, before any test
        result = pytester.runpytest("--llm-gate", "test_big:accuracy>>0.5")
        text = text_of(result)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert "ERROR: --llm-gate: gate 'test_big:accuracy>>0.5': unknown operator '>>'" in text
        checked.append("invalid --llm-gate")

        # When the model does not exist, then the server's 404 stops the run, naming it
        sent = sim.stats()["chat_requests"]
        result = pytester.runpytest("-n", "2", "--llm-model", "gpt-9-nonexistent", "--llm-fresh")
        text = text_of(result)
        assert result.ret == FATAL_EXIT_STATUS
        stop = [line for line in text.splitlines() if "stored answers are kept" in line]
        assert len(stop) == 1 and "not found (404): check --llm-model" in stop[0], text
        assert "gpt-9-nonexistent" in stop[0]
        assert sim.stats()["chat_requests"] - sent <= 2  # the first refusal stops it
        checked.append("unknown model (404)")
        paid_twice = sim.stats()["duplicate_bodies"]

    survives(
        item="bad input",
        cases=len(checked),
        faults=", ".join(checked),
        retries=retries,
        paid_twice=paid_twice,
        lost=lost,
        outcome="each a message naming the file:line:field, the prompt, the gate or the "
        "model; no traceback, nothing sent for the bad datasets",
    )
