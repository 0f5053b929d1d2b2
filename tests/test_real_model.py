"""The plugin against a real (small) model: SmolLM2-135M-Instruct behind llama-cpp-python's
OpenAI-compatible server, as ``scripts/local-model.sh`` starts it.

Everything else in this directory talks to the simulator, whose answers, headers and
token counts are the ones this project wrote. These tests are the check that a real
server's answers, usage and quirks (no ``x-ratelimit-*`` headers, requests queued one at a
time, no Files or Batch API) go through the plugin as a user would run it: the example
suites in a subprocess, and a suite of dependent calls replayed from the store.

They run only when ``PYTEST_LLMBENCH_REAL_MODEL_URL`` names the server's base URL
(``http://127.0.0.1:PORT/v1``); then an unreachable server fails them, never skips them.
The model is weak (about half its answers are wrong) and rambles: wrong answers are
expected, errors are not. ``--llm-limit`` keeps them to about a minute at the server's
~3.5 requests per second on two threads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "example_suites"

# Read at import: the autouse _clean_env fixture (conftest.py) clears LLMBENCH_* per test.
URL = os.environ.get("PYTEST_LLMBENCH_REAL_MODEL_URL", "").rstrip("/")
FAKE_KEY = "sk-local-fake"  # the server checks no key; the SDK wants one

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        not URL,
        reason=(
            "set PYTEST_LLMBENCH_REAL_MODEL_URL to a running local model, "
            "e.g. scripts/local-model.sh"
        ),
    ),
]

CALLS = {"test_truthfulqa": 1, "test_short_answer": 1, "test_arithmetic": 2, "test_judged": 2}


@pytest.fixture(scope="module")
def model() -> str:
    """The name the server gives its model (``--llm-model`` must match it). A server that
    does not answer fails the test: with the variable set, nothing may pass without it."""
    try:
        with urllib.request.urlopen(f"{URL}/models", timeout=10) as response:
            models = json.load(response)["data"]
    except (OSError, ValueError, KeyError) as exc:
        pytest.fail(f"PYTEST_LLMBENCH_REAL_MODEL_URL={URL}: GET /models failed: {exc!r}")
    assert models, f"{URL}/models lists no model"
    return str(models[0]["id"])


def run(tmp_path: Path, model: str, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest in ``tmp_path`` as a user runs it against the server: its URL, a fake key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLMBENCH_"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", OPENAI_BASE_URL=URL, OPENAI_API_KEY=FAKE_KEY)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly"]
    command += ["--llm-model", model, *args]
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def sent(stdout: str) -> tuple[int, int]:
    """(requests sent, answers replayed) as the summary's origin line says them."""
    found = re.search(
        rf"llmbench answers from {re.escape(URL)}: (\d+) request\(s\) sent in this run"
        r"(?:, (\d+) answer\(s\) replayed from the store)?",
        stdout,
    )
    assert found, stdout[-3000:]
    return int(found[1]), int(found[2] or 0)


def test_the_example_suites_run_against_the_real_model(tmp_path: Path, model: str) -> None:
    # Given a copy of the example suites (their conftest only configures the simulator)
    ignore = shutil.ignore_patterns("__pycache__", ".llmbench", "cassettes")
    shutil.copytree(EXAMPLES, tmp_path / "example_suites", ignore=ignore)

    # When they run as the README says, 4 items per dataset: 64 requests
    args = ("example_suites", "--llm-limit", "4", "-n", "2", "--llm-report", "r.json")
    done = run(tmp_path, model, *args)
    output = done.stdout[-5000:] + done.stderr[-3000:]

    # Then the run completes: wrong answers fail their cases, nothing ends in an error
    assert done.returncode in (0, 1), output
    report: dict[str, Any] = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    cases = report["cases"]
    assert [c["nodeid"] for c in cases if c["outcome"] not in ("passed", "failed")] == []
    assert report["totals"]["errors"] == 0
    assert Counter(c["suite"] for c in cases) == {
        "test_truthfulqa": 4 * 3,
        "test_short_answer": 4 * 5,
        "test_arithmetic": 4 * 2,
        "test_judged": 4 * 2,
    }

    # every case got a real answer, and the two-call suites made their second call
    for case in cases:
        assert case["response"].strip(), case["nodeid"]
        assert case["calls"] == CALLS[case["suite"]], case["nodeid"]
        assert case["completion_tokens"] > 0 and case["prompt_tokens"] > 0, case["nodeid"]
    assert report["totals"]["prompt_tokens"] > 0
    assert report["totals"]["completion_tokens"] > 0

    # and the summary prints, naming the server and the model
    assert f"llmbench summary (prefetch, model {model})" in done.stdout, output
    assert re.search(r"^TOTAL +- +48 ", done.stdout, re.MULTILINE), output
    assert sent(done.stdout)[0] >= 64, output


SUITE = """
import pytest

from pytest_llmbench import check, extract_number

ROWS = [{"id": f"r{a}", "a": a, "b": b} for a, b in [(2, 3), (7, 5), (12, 9)]]


@pytest.mark.llmbench(dataset=ROWS, temperatures=[0.0, 1.0], id="id")
def test_add_then_check(case, llm):
    question = f"What is {case['a']} + {case['b']}?"
    first = llm.generate_response(question + " Reply with the number only.", max_tokens=8)
    second = llm.generate_response(
        f"{question} Someone answered {first.text.strip()!r}. If that is wrong, give the "
        "right number. Reply with the number only.",
        max_tokens=8,
    )
    check(
        extract_number(second.text) == case["a"] + case["b"],
        expected=case["a"] + case["b"],
        answer=f"{first.text} (after the check: {second.text})",
    )
"""


def test_a_dependent_suite_replays_from_the_store(tmp_path: Path, model: str) -> None:
    # Given a suite whose second call is built from the first answer (3 items x 2 T)
    (tmp_path / "test_dependent.py").write_text(SUITE, encoding="utf-8")
    args = ("test_dependent.py", "-n", "2", "--llm-report")

    # When it runs against the server, then again with the same command
    first = run(tmp_path, model, *args, "first.json")
    second = run(tmp_path, model, *args, "second.json")

    # Then the first run asked the server for both calls of every case
    assert first.returncode in (0, 1), first.stdout[-3000:] + first.stderr[-3000:]
    assert sent(first.stdout) == (12, 0)
    # and the rerun sent nothing: every answer, the dependent ones too, came from the store
    assert second.returncode == first.returncode, second.stdout[-3000:] + second.stderr[-3000:]
    assert sent(second.stdout) == (0, 12)
    reports = [
        json.loads((tmp_path / name).read_text(encoding="utf-8"))["cases"]
        for name in ("first.json", "second.json")
    ]
    answers = [{c["nodeid"]: (c["outcome"], c["answer"]) for c in cases} for cases in reports]
    assert len(answers[0]) == 6
    assert answers[1] == answers[0]
    assert all(c["calls"] == 2 and c["response"].strip() for c in reports[0])
