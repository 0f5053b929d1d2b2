"""Reasoning models (gpt-5, o-series): the client, the plugin, usage and cost.

Behaviour runs against the simulator over HTTP (the client directly, or pytester runs in
subprocesses with ``-n 2``); its reasoning tokens per effort are fixed (none 0, minimal 16,
low 64, medium 192, high 512), so the expected figures are exact.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pytest_llmbench import LLMClient, LLMConfig
from pytest_llmbench.config import build_config, resolve_settings
from pytest_llmbench.errors import ConfigError
from pytest_llmbench.pricing import PriceTable
from pytest_llmbench.reasoning import is_reasoning_model, temperature_problem
from pytest_llmbench.report import validate_report
from pytest_llmbench.response import Usage
from pytest_llmbench.results import (
    TABLE_WIDTH,
    CaseResult,
    format_analysis,
    format_summary,
    summarize,
    totals,
)
from pytest_llmbench.sim import SimConfig, Simulator

from .helpers import FAKE_KEY
from .test_plugin import read_report, write_dataset

HIGH, LOW, MEDIUM = 512, 64, 192


# ---------------------------------------------------------------------- the client
def make_client(sim: Simulator, tmp_path: Path, **changes: Any) -> LLMClient:
    settings: dict[str, Any] = {
        "api_key": FAKE_KEY,
        "base_url": sim.base_url,
        "run_dir": tmp_path / "run",
        "timeout": 5.0,
        "budget_url": "none",
    }
    return LLMClient(LLMConfig.model_validate(settings | changes))


def test_max_tokens_is_sent_as_max_completion_tokens_to_reasoning_models(
    sim: Simulator, tmp_path: Path
) -> None:
    with make_client(sim, tmp_path) as client:
        r = client.generate_response("Hi", model="gpt-5-mini", max_tokens=1000)
        plain = client.generate_response("Hi", model="gpt-4o-mini", max_tokens=20)
    # the API (and the simulator) would refuse max_tokens with 400 unsupported_parameter
    assert r.ok and r.text and r.params == {"model": "gpt-5-mini", "max_completion_tokens": 1000}
    assert r.usage.reasoning_tokens == MEDIUM  # the default effort
    assert r.usage.completion_tokens > MEDIUM
    assert plain.params == {"model": "gpt-4o-mini", "max_tokens": 20}
    assert plain.usage.reasoning_tokens == 0
    assert sim.stats()["chat_answered"] == 2


def test_reasoning_effort_per_call_and_as_the_configs_default(
    sim: Simulator, tmp_path: Path
) -> None:
    with make_client(sim, tmp_path, model="o4-mini", reasoning_effort="high") as client:
        default = client.generate_response("one", max_completion_tokens=2000)
        low = client.generate_response("two", max_completion_tokens=2000, reasoning_effort="low")
        # the configured 256 tokens are spent on 512 of reasoning: an empty answer
        cut = client.generate_response("three")
    assert default.params["reasoning_effort"] == "high"
    assert default.usage.reasoning_tokens == HIGH
    assert low.usage.reasoning_tokens == LOW
    assert (cut.text, cut.finish_reason) == ("", "length")
    assert cut.usage.completion_tokens == cut.usage.reasoning_tokens == 256
    assert client.usage()["o4-mini"].reasoning_tokens == HIGH + LOW + 256


def test_the_effort_option_is_checked() -> None:
    settings = resolve_settings({"llm_reasoning_effort": " HIGH "}, {}, {})
    assert build_config(settings, env={}).reasoning_effort == "high"
    assert resolve_settings({}, {"LLMBENCH_REASONING_EFFORT": "minimal"}, {}) == {
        "llm_reasoning_effort": "minimal"
    }
    with pytest.raises(ConfigError, match=r"--llm-reasoning-effort: invalid value 'hgih'"):
        resolve_settings({"llm_reasoning_effort": "hgih"}, {}, {})
    with pytest.raises(ValidationError, match="not a reasoning effort"):
        LLMConfig(reasoning_effort="extreme")


def test_usage_reads_reasoning_tokens_and_sums_them() -> None:
    body = {
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 300,
            "total_tokens": 310,
            "completion_tokens_details": {"reasoning_tokens": 256},
        }
    }
    usage = Usage.from_body(body)
    assert usage == Usage(10, 300, 310, 256)
    assert Usage.from_body({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}) == Usage(
        1, 2, 3
    )
    details_null = {"usage": {"completion_tokens": 2, "completion_tokens_details": None}}
    assert Usage.from_body(details_null).reasoning_tokens == 0
    assert (usage + usage).reasoning_tokens == 512


def test_temperature_problem_names_the_model_the_suite_and_the_fix() -> None:
    assert temperature_problem("gpt-4o", "t.py::test_x", [0.0], from_option=False) is None
    assert temperature_problem("gpt-5", "t.py::test_x", [None, 1.0], from_option=False) is None
    assert temperature_problem("gpt-5", "t.py::test_x", [0.0, 0.7], from_option=False) == (
        "t.py::test_x: model gpt-5 accepts only the default temperature (1); "
        "drop temperatures=[0, 0.7] or use --llm-temperatures 1"
    )
    line = temperature_problem("o3", "t.py::test_x", [0.5], from_option=True)
    assert line is not None and line.endswith("drop --llm-temperatures 0.5 or set it to 1")
    assert is_reasoning_model("gpt-5-nano-2025-08-07") and not is_reasoning_model(None)


# ---------------------------------------------------------------------- cost
def case(nodeid: str, prompt: int, completion: int, reasoning: int, **kw: Any) -> CaseResult:
    result = CaseResult(nodeid, "test_qa", "t.py", nodeid, None, None, "passed")
    result.calls, result.model = 1, kw.get("model", "gpt-5-mini")
    result.prompt_tokens, result.completion_tokens = prompt, completion
    result.total_tokens, result.reasoning_tokens = prompt + completion, reasoning
    result.batch = kw.get("batch", False)
    return result


def test_reasoning_tokens_are_priced_once_as_part_of_completion_tokens() -> None:
    prices = PriceTable()
    cases = [case("a", 1000, 3000, 2500), case("b", 200, 600, 512, batch=True)]
    (row,) = summarize(cases, prices)
    # gpt-5-mini: $0.25 in, $2.00 out per 1M; reasoning is inside completion_tokens
    once = (1000 * 0.25 + 3000 * 2.00) / 1e6 + (200 * 0.25 + 600 * 2.00) / 1e6 * 0.5
    assert row.cost_usd == pytest.approx(once, rel=1e-12)
    assert (row.completion_tokens, row.reasoning_tokens) == (3600, 3012)
    assert totals([row]).reasoning_tokens == 3012
    for model in ("gpt-5", "gpt-5-nano", "o1", "o3", "o3-mini", "o4-mini"):
        assert prices.price(f"{model}-2025-01-01") is not None, model


def test_the_terminal_shows_reasoning_only_when_there_is_some() -> None:
    rows = summarize([case("a", 100, 700, 512)], PriceTable())
    lines = format_analysis(rows, totals(rows))
    assert lines == [
        "llmbench reasoning: 512 of 700 output tokens (73%) were hidden reasoning, counted in "
        "tok out and priced as output once"
    ]
    assert all(len(line) <= TABLE_WIDTH for line in format_summary(rows, totals(rows)))
    plain = summarize([case("a", 100, 700, 0, model="gpt-4o")], PriceTable())
    assert format_analysis(plain, totals(plain)) == []


# ---------------------------------------------------------------------- the plugin
SUITE = """
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", id="qid"{marker})
def test_qa(case, llm):
    r = llm.generate_response(case["question"])
    assert r.text
"""


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    """A simulator outside the runs under test, so that it counts what they sent."""
    with Simulator(SimConfig(seed=5), port=0) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
        monkeypatch.setenv("LLMBENCH_BASE_URL", sim.base_url)
        yield sim


def suite(pytester: pytest.Pytester, n: int, marker: str = "") -> None:
    write_dataset(pytester.path / "data.jsonl", n)
    pytester.makepyfile(test_suite=SUITE.format(marker=marker))
    pytester.makeini("[pytest]\n")


def output(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


def test_temperatures_on_a_reasoning_model_fail_at_collection_before_any_request(
    pytester: pytest.Pytester, server: Simulator
) -> None:
    suite(pytester, 20, ", temperatures=[0.0, 0.7]")
    result = pytester.runpytest_subprocess("-n", "2", "--llm-model", "gpt-5")
    # a collection error on each xdist worker (exit status 1 there; 2 without xdist)
    assert result.ret != pytest.ExitCode.OK and "passed" not in result.stdout.str()
    line = (
        "test_suite.py::test_qa: model gpt-5 accepts only the default temperature (1); "
        "drop temperatures=[0, 0.7] or use --llm-temperatures 1"
    )
    assert line in output(result) and "Traceback" not in output(result)
    assert server.stats()["chat_requests"] == 0
    # the fix the line names: the same suite at temperature 1 runs
    fixed = pytester.runpytest_subprocess(
        "-n", "2", "--llm-model", "gpt-5", "--llm-temperatures", "1"
    )
    fixed.assert_outcomes(passed=20)
    assert server.stats()["chat_answered"] == 20


def test_an_unknown_effort_in_the_marker_fails_at_collection(
    pytester: pytest.Pytester, server: Simulator
) -> None:
    suite(pytester, 3, ', reasoning_effort="hgih"')
    result = pytester.runpytest_subprocess("--llm-model", "gpt-5-mini")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "'hgih' is not a reasoning effort; use none, minimal, low" in output(result)
    assert server.stats()["chat_requests"] == 0


def test_reasoning_tokens_reach_the_report_junitxml_and_the_cost(
    pytester: pytest.Pytester, server: Simulator
) -> None:
    n = 6
    suite(pytester, n, ', reasoning_effort="high"')
    args = ["-n", "2", "--llm-model", "gpt-5-mini", "--llm-max-tokens", "2000"]
    result = pytester.runpytest_subprocess(*args, "--llm-report", "r.json", "--junitxml", "j.xml")
    result.assert_outcomes(passed=n)
    report = read_report(pytester.path / "r.json")
    assert validate_report(report) == []
    total = report["totals"]
    assert total["reasoning_tokens"] == n * HIGH == report["suites"][0]["reasoning_tokens"]
    assert all(c["reasoning_tokens"] == HIGH < c["completion_tokens"] for c in report["cases"])
    # the report's completion tokens are the API's, reasoning included, priced once
    assert total["completion_tokens"] == server.stats()["completion_tokens"]
    expected = PriceTable().cost("gpt-5-mini", total["prompt_tokens"], total["completion_tokens"])
    assert total["cost_usd"] == pytest.approx(expected, rel=1e-9)
    assert "llmbench reasoning: 3,072 of" in result.stdout.str()
    properties = ET.parse(pytester.path / "j.xml").getroot().iter("property")
    assert [p.get("value") for p in properties if p.get("name") == "llm.reasoning_tokens"] == [
        str(HIGH)
    ] * n

    # the option overrides the marker, as --llm-temperatures does
    low = pytester.runpytest_subprocess(
        *args, "--llm-reasoning-effort", "low", "--llm-report", "low.json"
    )
    low.assert_outcomes(passed=n)
    assert read_report(pytester.path / "low.json")["totals"]["reasoning_tokens"] == n * LOW
