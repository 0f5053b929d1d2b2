"""Teaches the built-in simulator (``--llm-sim``) the answers of these example suites.

A real API needs none of this: the hook only runs with ``--llm-sim``. Each entry of the
answer key is ``{"question": text to find in a prompt, "correct": ..., "wrong": [...]}``,
optionally with its own ``p_correct``; the simulator answers a prompt from the longest
entry it contains, correctly with p(T) = p_correct - 0.35 x T (p_correct 0.9 by
default), else with one of the wrong answers. Each suite's entries come from its data
files; what only the simulated model knows (its wrong answers) is in ``data/sim/``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

# the prompts the two-call suites send, so the simulator learns exactly those
from test_arithmetic import review_prompt
from test_judge import judge_prompt

DATA = Path(__file__).parent / "data"

# The short answers the simulated model often gets wrong, with their p_correct at T=0
# (0.9 for the others): s001-s010 are capitals people often confuse (Canberra, Ottawa...).
HARD = {"s001": 0.4, "s002": 0.5, "s003": 0.4, "s004": 0.3, "s005": 0.5,
        "s006": 0.4, "s007": 0.3, "s008": 0.5, "s009": 0.4, "s010": 0.3}  # fmt: skip


def read_jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text("utf-8").splitlines()]


def truthfulqa_key() -> list[dict[str, Any]]:
    """The right letter, or one of the other three."""
    key = []
    for row in read_jsonl("truthfulqa_mc.jsonl"):
        wrong = [letter for letter in "ABCD" if letter != row["answer"]]
        key.append({"question": row["question"], "correct": row["answer"], "wrong": wrong})
    return key


def short_answer_key() -> list[dict[str, Any]]:
    """The answer or a plausible wrong one; the HARD items right less often."""
    wrong = {row["id"]: row["wrong"] for row in read_jsonl("sim/short_answers_wrong.jsonl")}
    key = []
    for row in read_jsonl("short_answers.jsonl"):
        entry = {"question": row["question"], "correct": row["answer"], "wrong": wrong[row["id"]]}
        if row["id"] in HARD:
            entry["p_correct"] = HARD[row["id"]]
        key.append(entry)
    return key


def arithmetic_key() -> list[dict[str, Any]]:
    """The question, then one entry per first answer for the self-check: a check keeps a
    right answer (a check rarely talks the model out of one) and fixes a wrong one with
    the usual p(T), else repeats it."""
    key = []
    with (DATA / "arithmetic.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            n, question = int(row["answer"]), row["question"]
            right = str(n)
            wrong = [w for w in dict.fromkeys([str(n + 1), str(n - 10), str(n * 2)]) if w != right]
            key.append({"question": question, "correct": right, "wrong": wrong})
            review = review_prompt(question, right)
            key.append({"question": review, "correct": right, "wrong": wrong, "p_correct": 1.0})
            for first in wrong:
                key.append(
                    {"question": review_prompt(question, first), "correct": right, "wrong": [first]}
                )
    return key


def judge_key() -> list[dict[str, Any]]:
    """A good or a bad answer to each question, then the judge's verdict on each."""
    answers = {row["id"]: row for row in read_jsonl("sim/open_answers.jsonl")}
    key = []
    for row in read_jsonl("open_questions.jsonl"):
        sim = answers[row["id"]]
        key.append({"question": row["question"], "correct": sim["good"], "wrong": sim["bad"]})
        verdicts = [(sim["good"], "CORRECT")] + [(bad, "INCORRECT") for bad in sim["bad"]]
        for answer, verdict in verdicts:
            prompt = judge_prompt(row["question"], row["reference"], answer)
            other = "INCORRECT" if verdict == "CORRECT" else "CORRECT"
            key.append({"question": prompt, "correct": verdict, "wrong": [other]})
    return key


def pytest_llmbench_sim_config(config: Any) -> dict[str, Any]:
    key = truthfulqa_key() + short_answer_key() + arithmetic_key() + judge_key()
    # a generous account, so the whole tour takes seconds: 3000 requests and 1M tokens
    # per minute, ~0.3 s latency
    return {
        "answer_key": key,
        "rpm": 3000,
        "tpm": 1_000_000,
        "latency": {"kind": "lognormal", "mean": 0.3, "sigma": 0.5},
    }
