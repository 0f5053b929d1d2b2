"""Arithmetic with a self-check: a second call, built from the first answer, is graded.

The model answers; then it is shown the question and its own answer and asked to check
it. The second prompt exists only once the first answer has arrived (a dependent call:
the prefetch sends the first calls ahead, the check is sent as the test runs). The case
makes two calls, and the checked answer is the one graded.
"""

from __future__ import annotations

import pytest

from pytest_llmbench import check, extract_number


def review_prompt(question: str, answer: str) -> str:
    """The second call: the question and the first answer, to be checked."""
    return (
        f"Question: {question}\n"
        f'Proposed answer: "{answer.strip()}"\n'
        "Check the proposed answer. If it is wrong, give the correct one. "
        "Reply with the number only."
    )


@pytest.mark.llmbench(dataset="data/arithmetic.csv", temperatures=[0.0, 1.0], id="id")
def test_arithmetic(case, llm):
    first = llm.generate_response(case["question"] + " Reply with the number only.", max_tokens=10)
    checked = llm.generate_response(review_prompt(case["question"], first.text), max_tokens=10)
    final = extract_number(checked.text)
    check(
        final == float(case["answer"]),
        question=case["question"],
        expected=case["answer"],
        answer=f"{first.text} (after the check: {checked.text})",
        got=final,
    )
