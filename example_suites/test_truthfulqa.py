"""TruthfulQA-style multiple choice: one test per question x temperature."""

from __future__ import annotations

import pytest

from pytest_llmbench import check, extract_choice


def prompt(case: dict[str, object]) -> str:
    choices = case["choices"]
    assert isinstance(choices, list)
    lines = [str(case["question"])]
    lines += [f"{letter}) {text}" for letter, text in zip("ABCD", choices, strict=False)]
    lines.append("Answer with one letter.")
    return "\n".join(lines)


@pytest.mark.llmbench(dataset="data/truthfulqa_mc.jsonl", temperatures=[0.0, 0.5, 1.0], id="qid")
def test_truthfulqa(case, llm):
    r = llm.generate_response(prompt(case), max_tokens=5)
    check(
        extract_choice(r.text) == case["answer"],
        question=case["question"],
        expected=case["answer"],
        answer=r.text,
    )
