"""Two-digit arithmetic from a CSV file, graded by the last number in the answer."""

from __future__ import annotations

import pytest

from pytest_llmbench import check, extract_number


@pytest.mark.llmbench(dataset="data/arithmetic.csv", temperatures=[0.0, 1.0], id="id")
def test_arithmetic(case, llm):
    r = llm.generate_response(case["question"] + " Reply with the number only.", max_tokens=10)
    check(
        extract_number(r.text) == float(case["answer"]),
        question=case["question"],
        expected=case["answer"],
        answer=r.text,
    )
