"""The simulator, over real HTTP with the real ``openai`` SDK (never patched).

Each test starts its own simulator on a free loopback port (a few milliseconds), so no
configuration leaks between tests. Waits poll an observable status with a bounded deadline;
no test asserts on elapsed wall-clock time: claims about time run on a manual clock given to
the simulator's state (its limits and storms read that clock), claims about concurrency on the
simulator's counters.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from pytest_llmbench.sim import (
    AnswerItem,
    LatencyConfig,
    SimConfig,
    Simulator,
    go_duration,
    load_answer_key,
    prompt_tokens,
    text_tokens,
)
from pytest_llmbench.sim.__main__ import build_parser, config_from_args
from pytest_llmbench.sim.__main__ import main as cli_main
from pytest_llmbench.sim.answers import AnswerIndex
from pytest_llmbench.sim.limits import ModelLimits
from pytest_llmbench.sim.state import SimState

from .helpers import FAKE_KEY, ManualClock, questions, wait_for

MODEL = "gpt-4o-mini"
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$")
FAST_BATCH = {
    "batch_validating_seconds": 0.05,
    "batch_requests_per_second": 400.0,
    "batch_finalizing_seconds": 0.05,
    "batch_cancelling_seconds": 0.05,
}


def parse_duration(text: str) -> float:
    """Seconds of a Go-style duration (``1s``, ``6m0s``, ``2m59.56s``, ``120ms``)."""
    m = DURATION.match(text)
    assert m and text, f"not a Go duration: {text!r}"
    h, mins, s, ms = m.groups()
    return int(h or 0) * 3600 + int(mins or 0) * 60 + float(s or 0) + int(ms or 0) / 1000


def ask(text: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Answer with the name only."},
        {"role": "user", "content": f"Question: {text}\nAnswer:"},
    ]


@pytest.fixture
def start() -> Iterator[Callable[..., Simulator]]:
    """Start a simulator with the given SimConfig fields; all are stopped at teardown.

    ``clock=`` gives its state a clock (a :class:`ManualClock`): rate limits and storms then
    run on it instead of ``time.monotonic``.
    """
    started: list[Simulator] = []

    def _start(clock: Callable[[], float] | None = None, **fields: Any) -> Simulator:
        sim = Simulator(SimConfig(**fields), port=0)
        if clock is not None:
            sim.state = SimState(sim.config, clock=clock)  # before start(): the app serves it
        sim.start()
        started.append(sim)
        return sim

    yield _start
    for sim in started:
        sim.stop()


@pytest.fixture
def client() -> Iterator[Callable[..., openai.OpenAI]]:
    """Make SDK clients for a simulator (SDK retries off); all are closed at teardown."""
    made: list[openai.OpenAI] = []

    def _client(sim: Simulator, **kwargs: Any) -> openai.OpenAI:
        options: dict[str, Any] = {"api_key": FAKE_KEY, "max_retries": 0, **kwargs}
        c = openai.OpenAI(base_url=sim.base_url, **options)
        made.append(c)
        return c

    yield _client
    for c in made:
        c.close()


# -- chat completions --------------------------------------------------------------------


def test_chat_completion_has_the_full_shape_usage_and_headers(start, client) -> None:
    sim = start(answer_key=questions(3))
    messages = ask("What is the capital of imaginary country number 1?")
    raw = client(sim).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=20
    )
    completion = raw.parse()

    assert raw.headers["x-request-id"].startswith("req_")
    assert int(raw.headers["openai-processing-ms"]) >= 0
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert completion.system_fingerprint and completion.system_fingerprint.startswith("fp_")
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content in {"City1", "Town1a", "Town1b", "Town1c"}
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens(messages)
    assert usage.completion_tokens == 2  # ceil(len("City1") / 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_n_choices_and_truncation_to_max_tokens(start, client) -> None:
    sim = start()
    completion = client(sim).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tell me anything"}], n=3, max_tokens=2
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in completion.choices)
    assert all(len(c.message.content or "") <= 8 for c in completion.choices)
    assert completion.usage and completion.usage.completion_tokens == 6


def test_accuracy_falls_with_temperature_as_configured(start, client) -> None:
    # Given 200 known questions and p(T) = 0.9 - 0.35·T
    items = questions(200)
    sim = start(answer_key=items, seed=7)
    c = client(sim)

    def accuracy(temperature: float) -> float:
        def one(item: dict[str, Any]) -> bool:
            r = c.chat.completions.create(
                model=MODEL, messages=ask(item["question"]), temperature=temperature
            )
            return r.choices[0].message.content == item["correct"]

        with ThreadPoolExecutor(8) as pool:
            return sum(pool.map(one, items)) / len(items)

    # When every question is asked at T = 0, 1 and 2
    rates = [accuracy(t) for t in (0.0, 1.0, 2.0)]

    # Then accuracy is near 0.9, 0.55 and 0.2 (4 binomial s.d. at n=200 is about 0.14)
    assert rates[0] > rates[1] > rates[2]
    for rate, expected in zip(rates, (0.9, 0.55, 0.2), strict=True):
        assert abs(rate - expected) < 0.14, rates


def test_an_items_own_p_correct_replaces_the_configs(start, client) -> None:
    # Given 20 questions never answered right, 20 always (at T=0), and 20 at the default 0.9
    never, always, default = questions(60)[:20], questions(60)[20:40], questions(60)[40:]
    key = [{**q, "p_correct": 0.0} for q in never] + [{**q, "p_correct": 1.0} for q in always]
    sim = start(answer_key=key + default, p_correct=0.9, temperature_slope=0.35)
    c = client(sim)

    def answer(item: dict[str, Any], temperature: float) -> str | None:
        r = c.chat.completions.create(
            model=MODEL, messages=ask(item["question"]), temperature=temperature
        )
        return r.choices[0].message.content

    # Then p_correct=0 is never right and p_correct=1 always right at T=0, for every item
    assert all(answer(q, 0.0) in q["wrong"] for q in never)
    assert all(answer(q, 0.0) == q["correct"] for q in always)
    # and the slope still applies: p(2) = clamp(1 - 0.7, 0, 1) = 0.3, so some go wrong
    assert any(answer(q, 2.0) != q["correct"] for q in always for _ in range(3))
    # while items without their own p_correct keep the config's (0.9: most are right)
    assert sum(answer(q, 0.0) == q["correct"] for q in default) >= 14
    with pytest.raises(ValueError, match="p_correct"):
        AnswerItem(question="q", correct="a", p_correct=1.5)


def test_same_body_gives_the_same_answer_at_t0(start, client) -> None:
    sim = start(answer_key=questions(20))
    c = client(sim)
    answers = {
        i: c.chat.completions.create(model=MODEL, messages=ask(q["question"]), temperature=0)
        .choices[0]
        .message.content
        for i, q in enumerate(questions(20))
    }
    again = {
        i: c.chat.completions.create(model=MODEL, messages=ask(q["question"]), temperature=0)
        .choices[0]
        .message.content
        for i, q in enumerate(questions(20))
    }
    assert answers == again
    assert sim.stats()["duplicate_bodies"] == 20


def test_sampling_without_seed_varies_but_replays_after_reset(start, client) -> None:
    # 12 samples of one question at T=1.2 (p = 0.48): all equal would be 0.48^12-unlikely
    item = {"question": "Pick a colour of the rainbow", "correct": "red", "wrong": list("ab")}
    sim = start(answer_key=[item])
    c = client(sim)

    def samples() -> list[str | None]:
        return [
            c.chat.completions.create(model=MODEL, messages=ask(item["question"]), temperature=1.2)
            .choices[0]
            .message.content
            for _ in range(12)
        ]

    first = samples()
    assert len(set(first)) > 1
    sim.reset_stats()
    assert samples() == first  # deterministic by order

    seeded = {
        c.chat.completions.create(
            model=MODEL, messages=ask(item["question"]), temperature=1.2, seed=3
        )
        .choices[0]
        .message.content
        for _ in range(5)
    }
    assert len(seeded) == 1  # the seed parameter makes sampling repeatable


def test_unknown_prompt_gets_a_deterministic_filler(start, client) -> None:
    sim = start(answer_key=questions(5))
    c = client(sim)
    messages = [{"role": "user", "content": "Something nobody asked before"}]
    a = c.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    b = c.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert "ref " in (a.choices[0].message.content or "")


def test_models_list_and_retrieve(start, client) -> None:
    sim = start()
    c = client(sim)
    ids = [m.id for m in c.models.list()]
    assert {"gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1", "gpt-5-mini", "gpt-5"} <= set(ids)
    assert c.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("gpt-nope")
    assert err.value.code == "model_not_found"


def test_unknown_model_is_404_model_not_found(start, client) -> None:
    sim = start()
    with pytest.raises(openai.NotFoundError) as err:
        client(sim).chat.completions.create(
            model="gpt-9-imaginary", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "model_not_found"
    assert err.value.type == "invalid_request_error"
    assert "The model `gpt-9-imaginary` does not exist" in err.value.message


def test_bad_api_key_is_401_and_never_echoed(start, client) -> None:
    sim = start(api_keys=[FAKE_KEY])
    secret = "sk-test-fake-ABCDEFGHIJKLMNOPQRSTUVWXYZ987654"
    with pytest.raises(openai.AuthenticationError) as err:
        client(sim, api_key=secret).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "invalid_api_key"
    assert "Incorrect API key provided: sk-te****7654" in err.value.message
    assert secret not in str(err.value.body) and "ABCDEFGH" not in err.value.message


def test_missing_key_bad_json_and_unknown_route_over_raw_http(start) -> None:
    sim = start()
    auth = {"Authorization": f"Bearer {FAKE_KEY}"}
    with httpx2.Client(base_url=sim.url) as http:
        no_key = http.post("/v1/chat/completions", json={"model": MODEL})
        bad_json = http.post("/v1/chat/completions", content=b"{nope", headers=auth)
        nowhere = http.get("/v1/nowhere", headers=auth)
    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    assert bad_json.status_code == 400
    assert "could not parse the JSON body" in bad_json.json()["error"]["message"]
    assert nowhere.status_code == 404
    assert nowhere.json()["error"]["message"] == "Invalid URL (GET /v1/nowhere)"


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        pytest.param({"messages": []}, "messages", "empty_array", id="empty-messages"),
        pytest.param({"temperature": 2.5}, "temperature", "decimal_above_max_value", id="temp"),
        pytest.param({"n": 0}, "n", "integer_below_min_value", id="n"),
        pytest.param({"max_tokens": 0}, "max_tokens", "integer_below_min_value", id="max-tokens"),
        pytest.param(
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "invalid_value",
            id="role",
        ),
        pytest.param({"stream": True}, "stream", "unsupported_parameter", id="stream"),
    ],
)
def test_invalid_requests_are_400_naming_the_param(
    start, client, kwargs: dict[str, Any], param: str, code: str
) -> None:
    sim = start()
    args: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as err:
        client(sim).chat.completions.create(**args)
    assert err.value.type == "invalid_request_error"
    assert err.value.param == param
    assert err.value.code == code


def test_missing_messages_and_unknown_argument(start, client) -> None:
    sim = start()
    c = client(sim)
    with pytest.raises(openai.BadRequestError) as missing:
        c.chat.completions.create(model=MODEL, messages=openai.omit)
    assert missing.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as unknown:
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"colour": 1}
        )
    assert "Unrecognized request argument supplied: colour" in unknown.value.message


# -- reasoning models ------------------------------------------------------------------

REASONING = "gpt-5-mini"
#: every model the brief names, dated snapshots and a gateway's provider/ prefix
REASONING_NAMES = [
    *("gpt-5", "gpt-5-mini", "gpt-5-nano", "o1", "o3", "o3-mini", "o4-mini"),
    *("gpt-5-2025-08-07", "gpt-5.1", "o1-preview", "openai/gpt-5-mini", "GPT-5"),
]
OTHER_NAMES = ["gpt-4o-mini", "gpt-4.1", "gpt-5-chat-latest", "gpt-50", "o10", "davinci-o1"]


def reason(c: openai.OpenAI, **kwargs: Any) -> Any:
    question = "What is the capital of imaginary country number 1?"
    args: dict[str, Any] = {"model": REASONING, "messages": ask(question)}
    return c.chat.completions.create(**(args | kwargs))


def test_reasoning_families_are_the_clients() -> None:
    from pytest_llmbench.reasoning import is_reasoning_model

    config = SimConfig()
    assert all(config.is_reasoning(m) and is_reasoning_model(m) for m in REASONING_NAMES)
    assert not any(config.is_reasoning(m) or is_reasoning_model(m) for m in OTHER_NAMES)
    served = {"gpt-5", "gpt-5-mini", "gpt-5-nano", "o1", "o3", "o3-mini", "o4-mini"}
    assert served <= set(config.models)


def test_reasoning_models_refuse_max_tokens_and_temperature(start, client) -> None:
    c = client(start(answer_key=questions(2)))
    with pytest.raises(openai.BadRequestError) as max_tokens:
        reason(c, max_tokens=50)
    assert (max_tokens.value.param, max_tokens.value.code) == (
        "max_tokens",
        "unsupported_parameter",
    )
    assert "Use 'max_completion_tokens' instead" in max_tokens.value.message
    with pytest.raises(openai.BadRequestError) as temperature:
        reason(c, temperature=0.2)
    assert (temperature.value.param, temperature.value.code) == ("temperature", "unsupported_value")
    assert "does not support 0.2" in temperature.value.message
    assert reason(c, temperature=1, max_completion_tokens=1000).choices[0].message.content


@pytest.mark.parametrize(
    ("effort", "hidden"),
    [("none", 0), ("minimal", 16), ("low", 64), ("medium", 192), ("high", 512), (None, 192)],
)
def test_reasoning_tokens_by_effort_are_part_of_completion_tokens(
    start, client, effort: str | None, hidden: int
) -> None:
    c = client(start(answer_key=questions(2)))
    extra = {} if effort is None else {"reasoning_effort": effort}
    completion = reason(c, max_completion_tokens=2000, n=2, **extra)
    usage = completion.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 2 * hidden
    visible = sum(text_tokens(ch.message.content or "") for ch in completion.choices)
    assert visible > 0 and all(ch.finish_reason == "stop" for ch in completion.choices)
    assert usage.completion_tokens == 2 * hidden + visible
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_budget_the_reasoning_uses_up_gives_empty_content(start, client) -> None:
    c = client(start(answer_key=questions(2), reasoning_tokens_per_effort={"high": 300}))
    spent = reason(c, reasoning_effort="high", max_completion_tokens=256)
    assert spent.choices[0].message.content == ""
    assert spent.choices[0].finish_reason == "length"
    assert spent.usage is not None and spent.usage.completion_tokens_details is not None
    assert spent.usage.completion_tokens == 256
    assert spent.usage.completion_tokens_details.reasoning_tokens == 256
    # what the reasoning leaves over bounds the visible answer (City1, Town1a: 2 tokens)
    cut = reason(c, reasoning_effort="high", max_completion_tokens=301)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content in ("City", "Town")
    assert cut.usage is not None and cut.usage.completion_tokens == 301


def test_reasoning_effort_is_checked_like_the_apis(start, client) -> None:
    c = client(start())
    with pytest.raises(openai.BadRequestError) as bad:
        reason(c, reasoning_effort="extreme")
    assert (bad.value.param, bad.value.code) == ("reasoning_effort", "invalid_value")
    assert "'extreme'" in bad.value.message and "'minimal'" in bad.value.message
    with pytest.raises(openai.BadRequestError) as other:
        reason(c, model=MODEL, reasoning_effort="low")
    assert (other.value.param, other.value.code) == ("reasoning_effort", "unsupported_parameter")


def test_batch_lines_of_reasoning_models_report_reasoning_tokens(start, client) -> None:
    sim = start(answer_key=questions(3), **FAST_BATCH)
    c = client(sim)
    lines = batch_lines(questions(3), model=REASONING)
    for line in lines:
        line["body"] = {k: v for k, v in line["body"].items() if k != "temperature"}
        line["body"]["reasoning_effort"] = "low"
    final = settle(c, submit(c, lines).id)
    output = read_jsonl(c, final.output_file_id)
    assert final.status == "completed" and len(output) == 3
    for o in output:
        usage = o["response"]["body"]["usage"]
        assert usage["completion_tokens_details"]["reasoning_tokens"] == 64
        assert usage["completion_tokens"] > 64


# -- rate limits -------------------------------------------------------------------------


def test_rpm_limit_refuses_a_burst_with_retry_after_and_headers(start, client) -> None:
    # Given 120 RPM: a bucket of 2 requests refilling 2 per second (on a manual clock)
    clock = ManualClock()
    sim = start(rpm=120, clock=clock)
    c = client(sim)
    messages = [{"role": "user", "content": "hi"}]
    results = []
    # When 5 requests are sent at once
    for _ in range(5):
        try:
            results.append(
                c.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
            )
        except openai.RateLimitError as exc:
            results.append(exc)

    # Then 2 pass and 3 get 429 rate_limit_exceeded with a usable retry-after-ms
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) == 2 and len(refused) == 3
    headers = ok[1].headers
    assert headers["x-ratelimit-limit-requests"] == "120"
    assert int(headers["x-ratelimit-remaining-requests"]) == 118
    assert 0 < parse_duration(headers["x-ratelimit-reset-requests"]) <= 1.0
    err = refused[0]
    assert err.code == "rate_limit_exceeded" and err.type == "requests"
    assert "on requests per min (RPM): Limit 120" in err.message
    retry_ms = int(err.response.headers["retry-after-ms"])
    assert 0 < retry_ms <= 500
    assert err.response.headers["retry-after"] == "1"
    assert err.response.headers["x-ratelimit-limit-requests"] == "120"
    assert f"Please try again in {retry_ms}ms" in err.message

    # And a request sent after the hinted wait passes
    clock.advance(retry_ms / 1000)
    assert c.chat.completions.create(model=MODEL, messages=messages).choices
    stats = sim.stats()
    assert stats["rate_limit_429"] == 3 and stats["chat_answered"] == 3


def test_limits_are_paced_per_second_not_per_minute(start, client) -> None:
    # Given 600 RPM (10 per second, burst capacity 10), on a clock that moves only when told:
    # how fast 30 threads reach the server on a loaded machine does not enter the count
    clock = ManualClock()
    sim = start(rpm=600, clock=clock)
    c = client(sim)

    def one(_: int) -> bool:
        try:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        except openai.RateLimitError:
            return False
        return True

    def burst() -> int:
        with ThreadPoolExecutor(30) as pool:
            return sum(pool.map(one, range(30)))

    # When 30 requests arrive at once, then 30 more half a second later
    first = burst()
    clock.advance(0.5)
    second = burst()

    # Then one second's worth passes, then half a second's: not a minute's (600)
    assert (first, second) == (10, 5)
    assert sim.stats()["rate_limit_429"] == 60 - 15
    assert sum(sim.stats()["answered_per_second"].values()) == 15


def test_tpm_limit_and_request_too_large(start, client) -> None:
    # Given 6000 TPM: 100 tokens per second of capacity; each request reserves prompt + 50
    sim = start(tpm=6000, tokenizer="estimate")  # chars/4: the arithmetic below
    c = client(sim)
    messages = [{"role": "user", "content": "hi"}]  # 1 + 4 prompt tokens
    first = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=50
    )
    assert first.headers["x-ratelimit-remaining-tokens"] == str(6000 - 55)
    assert "x-ratelimit-limit-requests" not in first.headers  # no RPM limit, no RPM headers
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model=MODEL, messages=messages, max_tokens=50)
    assert err.value.type == "tokens" and err.value.code == "rate_limit_exceeded"
    assert re.search(
        r"tokens per min \(TPM\): Limit 6000, Used 5\d, Requested 55", err.value.message
    )
    assert int(err.value.response.headers["retry-after-ms"]) > 0

    with pytest.raises(openai.RateLimitError) as too_large:
        c.chat.completions.create(model=MODEL, messages=messages, max_tokens=7000)
    assert "Request too large for gpt-4o-mini" in too_large.value.message
    assert "Limit 6000, Requested 7005" in too_large.value.message
    assert "retry-after-ms" not in too_large.value.response.headers


def test_default_max_tokens_counts_toward_tpm(start, client) -> None:
    sim = start(tpm=60_000, default_max_tokens=100, tokenizer="estimate")
    raw = client(sim).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2
    )
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(60_000 - 5 - 2 * 100)


def test_quota_mode_gives_insufficient_quota(start, client) -> None:
    sim = start(quota_exceeded=True)
    with pytest.raises(openai.RateLimitError) as err:
        client(sim).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "insufficient_quota" and err.value.type == "insufficient_quota"
    assert err.value.message.startswith("Error code: 429 - You exceeded your current quota")
    assert sim.stats()["quota_429"] == 1 and sim.stats()["rate_limit_429"] == 0


def test_token_bucket_with_a_manual_clock() -> None:
    now = [100.0]
    limits = ModelLimits(rpm=60, tpm=None, burst_seconds=2.0, clock=lambda: now[0])
    assert limits.admit(1).admitted and limits.admit(1).admitted
    refused = limits.admit(1)
    assert not refused.admitted and refused.retry_after == pytest.approx(1.0)
    now[0] += 1.0
    assert limits.admit(1).admitted
    assert limits.headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "58",  # 3 taken, 1 refilled
        "x-ratelimit-reset-requests": "2s",
    }


def test_jitter_tolerance_admits_slightly_early_requests_into_debt() -> None:
    now = [0.0]
    limits = ModelLimits(rpm=60, tpm=None, burst_seconds=1.0, clock=lambda: now[0], tolerance=0.05)
    assert limits.admit(1).admitted
    now[0] = 0.97  # 30 ms early: admitted, the bucket owes 30 ms
    assert limits.admit(1).admitted
    now[0] = 1.96  # 40 ms before its slot at 2.0: still within tolerance
    assert limits.admit(1).admitted
    now[0] = 2.90  # 100 ms before its slot at 3.0: refused, told to wait the full 100 ms
    refused = limits.admit(1)
    assert not refused.admitted and refused.retry_after == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.12, "120ms"),
        (0.0121, "13ms"),
        (1.0, "1s"),
        (8.64, "8.64s"),
        (360.0, "6m0s"),
        (179.56, "2m59.56s"),
        (3600.0, "1h0m0s"),
    ],
)
def test_go_durations(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(max(seconds, 0), abs=0.001)


# -- faults ------------------------------------------------------------------------------


def _call(c: openai.OpenAI) -> Any:
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_scripted_faults_map_to_sdk_errors(start, client) -> None:
    sim = start(script=["500", "503", "ok", "429", "drop", "malformed"])
    c = client(sim)
    with pytest.raises(openai.InternalServerError) as e500:
        _call(c)
    assert e500.value.status_code == 500 and e500.value.type == "server_error"
    with pytest.raises(openai.InternalServerError) as e503:
        _call(c)
    assert e503.value.status_code == 503
    assert "The engine is currently overloaded" in e503.value.message
    assert _call(c).choices  # "ok"
    with pytest.raises(openai.RateLimitError) as e429:
        _call(c)
    assert e429.value.response.headers["retry-after-ms"] == "200"
    with pytest.raises(openai.APIConnectionError) as dropped:
        _call(c)
    assert not isinstance(dropped.value, openai.APITimeoutError)
    with pytest.raises((json.JSONDecodeError, openai.APIResponseValidationError)):
        _call(c)
    assert _call(c).choices  # the script is used up
    stats = sim.stats()
    assert stats["faults_injected"] == {"500": 1, "503": 1, "429": 1, "drop": 1, "malformed": 1}
    assert stats["script_left"] == 0 and sim.config.script == []


def test_hang_trips_the_client_timeout_and_stops_cleanly(start, client) -> None:
    sim = start(script=["hang"], hang_seconds=30)
    c = client(sim)
    with pytest.raises(openai.APITimeoutError):
        _call(c.with_options(timeout=0.3))  # only the hung request needs a short timeout
    assert _call(c).choices  # the next request is served while nothing hangs anymore
    assert sim.stats()["faults_injected"] == {"hang": 1}


def test_fault_rates_are_seeded_and_reproducible(start, client) -> None:
    def pattern(sim: Simulator) -> list[str]:
        c = client(sim)
        out = []
        for _ in range(40):
            try:
                _call(c)
                out.append("ok")
            except openai.InternalServerError as exc:
                out.append(str(exc.status_code))
        return out

    a = pattern(start(faults={"500": 0.3, "503": 0.2}, seed=11))
    b = pattern(start(faults={"500": 0.3, "503": 0.2}, seed=11))
    assert a == b
    assert 5 <= a.count("500") <= 20 and 2 <= a.count("503") <= 15


def test_storm_for_k_requests_then_for_t_seconds(start, client) -> None:
    clock = ManualClock()  # the storm's seconds run on it
    sim = start(clock=clock)
    c = client(sim)
    sim.configure(storm={"requests": 3, "retry_after_ms": 50})
    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as err:
            _call(c)
        assert err.value.code == "rate_limit_exceeded"
        assert err.value.response.headers["retry-after-ms"] == "50"
    assert _call(c).choices
    assert sim.config.storm is None

    # When a storm is set for 0.3 s
    sim.configure(storm={"seconds": 0.3})
    began = clock()
    # Then every request during those 0.3 s is refused...
    for offset in (0.0, 0.1, 0.2, 0.29):
        clock.t = began + offset
        with pytest.raises(openai.RateLimitError) as err:
            _call(c)
        assert err.value.code == "rate_limit_exceeded"
        assert sim.stats()["storm_active"]
    # ...and the first one once they are over passes; the storm is gone
    clock.t = began + 0.3
    assert _call(c).choices
    assert sim.config.storm is None and not sim.stats()["storm_active"]
    assert sim.stats()["faults_injected"]["storm"] == 3 + 4


def test_latency_and_peak_in_flight(start, client) -> None:
    # Given a fixed latency of 0.3 s
    sim = start(latency=LatencyConfig(kind="fixed", mean=0.3))
    c = client(sim)
    # When 8 requests are sent at once
    with ThreadPoolExecutor(8) as pool:
        assert all(r.choices for r in pool.map(lambda _: _call(c), range(8)))
    stats = sim.stats()
    # Then the latency held each one in the server until all 8 were there (without it, each
    # is answered within a millisecond, long before the eighth arrives), none is left over
    assert stats["peak_in_flight"] == 8 and stats["in_flight"] == 0
    assert stats["chat_answered"] == 8
    # And they waited side by side: the answers were ready together, in one second of the
    # counter (two when they straddle a second's end); one after another they would spread
    # over 2.4 s, three seconds or more
    assert len(stats["answered_per_second"]) <= 2, stats["answered_per_second"]


def test_parallelism_queues_the_rest_like_llama_cpp(start, client) -> None:
    # Given a server that answers 2 requests at a time, 0.2 s each
    sim = start(latency=LatencyConfig(kind="fixed", mean=0.2), parallelism=2)
    c = client(sim)
    # When 6 requests are sent at once
    with ThreadPoolExecutor(6) as pool:
        assert all(r.choices for r in pool.map(lambda _: _call(c), range(6)))
    stats = sim.stats()
    # Then all 6 were accepted and held, but only 2 were served at once: the others waited
    # their turn in the queue (their latency includes the wait), none is left over
    assert stats["peak_in_flight"] == 6 and stats["peak_serving"] == 2
    assert stats["chat_answered"] == 6 and stats["serving"] == 0 == stats["in_flight"]


def test_parallelism_none_is_unlimited_and_is_a_cli_flag(start, client) -> None:
    # Given the default (no parallelism limit) and a fixed latency long enough for 6
    # threads to have sent theirs before the first answer, on a loaded machine too (at
    # 0.2 s, two test suites side by side on 2 cores saw only 3 at once)
    sim = start(latency=LatencyConfig(kind="fixed", mean=1.0))
    c = client(sim)
    with ThreadPoolExecutor(6) as pool:
        assert all(r.choices for r in pool.map(lambda _: _call(c), range(6)))
    # Then all 6 were served side by side
    assert sim.stats()["peak_serving"] == 6
    # And the CLI sets it, refusing 0
    parser = build_parser()
    assert config_from_args(parser.parse_args(["--parallelism", "1"]), parser).parallelism == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--parallelism", "0"])


def test_lognormal_latency_parse_and_cli_spec() -> None:
    cfg = LatencyConfig.parse("lognormal:0.5:0.5")
    assert (cfg.kind, cfg.mean, cfg.sigma) == ("lognormal", 0.5, 0.5)
    assert LatencyConfig.parse("uniform:0.1:0.2").high == 0.2
    with pytest.raises(ValueError, match="bad latency"):
        LatencyConfig.parse("gamma:1")


def test_duplicate_bodies_count_only_repeated_successes(start, client) -> None:
    sim = start(rpm=60)  # a burst of 1
    c = client(sim)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "same"}], "temperature": 0}
    assert c.chat.completions.create(**body).choices
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(**body)  # refused: not an answer
    assert sim.stats()["duplicate_bodies"] == 0
    sim.configure(rpm=None)
    c.chat.completions.create(**body)
    c.chat.completions.create(**body)
    stats = sim.stats()
    digest = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert stats["duplicate_bodies"] == 2
    assert stats["duplicate_body_hashes"] == {digest: 2}


# -- answer key --------------------------------------------------------------------------


def test_answer_index_prefers_the_longest_match_and_scales(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    items = [AnswerItem(**q) for q in questions(30_000)]
    items.append(AnswerItem(question="What is 2+2?", correct="4", wrong=["5"]))
    items.append(AnswerItem(question="What is 2+2? Show your work.", correct="4, as 2+2", wrong=[]))
    index = AnswerIndex(items)
    prompt = [{"role": "user", "content": "Solve.\nWhat is 2+2? Show your work.\nThanks"}]
    hit = index.find(prompt)
    assert hit is not None and hit.correct == "4, as 2+2"

    # It scales: a prompt in the usual layout is found by exact lookups, never by a scan of
    # all 30,000 questions (counted on the index, so the claim does not depend on the load)
    scans: list[str] = []
    scan = index._scan

    def counted_scan(text: str) -> AnswerItem | None:
        scans.append(text)
        return scan(text)

    monkeypatch.setattr(index, "_scan", counted_scan)
    for i in range(0, 30_000, 30):
        found = index.find(ask(f"What is the capital of imaginary country number {i}?"))
        assert found is not None and found.correct == f"City{i}"
    assert scans == []
    # an unusual layout falls back to the scan, which still finds the question
    inline = [
        {"role": "user", "content": "Q - What is the capital of imaginary country number 7? go"}
    ]
    found = index.find(inline)
    assert found is not None and found.correct == "City7"
    assert len(scans) == 1


def test_load_answer_key_from_jsonl_json_and_objects(tmp_path: Path) -> None:
    rows = questions(3)
    jsonl = tmp_path / "key.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    as_json = tmp_path / "key.json"
    as_json.write_text(json.dumps(rows))
    assert load_answer_key(jsonl) == load_answer_key(as_json) == load_answer_key(rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: bad answer-key item"):
        load_answer_key(bad)


# -- batches -----------------------------------------------------------------------------


def batch_lines(items: list[dict[str, Any]], model: str = MODEL) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": ask(item["question"]), "temperature": 0},
        }
        for i, item in enumerate(items)
    ]


def submit(c: openai.OpenAI, lines: list[dict[str, Any]] | bytes) -> Any:
    data = lines if isinstance(lines, bytes) else "".join(json.dumps(x) + "\n" for x in lines)
    payload = data if isinstance(data, bytes) else data.encode()
    uploaded = c.files.create(file=("batch.jsonl", io.BytesIO(payload)), purpose="batch")
    return c.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "sim-test"},
    )


def settle(c: openai.OpenAI, batch_id: str, seen: set[str] | None = None) -> Any:
    terminal = {"completed", "failed", "expired", "cancelled"}

    def done() -> Any:
        b = c.batches.retrieve(batch_id)
        if seen is not None:
            seen.add(b.status)
        return b if b.status in terminal else None

    return wait_for(done, timeout=10.0, interval=0.005)


def read_jsonl(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in c.files.content(file_id).text.splitlines()]


def test_batch_flow_with_shuffled_output_joined_by_custom_id(start, client) -> None:
    # Given 30 questions, a fast batch and a 60 RPM limit that batches must not touch
    items = questions(30)
    sim = start(answer_key=items, rpm=60, **FAST_BATCH | {"batch_requests_per_second": 300.0})
    c = client(sim)
    lines = batch_lines(items)

    # When the batch runs to completion
    batch = submit(c, lines)
    assert batch.status == "validating" and batch.metadata == {"suite": "sim-test"}
    seen: set[str] = set()
    final = settle(c, batch.id, seen)

    # Then it went through the phases and every line is in the output, in another order
    assert final.status == "completed"
    assert {"in_progress", "finalizing"} & seen
    assert final.request_counts is not None
    assert (final.request_counts.total, final.request_counts.completed) == (30, 30)
    assert final.in_progress_at and final.finalizing_at and final.completed_at
    assert final.expires_at and final.expires_at >= final.created_at
    assert final.error_file_id is None and final.model == MODEL
    output = read_jsonl(c, final.output_file_id)
    ids = [o["custom_id"] for o in output]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines) and ids != [
        x["custom_id"] for x in lines
    ]
    first = output[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["request_id"].startswith("req_")
    assert first["response"]["body"]["object"] == "chat.completion"
    assert final.usage is not None
    assert final.usage.input_tokens == sum(
        o["response"]["body"]["usage"]["prompt_tokens"] for o in output
    )

    # And a line's answer equals the real-time answer to the same body at T=0
    by_id = {o["custom_id"]: o for o in output}
    live = c.chat.completions.create(**lines[5]["body"])  # the 60 RPM bucket is still full
    assert (
        live.choices[0].message.content
        == (by_id["q5"]["response"]["body"]["choices"][0]["message"]["content"])
    )
    stats = sim.stats()
    assert stats["files_uploaded"] == 1 and stats["batches_created"] == 1
    assert stats["batch_lines_processed"] == 30 and stats["chat_requests"] == 1


@pytest.mark.parametrize("how", ["configure", "POST /_sim/config"])
def test_a_job_held_in_validation_goes_on_once_the_configuration_lets_it(
    start, client, how: str
) -> None:
    # Given a job that would validate for an hour
    sim = start(**FAST_BATCH | {"batch_validating_seconds": 3600.0})
    c = client(sim)
    batch = submit(c, batch_lines(questions(5)))
    assert c.batches.retrieve(batch.id).status == "validating"

    # When the validation time is cut while it validates
    patch = {"batch_validating_seconds": 0.05}
    if how == "configure":
        sim.configure(**patch)
    else:
        with httpx2.Client(base_url=sim.url) as http:
            assert http.post("/_sim/config", json=patch).status_code == 200

    # Then the job goes on at once (settle waits at most 10 s) and completes
    final = settle(c, batch.id)
    assert final.status == "completed"
    assert final.request_counts is not None and final.request_counts.completed == 5


def test_batch_expires_with_partial_results(start, client) -> None:
    # Given 40 lines at 50 per second and an expiry 0.35 s after creation
    sim = start(**FAST_BATCH | {"batch_requests_per_second": 50.0, "batch_expire_after": 0.35})
    c = client(sim)
    lines = batch_lines(questions(40))
    final = settle(c, submit(c, lines).id)

    # Then finished lines are in the output, the rest are batch_expired errors
    assert final.status == "expired" and final.expired_at
    output = read_jsonl(c, final.output_file_id)
    expired = read_jsonl(c, final.error_file_id)
    assert 3 <= len(output) <= 25
    assert len(output) + len(expired) == 40
    assert {o["custom_id"] for o in output}.isdisjoint(e["custom_id"] for e in expired)
    assert all(e["response"] is None for e in expired)
    assert all(e["error"]["code"] == "batch_expired" for e in expired)
    assert final.request_counts is not None
    assert final.request_counts.completed == len(output)


@pytest.mark.parametrize(
    ("index", "key", "value", "code"),
    [
        pytest.param(1, "model", "gpt-4o", "model_mismatch", id="two-models"),
        pytest.param(2, "custom_id", "q0", "duplicate_custom_id", id="duplicate"),
        pytest.param(0, "url", "/v1/embeddings", "url_mismatch", id="url"),
        pytest.param(0, "method", "GET", "invalid_value", id="method"),
        pytest.param(3, "custom_id", None, "missing_required_parameter", id="no-custom-id"),
    ],
)
def test_invalid_batch_files_fail_validation(
    start, client, index: int, key: str, value: Any, code: str
) -> None:
    sim = start(**FAST_BATCH)
    c = client(sim)
    lines = batch_lines(questions(4))
    target = lines[index]["body"] if key == "model" else lines[index]
    target[key] = value
    final = settle(c, submit(c, lines).id)
    assert final.status == "failed" and final.failed_at and final.in_progress_at is None
    assert final.errors is not None and final.errors.object == "list"
    assert final.errors.data
    assert (final.errors.data[0].code, final.errors.data[0].line) == (code, index + 1)


def test_batch_rejects_bad_json_and_too_many_lines(start, client) -> None:
    sim = start(**FAST_BATCH, batch_max_requests=3)
    c = client(sim)
    bad = settle(c, submit(c, b'{"custom_id": "a"\n').id)
    assert bad.errors and bad.errors.data
    assert bad.errors.data[0].code == "invalid_json_line"
    assert bad.errors.data[0].message == "This line is not parseable as valid JSON."
    many = settle(c, submit(c, batch_lines(questions(4))).id)
    assert many.status == "failed" and many.errors and many.errors.data
    assert many.errors.data[0].code == "too_many_tasks"


def test_line_errors_go_to_the_error_file(start, client) -> None:
    sim = start(**FAST_BATCH, batch_fail_custom_ids=["q1", "q3"])
    c = client(sim)
    lines = batch_lines(questions(6))
    lines[4]["body"]["temperature"] = 9  # rejected per line with 400
    final = settle(c, submit(c, lines).id)
    assert final.status == "completed" and final.request_counts is not None
    assert (final.request_counts.completed, final.request_counts.failed) == (3, 3)
    errors = {e["custom_id"]: e for e in read_jsonl(c, final.error_file_id)}
    assert set(errors) == {"q1", "q3", "q4"}
    assert errors["q1"]["error"] is None
    assert errors["q1"]["response"]["status_code"] == 500
    assert errors["q1"]["response"]["body"]["error"]["type"] == "server_error"
    assert errors["q4"]["response"]["status_code"] == 400
    assert errors["q4"]["response"]["body"]["error"]["param"] == "temperature"


def test_enqueued_token_limit_counts_pending_batches(start, client) -> None:
    # Given a 400-token enqueued limit and a slow first batch of about 300 prompt tokens
    sim = start(**FAST_BATCH | {"batch_requests_per_second": 10.0}, batch_enqueued_token_limit=400)
    c = client(sim)
    lines = batch_lines(questions(10))
    tokens = sum(prompt_tokens(x["body"]["messages"]) for x in lines)
    assert 200 < tokens <= 400
    first = submit(c, lines)
    wait_for(lambda: c.batches.retrieve(first.id).status == "in_progress", timeout=5)

    # When a second batch for the same model arrives while the first is pending
    second = settle(c, submit(c, lines).id)

    # Then it fails with token_limit_exceeded
    assert second.status == "failed" and second.errors and second.errors.data
    assert second.errors.data[0].code == "token_limit_exceeded"
    assert "Limit: 400 enqueued tokens" in (second.errors.data[0].message or "")
    c.batches.cancel(first.id)


def test_cancel_goes_through_cancelling_to_cancelled(start, client) -> None:
    sim = start(**FAST_BATCH | {"batch_requests_per_second": 20.0, "batch_cancelling_seconds": 0.1})
    c = client(sim)
    batch = submit(c, batch_lines(questions(40)))
    wait_for(lambda: c.batches.retrieve(batch.id).request_counts.completed >= 2, timeout=5)
    cancelling = c.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    final = settle(c, batch.id)
    assert final.status == "cancelled" and final.cancelled_at
    output = read_jsonl(c, final.output_file_id)
    assert 2 <= len(output) < 40
    with pytest.raises(openai.BadRequestError):
        c.batches.cancel(batch.id)


def test_batch_list_pages_newest_first(start, client) -> None:
    sim = start(**FAST_BATCH)
    c = client(sim)
    ids = [submit(c, batch_lines(questions(1))).id for _ in range(3)]
    page = c.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    rest = c.batches.list(limit=2, after=ids[1])
    assert [b.id for b in rest.data] == [ids[0]]
    for batch_id in ids:
        settle(c, batch_id)
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_missing")


def test_files_retrieve_content_and_delete(start, client) -> None:
    sim = start()
    c = client(sim)
    f = c.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="batch")
    assert f.object == "file" and f.bytes == 9 and f.purpose == "batch"
    assert c.files.retrieve(f.id).filename == "x.jsonl"
    assert c.files.content(f.id).text == '{"a": 1}\n'
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


# -- inspection endpoints and the CLI ----------------------------------------------------


def test_sim_endpoints_over_http(start, client) -> None:
    sim = start()
    with httpx2.Client(base_url=sim.url) as http:
        patched = http.post("/_sim/config", json={"rpm": 60, "latency": {"kind": "fixed"}})
        assert patched.status_code == 200 and patched.json()["rpm"] == 60
        assert http.get("/_sim/config").json()["latency"]["kind"] == "fixed"
        bad = http.post("/_sim/config", json={"rpm": -1})
        assert bad.status_code == 400 and "rpm" in bad.json()["error"]["message"]
        c = client(sim)
        _call(c)
        with pytest.raises(openai.RateLimitError):
            _call(c)
        stats = http.get("/_sim/stats").json()
        assert stats["chat_requests"] == 2 and stats["by_status"] == {"200": 1, "429": 1}
        assert http.post("/_sim/reset").status_code == 200
        stats = http.get("/_sim/stats").json()
        assert stats["chat_requests"] == 0 and stats["requests_total"] == 0
        assert http.get("/_sim/config").json()["rpm"] == 60  # config survives a reset
        assert _call(c).choices  # buckets are full again after the reset


def test_stats_are_safe_to_read_while_serving(start, client) -> None:
    sim = start(latency={"kind": "uniform", "low": 0.0, "high": 0.02})
    c = client(sim)
    stop = threading.Event()
    snapshots: list[int] = []

    def reader() -> None:
        while not stop.wait(0.001):
            snapshots.append(sim.stats()["chat_requests"])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: _call(c), range(20)))
    finally:
        stop.set()
        thread.join()
    assert snapshots == sorted(snapshots) and sim.stats()["chat_answered"] == 20


def test_cli_serves_until_terminated(tmp_path: Path) -> None:
    key = tmp_path / "key.jsonl"
    key.write_text(json.dumps({"question": "Ping?", "correct": "Pong", "wrong": []}) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_llmbench.sim", "--port", "0", "--answer-key", str(key),
         "--p-correct", "1", "--rpm", "600", "--latency", "fixed:0.01"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        m = re.fullmatch(
            r"pytest-llmbench simulator listening on (http://127\.0\.0\.1:\d+/v1)", line
        )
        assert m, line
        with openai.OpenAI(api_key=FAKE_KEY, base_url=m.group(1), max_retries=0) as c:
            r = c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Ping?"}], temperature=0
            )
        assert r.choices[0].message.content == "Pong"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        assert proc.stdout.read() == ""
        proc.stdout.close()


def test_cli_bad_input_exits_2_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest_llmbench.sim", "--port", "0", "--latency", "gamma:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith("python -m pytest_llmbench.sim: error:")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--fault-rate", "boom=0.1"], id="fault-kind"),
        pytest.param(["--fault-rate", "500=2"], id="fault-rate"),
        pytest.param(["--rpm", "0"], id="rpm"),
        pytest.param(["--answer-key", "/nonexistent/key.jsonl"], id="answer-key"),
        pytest.param(["--batch-line-error-rate", "1.5"], id="line-error-rate"),
    ],
)
def test_cli_rejects_bad_settings(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--port", "0", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m pytest_llmbench.sim: error:"), err


def test_cli_config_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    path.write_text(json.dumps({"rpm": 10, "tpm": 5000, "faults": {"500": 0.1}}))
    parser = build_parser()
    args = parser.parse_args(["--config", str(path), "--rpm", "99", "--fault-rate", "drop=0.2"])
    cfg = config_from_args(args, parser)
    assert (cfg.rpm, cfg.tpm) == (99, 5000)
    assert cfg.faults == {"500": 0.1, "drop": 0.2}
