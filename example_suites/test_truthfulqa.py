"""TruthfulQA-style multiple choice: one test per question x temperature.

Shows the basic shape of a suite: a dataset, temperatures, one call per case, and a grade
with ``check``. ``got=`` is the letter that was compared, so a failure reads
``expected 'B', got 'A'`` and the summary shows accuracy falling as the temperature rises.
"""

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


@pytest.mark.llmbench(
    dataset="data/truthfulqa_mc.jsonl",
    temperatures=[0.0, 0.5, 1.0],
    id="qid",
    normalize=extract_choice,  # "B", "(b)" and "The answer is B." are one answer: "B"
)
def test_truthfulqa(case, llm):
    r = llm.generate_response(prompt(case), max_tokens=5)
    letter = extract_choice(r.text)
    check(
        letter == case["answer"],
        question=case["question"],
        expected=case["answer"],
        answer=r.text,
        got=letter,
    )
