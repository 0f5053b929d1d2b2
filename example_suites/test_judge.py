"""LLM as judge: a second call at temperature 0 grades a free-text answer.

The model answers in a sentence; a judge call (``temperature=0.0`` whatever the case's
temperature) gets the question, a reference answer and the model's answer, and replies
CORRECT or INCORRECT. The case passes when the judge says CORRECT. Judges err too: now
and then it rejects a right answer or accepts a wrong one, as a real one does.
"""

from __future__ import annotations

import pytest

from pytest_llmbench import check


def judge_prompt(question: str, reference: str, answer: str) -> str:
    """The judge's prompt: question, reference and the answer to grade."""
    return (
        "You grade answers to questions against a reference answer.\n"
        f"Question: {question}\n"
        f"Reference answer: {reference}\n"
        f'Answer to grade: "{answer.strip()}"\n'
        "Does the answer to grade agree with the reference? Reply CORRECT or INCORRECT."
    )


@pytest.mark.llmbench(dataset="data/open_questions.jsonl", temperatures=[0.0, 1.0], id="id")
def test_judged(case, llm):
    r = llm.generate_response(case["question"] + " Answer in one sentence.", max_tokens=60)
    prompt = judge_prompt(case["question"], case["reference"], r.text)
    verdict = llm.generate_response(prompt, temperature=0.0, max_tokens=5)
    check(
        verdict.text.strip().upper().startswith("CORRECT"),
        question=case["question"],
        expected=case["reference"],
        answer=f"{r.text} [judge: {verdict.text.strip()}]",
        got=r.text,
    )
