"""LLMClient over real HTTP against the simulator, with the real openai SDK.

No test asserts on elapsed wall-clock time: waits for the budget run on a manual clock given
to the budget, claims about rate limits and concurrency are read from the simulator's counters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pytest_llmbench import LLMCallError, LLMClient, LLMConfig
from pytest_llmbench.budget import Budget, MemoryBudget
from pytest_llmbench.retry import BackoffPolicy, parse_duration, reset_wait, retry_after
from pytest_llmbench.sim import SimConfig, Simulator

from .helpers import FAKE_KEY, ManualClock


def make_client(
    sim: Simulator, tmp_path: Path, *, budget: Budget | None = None, **changes: object
) -> LLMClient:
    settings: dict[str, object] = {
        "api_key": FAKE_KEY,
        "base_url": sim.base_url,
        "run_dir": tmp_path / "run",
        "backoff_min": 0.01,
        "backoff_max": 0.2,
        "timeout": 5.0,
    }
    settings.update(changes)
    return LLMClient(LLMConfig.model_validate(settings), budget=budget)


@pytest.fixture
def client(sim: Simulator, tmp_path: Path) -> Iterator[LLMClient]:
    with make_client(sim, tmp_path) as c:
        yield c


def test_response_carries_text_usage_and_params(client: LLMClient, sim: Simulator) -> None:
    r = client.generate_response("Say something", temperature=0.0, max_tokens=20)
    assert r.ok and r.text
    assert r.choices == (r.text,)
    assert r.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    assert r.model == "gpt-4o-mini"
    assert r.request_id and r.request_id.startswith("req_")
    assert r.params == {"model": "gpt-4o-mini", "temperature": 0.0, "max_tokens": 20}
    assert r.latency > 0
    assert r.attempts == 1
    assert sim.stats()["chat_answered"] == 1


def test_messages_and_n_choices(client: LLMClient) -> None:
    r = client.generate_response(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        n=3,
        temperature=1.0,
    )
    assert len(r.choices) == 3


def test_usage_is_summed_per_model(client: LLMClient, sim: Simulator) -> None:
    a = client.generate_response("one", model="gpt-4o-mini")
    b = client.generate_response("two", model="gpt-4o")
    c = client.generate_response("three", model="gpt-4o")
    usage = client.usage()
    assert usage["gpt-4o-mini"] == a.usage
    assert usage["gpt-4o"] == b.usage + c.usage
    stats = sim.stats()
    assert stats["prompt_tokens"] == sum(r.usage.prompt_tokens for r in (a, b, c))
    assert stats["completion_tokens"] == sum(r.usage.completion_tokens for r in (a, b, c))


def test_storm_of_429s_is_ridden_out(client: LLMClient, sim: Simulator) -> None:
    # Given a storm that refuses the next 6 requests with retry-after-ms 20
    sim.configure(storm={"requests": 6, "retry_after_ms": 20})
    # When 3 calls run concurrently
    results = client.batch_generate([f"question {i}" for i in range(3)])
    # Then none is lost and every refusal was retried
    assert all(r.ok for r in results), [r.error for r in results]
    stats = sim.stats()
    assert stats["rate_limit_429"] == 6
    assert stats["chat_answered"] == 3
    total = client.stats.total()
    assert total.rate_limited == 6
    assert total.retries == 6


@pytest.mark.parametrize(
    ("setup", "status", "fragment"),
    [
        ({"quota_exceeded": True}, 429, "quota"),
        ({"require_api_key": True, "api_keys": ["sk-another-fake-key"]}, 401, "OPENAI_API_KEY"),
    ],
)
def test_non_retryable_errors_stop_after_one_request(
    client: LLMClient, sim: Simulator, setup: dict[str, object], status: int, fragment: str
) -> None:
    sim.configure(**setup)
    with pytest.raises(LLMCallError) as info:
        client.generate_response("hello")
    assert info.value.status == status
    assert info.value.attempts == 1
    assert fragment in str(info.value)
    assert FAKE_KEY not in str(info.value)
    assert sim.stats()["chat_requests"] == 1


def test_unknown_model_and_bad_request_fail_at_once(client: LLMClient, sim: Simulator) -> None:
    with pytest.raises(LLMCallError, match=r"not found \(404\).*--llm-model"):
        client.generate_response("hello", model="gpt-nonexistent")
    with pytest.raises(LLMCallError, match=r"invalid request \(parameter 'temperature'\)"):
        client.generate_response("hello", temperature=7)
    assert sim.stats()["chat_requests"] == 2


def test_request_too_large_is_not_retried(sim: Simulator, tmp_path: Path) -> None:
    sim.configure(tpm=1000)
    with make_client(sim, tmp_path) as c, pytest.raises(LLMCallError, match="shorten the prompt"):
        c.generate_response("x" * 8000, max_tokens=10)
    assert sim.stats()["chat_requests"] == 1


@pytest.mark.parametrize("fault", ["500", "503", "drop", "malformed", "429"])
def test_transient_faults_are_retried(client: LLMClient, sim: Simulator, fault: str) -> None:
    sim.configure(script=[fault, fault], fault_retry_after_ms=20)  # the hint of an injected 429
    r = client.generate_response("hello")
    assert r.ok and r.attempts == 3
    stats = sim.stats()
    assert stats["chat_requests"] == 3
    assert stats["faults_injected"][fault] == 2


def test_hung_request_times_out_and_is_retried(sim: Simulator, tmp_path: Path) -> None:
    sim.configure(script=["hang"], hang_seconds=30)
    with make_client(sim, tmp_path, timeout=0.5) as c:
        r = c.generate_response("hello")
    assert r.ok and r.attempts == 2
    assert sim.stats()["chat_answered"] == 1


def test_retries_are_bounded(sim: Simulator, tmp_path: Path) -> None:
    sim.configure(faults={"500": 1.0})
    with make_client(sim, tmp_path, max_retries=2) as c, pytest.raises(LLMCallError) as info:
        c.generate_response("hello")
    assert info.value.attempts == 3
    assert "after 3 attempts" in str(info.value)
    assert sim.stats()["chat_requests"] == 3


def test_batch_generate_keeps_order_and_reports_failures(client: LLMClient, sim: Simulator) -> None:
    prompts = [f"prompt {i}" for i in range(8)]
    expected = [client.generate_response(p, temperature=0).text for p in prompts]
    # an empty message list is a 400 for that item alone
    results = client.batch_generate([*prompts[:3], [], *prompts[3:]], temperature=0)
    assert len(results) == 9
    assert [r.text for r in results if r.ok] == expected
    bad = results[3]
    assert not bad.ok and "invalid request" in (bad.error or "")
    assert sim.stats()["chat_requests"] == 8 + 9


def test_batch_generate_runs_concurrently(sim: Simulator, tmp_path: Path) -> None:
    sim.configure(latency={"kind": "fixed", "mean": 0.1})
    with make_client(sim, tmp_path, max_concurrency=8) as c:
        results = c.batch_generate([f"q{i}" for i in range(16)])
    assert all(r.ok for r in results)
    assert sim.stats()["peak_in_flight"] >= 4


def test_a_prompt_count_handed_to_arun_is_the_one_the_budget_reserves(
    sim: Simulator, tmp_path: Path
) -> None:
    # the plan counts each prompt and the fetch hands the count over: at 1,000 tokens per
    # minute a count of 5,000 can never fit, the prompt's own few tokens (counted here) do
    bodies = [
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}]}
        for i in range(2)
    ]
    answered: list[int] = []
    failed: list[tuple[int, str]] = []
    with make_client(sim, tmp_path, tpm=1000, max_tokens=10) as c:
        asyncio.run(
            c.arun(
                [0, 1],
                lambda i: bodies[i],
                lambda i, _answer: answered.append(i),
                lambda i, exc: failed.append((i, str(exc))),
                prompt_tokens=lambda i: 5000 if i == 0 else None,
            )
        )
    assert answered == [1]
    assert [i for i, _ in failed] == [0]
    assert "5010 tokens can never fit" in failed[0][1]
    assert sim.stats()["chat_requests"] == 1


def test_async_twin(client: LLMClient, sim: Simulator) -> None:
    # The simulator answers a body deterministically at temperature 0, so the async calls
    # must return exactly what the sync calls returned for the same prompts, in order.
    prompts = [f"twin prompt {i}" for i in range(4)]
    sync = [client.generate_response(p, temperature=0).text for p in prompts]

    async def main() -> list[str]:
        rs = await asyncio.gather(*(client.agenerate_response(p, temperature=0) for p in prompts))
        return [r.text for r in rs]

    assert asyncio.run(main()) == sync
    assert len(set(sync)) == 4  # distinct answers: a mix-up of the results cannot pass
    assert sim.stats()["chat_answered"] == 8


def test_rate_limit_is_respected_at_1200_rpm(tmp_path: Path) -> None:
    # The acceptance scenario (60 requests per minute on both sides, a burst of one request,
    # 30 calls), 20 times faster: 1,200 RPM with a burst window of 0.05 s is still a bucket
    # of one request on both sides, so every call after the first waits for the budget.
    limits = {"rpm": 1200, "burst_seconds": 0.05}
    with Simulator(SimConfig(**limits), port=0) as server:
        with make_client(server, tmp_path, **limits, backoff_max=0.1) as c:
            results = c.batch_generate([f"call {i}" for i in range(30)])
            total = c.stats.total()
        stats = server.stats()
    # all answered, none lost: every 429 was retried
    assert all(r.ok for r in results), [r.error for r in results]
    assert stats["chat_answered"] == 30 and total.calls == 30
    assert total.rate_limited == total.retries == stats["rate_limit_429"]
    print(f"429s seen by the simulator: {stats['rate_limit_429']}")
    # paced by the budget: sent all at once, 28 of the 30 meet a 429 (the second one fits
    # the simulator's 50 ms jitter tolerance)
    assert stats["rate_limit_429"] <= 3


def test_quota_fails_after_exactly_one_request(sim: Simulator, tmp_path: Path) -> None:
    sim.configure(quota_exceeded=True)
    with make_client(sim, tmp_path, backoff_min=0.5, backoff_max=8.0) as c:
        started = time.perf_counter()
        with pytest.raises(LLMCallError, match="quota"):
            c.generate_response("hello")
        elapsed = time.perf_counter() - started
    print(f"insufficient_quota failed after {elapsed:.3f}s")
    assert sim.stats()["chat_requests"] == 1


def test_key_never_shows(
    sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "sk-test-fake-key-RECOGNISABLE-424242"
    sim.configure(require_api_key=True, api_keys=["sk-test-other"])
    c = make_client(sim, tmp_path, api_key=secret)
    with pytest.raises(LLMCallError) as info:
        c.generate_response("hello")
    text = " ".join([str(info.value), repr(info.value), repr(c), repr(c.config), str(c.config)])
    print(text)
    c.close()
    out = capsys.readouterr()
    assert secret not in text + out.out + out.err
    assert "RECOGNISABLE" not in text


# ---------------------------------------------------------------------- the policy, unit
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("2m59.56s", 179.56),
        ("0.5", 0.5),
        ("", None),
        ("soon", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    got = parse_duration(text)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


def test_retry_after_prefers_ms_then_seconds_then_date() -> None:
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert retry_after({}) is None


def test_reset_wait_scales_the_full_reset_to_one_unit() -> None:
    headers = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "60s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "6s",
    }
    assert reset_wait(headers) == pytest.approx(1.0)
    assert reset_wait({**headers, "x-ratelimit-remaining-requests": "5"}) is None


def test_backoff_is_full_jitter_and_capped() -> None:
    high = BackoffPolicy(base=0.5, cap=8.0, rng=lambda: 0.999999)
    low = BackoffPolicy(base=0.5, cap=8.0, rng=lambda: 0.0)
    assert [round(high.backoff(n), 3) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert low.backoff(5) == 0.0


def test_server_hint_wins_over_backoff(sim: Simulator) -> None:
    sim.configure(script=["429"], fault_retry_after_ms=1234)
    raw = openai.OpenAI(api_key=FAKE_KEY, base_url=sim.base_url, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        raw.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    raw.close()
    policy = BackoffPolicy(base=0.01, cap=0.02, rng=lambda: 0.0)
    assert policy.wait(info.value, attempt=1) == pytest.approx(1.234)


def test_latency_excludes_the_wait_for_the_budget(sim: Simulator, tmp_path: Path) -> None:
    # Given a budget of 600 RPM with a one-request burst, on a manual clock: the wait it
    # asks for is exact, and its sleep really blocks for that long, so a latency that
    # counted the wait would show it
    clock = ManualClock()
    wait_ended: list[float] = []

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        time.sleep(seconds)
        wait_ended.append(time.perf_counter())

    budget = MemoryBudget(rpm=600, burst_seconds=0.1, clock=clock, sleep=sleep)
    with make_client(sim, tmp_path, budget=budget) as c:
        # When a first call spends the burst and the next one has to wait for the budget
        c.generate_response("first")
        r = c.generate_response("second")
        returned = time.perf_counter()
    # Then only the second call waited, 0.1 s (one request at 600 RPM)...
    assert clock.slept == [pytest.approx(0.1)]
    # ...and its latency is the HTTP round trip only: it began after the wait was over
    assert 0 < r.latency <= returned - wait_ended[0]
    assert sim.stats()["chat_answered"] == 2


# ---------------------------------------------------------------------------------------
# The hot path: the SDK's post() for plain bodies, tenacity only once a retry is needed

PLAIN_BODIES: list[dict[str, object]] = [
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "x"}]},
        ],
        "temperature": 0.7,
        "n": 2,
        "stop": ["a", "b"],
        "seed": 3,
        "logit_bias": {"1": 5},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "max_completion_tokens": 5,
        "stream": False,
    },
]


@pytest.mark.parametrize("body", PLAIN_BODIES)
def test_a_plain_body_is_sent_exactly_as_create_sends_it(body: dict[str, object]) -> None:
    import json

    import httpx2

    from pytest_llmbench.transport import _OPTIONS, plain_body

    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json={"choices": []})

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    with openai.OpenAI(api_key=FAKE_KEY, base_url="http://x/v1", http_client=http) as c:
        assert plain_body(body)
        c.chat.completions.with_raw_response.create(**body)  # type: ignore[call-overload]
        c.post("/chat/completions", body=body, cast_to=httpx2.Response, options=_OPTIONS)
    created, posted = seen
    assert (posted.method, posted.url) == (created.method, created.url)
    assert json.loads(posted.content) == json.loads(created.content)
    per_request = {"idempotency-key", "x-stainless-raw-response"}
    headers = [{k: v for k, v in r.headers.items() if k not in per_request} for r in seen]
    assert headers[1] == headers[0]


def test_other_bodies_still_go_through_create(client: LLMClient, sim: Simulator) -> None:
    from pytest_llmbench.transport import plain_body

    base = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    for extra in ({"bogus": 1}, {"extra_body": {"seed": 1}}, {"timeout": 5}, {"stream": True}):
        assert not plain_body({**base, **extra}), extra
    assert not plain_body({"model": "gpt-4o-mini"})
    assert not plain_body({**base, "response_format": LLMConfig})  # a class: create refuses
    # an SDK option still works as one, and what create() refuses is still refused unsent
    assert client.generate_response("hello", extra_body={"seed": 1}).ok
    with pytest.raises(LLMCallError, match=r"TypeError.*bogus"):
        client.generate_response("hello", bogus=1)
    assert sim.stats()["chat_requests"] == 1


class RecordingPolicy(BackoffPolicy):
    """Records the attempt number of every wait tenacity (or the first retry) asks for."""

    def __init__(self) -> None:
        super().__init__(base=0.001, cap=0.002, rng=lambda: 0.5)
        self.attempts: list[int] = []

    def wait(self, exc: BaseException, attempt: int, tokens_needed: int = 1) -> float:
        self.attempts.append(attempt)
        return super().wait(exc, attempt, tokens_needed)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_retries_count_their_attempts_as_before(sim: Simulator, tmp_path: Path, mode: str) -> None:
    # Given a client whose waits are recorded: tenacity asks for a wait after every failed
    # attempt that is retried, the last one included (it decides to stop after that)
    def ask(c: LLMClient) -> object:
        if mode == "sync":
            return c.generate_response("hello")
        return asyncio.run(c.agenerate_response("hello"))

    with make_client(sim, tmp_path, max_retries=2) as c:
        c.shared.policy = policy = RecordingPolicy()
        sim.configure(script=["500", "500"])
        assert ask(c).attempts == 3  # type: ignore[attr-defined]
        assert policy.attempts == [1, 2]
        policy.attempts.clear()
        sim.configure(script=[], faults={"500": 1.0})
        with pytest.raises(LLMCallError, match="after 3 attempts"):
            ask(c)
        assert policy.attempts == [1, 2, 3]
        policy.attempts.clear()
        sim.configure(faults=None, script=["ok"])
        assert ask(c).attempts == 1  # type: ignore[attr-defined]
        assert policy.attempts == []
    with make_client(sim, tmp_path, max_retries=0) as c:
        c.shared.policy = policy = RecordingPolicy()
        sim.configure(script=["500"])
        with pytest.raises(LLMCallError, match="after 1 attempt"):
            ask(c)
        assert policy.attempts == [1]
