"""Servers as they are, not as OpenAI is: a LiteLLM-style gateway's 429s, a server without
rate-limit headers, a server without the Files and Batch APIs, a bucket that starts full.

Each is the simulator with one switch (``gateway``, ``rate_limit_headers``,
``batch_api``, ``burst_seconds=60``), reached over real HTTP with the real SDK; the runs
are real pytest processes (``runpytest_subprocess``). No sleep stands in for a wait: a
wait the client chose is read from its policy, and a retry that must not come early is
timed from the call that made it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from pytest_llmbench import LLMClient, LLMConfig
from pytest_llmbench.batch_api import BatchApi, NoBatchApi
from pytest_llmbench.budget import FileBudget, MemoryBudget, NullBudget, RateLimitSnapshot
from pytest_llmbench.errors import FATAL_EXIT_STATUS, LLMCallError
from pytest_llmbench.retry import BackoffPolicy, is_fatal, is_retryable, reset_wait, retry_after
from pytest_llmbench.sim import SimConfig, Simulator

from .helpers import FAKE_KEY

#: the gateway's wait in these tests: short, and longer than any backoff the client would
#: choose on its own at the first retry (at most ``backoff_min`` = 0.5 s)
GATEWAY_WAIT_MS = 600

SUITE = """
import time
import pytest

DATA = {data}

@pytest.mark.llmbench(dataset=DATA, temperatures=[0.0], id="id")
def test_q(case, llm):
    started = time.monotonic()
    r = llm.generate_response(case["question"], max_tokens=5)
    waited = time.monotonic() - started
    assert r.ok and r.text
    assert waited >= {min_wait} * r.rate_limited, waited
"""


def write_suite(pytester: pytest.Pytester, n: int, min_wait: float = 0.0) -> None:
    data = [{"id": f"q{i}", "question": f"What is item {i}?"} for i in range(n)]
    pytester.makepyfile(test_suite=SUITE.format(data=json.dumps(data), min_wait=min_wait))


def text_of(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


def sim_run(pytester: pytest.Pytester, config: dict[str, Any], *args: str) -> pytest.RunResult:
    (pytester.path / "sim.json").write_text(json.dumps(config), encoding="utf-8")
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "--llm-sim", "--llm-sim-config=sim.json",
        *args,
    )  # fmt: skip


def rate_limited(sim: Simulator) -> openai.RateLimitError:
    """The 429 the simulator answers now, caught from the real SDK."""
    raw = openai.OpenAI(api_key=FAKE_KEY, base_url=sim.base_url, max_retries=0)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            raw.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
    finally:
        raw.close()
    return info.value


# ---------------------------------------------------------------------- 1. gateway 429s
def test_gateway_headers_count_when_the_plain_ones_are_absent() -> None:
    prefixed = {"llm_provider-retry-after-ms": "600", "llm_provider-retry-after": "1"}
    assert retry_after(prefixed) == 0.6
    assert retry_after({"llm_provider-retry-after": "2"}) == 2.0
    # the plain headers win when both are there
    assert retry_after({**prefixed, "retry-after": "3"}) == 3.0
    assert retry_after({**prefixed, "retry-after-ms": "250"}) == 0.25
    limits = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"}
    reset = {**limits, "llm_provider-x-ratelimit-reset-requests": "60s"}
    assert reset_wait(reset) == pytest.approx(1.0)
    assert reset_wait({**reset, "x-ratelimit-reset-requests": "30s"}) == pytest.approx(0.5)


def test_the_simulators_gateway_rewrites_its_429s_as_litellm_does() -> None:
    config = SimConfig(gateway=True, rpm=6000, script=["429"], fault_retry_after_ms=1234)
    with Simulator(config, port=0) as sim:
        exc = rate_limited(sim)
    assert isinstance(exc.body, dict)
    assert (exc.body["type"], exc.body["code"]) == ("throttling_error", "429")
    headers = exc.response.headers
    # limit and remaining kept; retry-after and the resets only under the prefix
    assert headers["x-ratelimit-limit-requests"] == "6000"
    assert "x-ratelimit-remaining-requests" in headers
    assert "retry-after" not in headers and "retry-after-ms" not in headers
    assert "x-ratelimit-reset-requests" not in headers
    assert headers["llm_provider-retry-after-ms"] == "1234"
    assert "llm_provider-x-ratelimit-reset-requests" in headers
    # a rate limit like any other: retried, never fatal, after the gateway's wait
    assert is_retryable(exc) and not is_fatal(exc)
    assert BackoffPolicy(base=0.01, cap=0.02, rng=lambda: 0.0).wait(exc, 1) == pytest.approx(1.234)


class WaitLog(BackoffPolicy):
    """The client's own policy, recording every wait it chooses."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, exc: BaseException, attempt: int, tokens_needed: int = 1) -> float:
        chosen = super().wait(exc, attempt, tokens_needed)
        self.waits.append(chosen)
        return chosen


def test_a_call_meeting_a_gateway_429_waits_what_the_gateway_says(tmp_path: Path) -> None:
    config = SimConfig(gateway=True, script=["429"], fault_retry_after_ms=GATEWAY_WAIT_MS)
    with Simulator(config, port=0) as sim:
        settings = {"api_key": FAKE_KEY, "base_url": sim.base_url, "run_dir": tmp_path / "run"}
        with LLMClient(LLMConfig.model_validate(settings)) as client:
            client.shared.policy = log = WaitLog()
            started = time.monotonic()
            r = client.generate_response("hello")
            took = time.monotonic() - started
        stats = sim.stats()
    assert r.ok and r.attempts == 2 and r.rate_limited == 1
    # the wait chosen is the gateway's 0.6 s (plus at most 10 % jitter), not a backoff...
    assert log.waits == [pytest.approx(0.63, abs=0.031)]
    # ...and the retry did not come before it
    assert took >= GATEWAY_WAIT_MS / 1000
    assert stats["chat_requests"] == 2 and stats["chat_answered"] == 1


def test_a_case_meeting_a_gateway_429_passes_after_the_gateways_wait(
    pytester: pytest.Pytester,
) -> None:
    # the case times its own call (no prefetch): with the retry, it took >= 0.6 s
    write_suite(pytester, 1, min_wait=GATEWAY_WAIT_MS / 1000)
    config = {"gateway": True, "rpm": 6000, "script": ["429"]}
    config["fault_retry_after_ms"] = GATEWAY_WAIT_MS
    result = sim_run(pytester, config, "--llm-no-prefetch")
    result.assert_outcomes(passed=1)
    text = text_of(result)
    assert "stopped the run" not in text
    # the gateway keeps the limit headers: the budget learned the limit from them
    assert "llmbench pacing: paced by the server's x-ratelimit headers" in text


# -------------------------------------------------------- 2. no rate-limit headers
def test_the_simulator_can_send_no_rate_limit_headers() -> None:
    with Simulator(
        SimConfig(rpm=6000, rate_limit_headers=False, storm={"requests": 1}), port=0
    ) as sim:
        exc = rate_limited(sim)  # the storm's 429: its retry-after stays
        raw = openai.OpenAI(api_key=FAKE_KEY, base_url=sim.base_url, max_retries=0)
        answered = raw.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
        raw.close()
    for headers in (exc.response.headers, answered.headers):
        assert not [name for name in headers if name.startswith("x-ratelimit-")]
    assert exc.response.headers["retry-after-ms"] == "1000"


def test_a_budget_says_whether_it_learned_limits(tmp_path: Path) -> None:
    snapshot = RateLimitSnapshot(limit_requests=500, remaining_requests=499)
    for budget in (MemoryBudget(), FileBudget(tmp_path / "budget.json")):
        budget.observe(RateLimitSnapshot())  # an answer without limit headers
        assert budget.learned_limits() is False
        budget.observe(snapshot)
        assert budget.learned_limits() is True
    # another process's budget on the same file sees what the first one learned
    assert FileBudget(tmp_path / "budget.json").learned_limits() is True
    assert NullBudget().learned_limits() is False


PACING = {
    "no headers": (
        {"rate_limit_headers": False},
        [],
        "llmbench pacing: not paced: the server sends no rate-limit headers; "
        "concurrency alone bounds it: settled at ",
    ),
    "headers": ({}, [], "llmbench pacing: paced by the server's x-ratelimit headers"),
    "configured": (
        {},
        ["--llm-rpm", "3000"],
        "llmbench pacing: paced by --llm-rpm/--llm-tpm (rpm 3000) and the server's "
        "x-ratelimit headers (the lower limit wins)",
    ),
    "configured, no headers": (
        {"rate_limit_headers": False},
        ["--llm-tpm", "900000"],
        "llmbench pacing: paced by --llm-rpm/--llm-tpm (tpm 900000); concurrency settled at ",
    ),
}


@pytest.mark.parametrize("kind", list(PACING))
def test_the_summary_says_how_the_run_was_paced(pytester: pytest.Pytester, kind: str) -> None:
    sim_config, args, line = PACING[kind]
    write_suite(pytester, 6)
    result = sim_run(pytester, {"rpm": 6000, **sim_config}, "-n", "2", *args)
    result.assert_outcomes(passed=6)
    text = text_of(result)
    assert line in text, text
    assert text.count("llmbench pacing:") == 1


# ---------------------------------------------------------------- 3. no Batch API
@pytest.fixture
def no_batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    with Simulator(SimConfig(batch_api=False), port=0) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
        yield sim


def test_batch_api_against_a_server_without_one_stops_at_once(
    pytester: pytest.Pytester, no_batches: Simulator
) -> None:
    write_suite(pytester, 5)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--llm-base-url", no_batches.base_url, "--batch-api",
        "--llm-batch-poll", "0.05",
    )  # fmt: skip
    assert result.ret == FATAL_EXIT_STATUS, text_of(result)
    text = text_of(result)
    line = (
        f"llmbench: --batch-api: {no_batches.base_url} has no Batch API "
        "(POST /files answered 404); run without --batch-api"
    )
    assert line in text, text
    assert "Traceback" not in text and "INTERNALERROR" not in text
    stats = no_batches.stats()
    assert stats["chat_requests"] == 0  # nothing went to /chat/completions
    assert stats["by_status"] == {"404": 1}  # one upload tried, nothing else


def test_a_404_for_an_object_is_not_a_missing_batch_api(sim: Simulator) -> None:
    client = openai.OpenAI(api_key=FAKE_KEY, base_url=sim.base_url, max_retries=0)
    api = BatchApi(client, "gpt-4o-mini")
    with pytest.raises(LLMCallError) as info:  # the API's "No such File object"
        api.create("file-nonexistent", "/v1/chat/completions", "24h", 1)
    assert not isinstance(info.value, NoBatchApi)
    sim.configure(batch_api=False)
    with pytest.raises(NoBatchApi, match=r"\(POST /batches answered 404\)"):
        api.create("file-nonexistent", "/v1/chat/completions", "24h", 1)
    client.close()


# ------------------------------------------------------- 4. a bucket that starts full
#: the simulator's limit in these runs: 10 per second, a whole minute's bucket from the start
FULL_BUCKET_RPM = 600
#: the most a steady budget lets through in any second at that rate: the request that
#: goes alone, the 1 s burst cap (10) and 10 refilled
STEADY_PEAK = 1 + 10 + 10


def full_bucket_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[str, dict[str, Any]]:
    """40 cases, two workers, against a simulator whose bucket holds a minute's allowance
    (enforced and advertised alike, as llmock's); returns the output and its statistics."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    write_suite(pytester, 40)
    with Simulator(SimConfig(rpm=FULL_BUCKET_RPM, burst_seconds=60), port=0) as sim:
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-p", "no:randomly", "-n", "2",
            "--llm-base-url", sim.base_url, *args,
        )  # fmt: skip
        stats = sim.stats()
    result.assert_outcomes(passed=40)
    print(f"busiest second: {stats['peak_answered_1s']}, 429s: {stats['rate_limit_429']}")
    return text_of(result), stats


def test_the_opening_burst_spends_the_full_bucket_without_a_refusal(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a server whose first answer advertises 599 requests left this minute
    text, stats = full_bucket_run(pytester, monkeypatch, "--llm-opening-burst")
    # Then the run spends them: far more answered in one second than the steady budget
    # lets through, and the server refused nothing
    assert stats["peak_answered_1s"] >= 30, stats["answered_per_second"]
    assert stats["rate_limit_429"] == 0 and stats["chat_answered"] == 40
    assert (
        "llmbench pacing: paced by the server's x-ratelimit headers; the opening burst "
        "allowed up to 599 requests at once, as the server advertised (--llm-opening-burst)"
    ) in text, text


def test_without_the_option_a_full_bucket_is_paced_at_the_steady_rate(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, stats = full_bucket_run(pytester, monkeypatch)
    assert stats["peak_answered_1s"] <= STEADY_PEAK + 2, stats["answered_per_second"]
    assert stats["rate_limit_429"] == 0
    pacing = next(line for line in text.splitlines() if line.startswith("llmbench pacing:"))
    assert "paced by the server's x-ratelimit headers" in pacing and "opening" not in pacing
