"""Short factual answers, five samples per question at T=0.7: accuracy and consistency.

``samples=5`` asks every question five times (node ids end in ``-s0`` ... ``-s4``), each
its own request, and the summary says how often an item's five answers agree.
``normalize=`` decides when two answers are the same answer: here "Canberra",
"canberra." and "Answer: Canberra" are one. A fifth of the questions are hard for the
simulated model (capitals people often get wrong): their answers scatter.
"""

from __future__ import annotations

import re

import pytest

from pytest_llmbench import check, contains, normalize, normalized_match

LEAD_IN = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)\s*", re.IGNORECASE)


def short_answer(text: str) -> str:
    """The answer's first line without a lead-in such as "Answer:", normalised."""
    first = text.strip().split("\n", 1)[0]
    return normalize(LEAD_IN.sub("", first))


@pytest.mark.llmbench(
    dataset="data/short_answers.jsonl",
    temperatures=[0.7],
    samples=5,
    id="id",
    normalize=short_answer,
)
def test_short_answer(case, llm):
    r = llm.generate_response(case["question"] + " Reply with the answer only.", max_tokens=16)
    got = short_answer(r.text)
    accepted = [case["answer"], *case.get("aliases", [])]
    check(
        # a bare answer, or a sentence that names it ("The capital of Australia is Canberra.")
        normalized_match(got, accepted) or contains(r.text, accepted),
        question=case["question"],
        expected=case["answer"],
        answer=r.text,
        got=got,
    )
