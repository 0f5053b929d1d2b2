"""The example suites do what the README's tour says they show, on the built-in simulator.

One run of a copy of ``example_suites/`` (``--llm-sim -n 2 --llm-report``), checked from
its JSON report; and, without any run, that every prompt the suites send finds its own
entry of the answer key that ``example_suites/conftest.py`` teaches the simulator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "example_suites"

SUITES = {  # suite: (temperatures, calls per case)
    "test_truthfulqa": ([0.0, 0.5, 1.0], 1),
    "test_short_answer": ([0.7], 1),
    "test_arithmetic": ([0.0, 1.0], 2),
    "test_judged": ([0.0, 1.0], 2),
}

# Loaded after example_suites/conftest.py (trylast), so its settings win: the same answer
# key, but no latency to wait for and room for two workers to go fast.
FAST = """
import pytest


@pytest.hookimpl(trylast=True)
def pytest_llmbench_sim_config(config):
    return {"rpm": 12000, "latency": {"kind": "fixed", "mean": 0.02}}
"""


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLMBENCH_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_tour(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    ignore = shutil.ignore_patterns("__pycache__", ".llmbench", "cassettes")
    shutil.copytree(EXAMPLES, tmp_path / "example_suites", ignore=ignore)
    (tmp_path / "conftest.py").write_text(FAST, encoding="utf-8")
    command = [sys.executable, "-m", "pytest", "-n", "2", "example_suites", "--llm-sim"]
    command += ["--llm-report", "r.json", "-p", "no:cacheprovider", "-q"]
    done = subprocess.run(
        command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    return done, report


def test_the_tour_runs_each_suite_as_the_readme_says(tmp_path: Path) -> None:
    done, report = run_tour(tmp_path)
    # some cases fail on purpose (wrong answers), none ends in an error
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["totals"]["errors"] == 0
    assert [c["nodeid"] for c in report["cases"] if c["outcome"] == "error"] == []
    assert report["totals"]["failed"] > 0

    rows: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    for row in report["suites"]:
        rows[row["suite"]][row["temperature"]] = row
    assert {suite: sorted(by_t) for suite, by_t in rows.items()} == {
        suite: temperatures for suite, (temperatures, _) in SUITES.items()
    }
    for suite, by_t in rows.items():
        assert all(row["cases"] >= 50 for row in by_t.values()), suite
    # wrong answers are more frequent at a higher temperature
    for suite in ("test_truthfulqa", "test_arithmetic"):
        assert rows[suite][1.0]["accuracy"] < rows[suite][0.0]["accuracy"], suite

    # the two-call suites made two calls per case (the check, the judge), the others one
    for case in report["cases"]:
        assert case["calls"] == SUITES[case["suite"]][1], case["nodeid"]

    # five samples of every short-answer item, compared across samples
    samples: dict[str, list[int]] = defaultdict(list)
    for case in report["cases"]:
        if case["suite"] == "test_short_answer":
            samples[case["item_id"]].append(case["sample"])
    assert len(samples) >= 50
    assert all(sorted(s) == [0, 1, 2, 3, 4] for s in samples.values()), samples
    consistency = rows["test_short_answer"][0.7]["consistency"]
    assert consistency["samples"] == 5
    assert consistency["inconsistent_items"]  # the hard items scatter


# Run in a subprocess beside the suites: conftest.py imports the prompt builders of the
# test modules, which must not be imported into this test session.
MAPPING = """
import csv, json, sys
sys.path.insert(0, ".")
import conftest
from pytest_llmbench.sim.answers import AnswerIndex, load_answer_key
from test_arithmetic import review_prompt
from test_judge import judge_prompt
from test_truthfulqa import prompt

key = load_answer_key(conftest.pytest_llmbench_sim_config(None)["answer_key"])
index = AnswerIndex(key)
found = lambda text: getattr(index.find([{"role": "user", "content": text}]), "question", None)
bad = [q for q in {item.question for item in key} if [i.question for i in key].count(q) > 1]
def expect(text, question):
    if found(text) != question:
        bad.append([text, found(text)])

for row in conftest.read_jsonl("truthfulqa_mc.jsonl"):
    expect(prompt(row), row["question"])
for row in conftest.read_jsonl("short_answers.jsonl"):
    expect(row["question"] + " Reply with the answer only.", row["question"])
for item in key:
    if item.question.startswith("Question: What is"):  # the self-check prompts
        expect(item.question, item.question)
with open("data/arithmetic.csv", newline="") as fh:
    for row in csv.DictReader(fh):
        expect(row["question"] + " Reply with the number only.", row["question"])
answers = {row["id"]: row for row in conftest.read_jsonl("sim/open_answers.jsonl")}
for row in conftest.read_jsonl("open_questions.jsonl"):
    expect(row["question"] + " Answer in one sentence.", row["question"])
    sim = answers[row["id"]]
    for answer in [sim["good"], *sim["bad"]]:
        judge = judge_prompt(row["question"], row["reference"], answer)
        expect(judge, judge)
hard = sum(item.p_correct is not None and item.p_correct <= 0.5 for item in key)
print(json.dumps({"items": len(key), "bad": bad, "hard": hard}))
"""


def test_every_prompt_finds_its_own_answer_key_entry() -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MAPPING)],
        cwd=EXAMPLES,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["bad"] == []  # no duplicate question, no prompt answered by another entry
    assert result["items"] >= 60 + 50 + 50 * 5 + 50 * 4
    assert 8 <= result["hard"] <= 12  # about a fifth of the 50 short answers


def test_the_readme_tour_quotes_the_suites_as_they_are() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## A tour of the example suites\n")
    tour = readme[start : readme.index("\n## ", start + 1)]
    blocks = tour.split("```python\n")[1:]
    assert len(blocks) == 2
    for block, name in zip(blocks, ["test_arithmetic.py", "test_judge.py"], strict=True):
        code = block[: block.index("```")]
        assert code in (EXAMPLES / name).read_text(encoding="utf-8"), name
