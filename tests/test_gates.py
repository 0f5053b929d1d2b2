from __future__ import annotations

from typing import Any

import pytest

from pytest_llmbench.errors import ConfigError, LLMBenchError
from pytest_llmbench.gates import METRICS, Gate, evaluate, parse_gate
from pytest_llmbench.pricing import PriceTable
from pytest_llmbench.results import CaseResult, SuiteSummary, summarize, wilson

MODULE = "example_suites/test_truthfulqa.py"


def cases_for(
    suite: str,
    t: float | None,
    passed: int,
    failed: int = 0,
    errors: int = 0,
    skipped: int = 0,
    *,
    module: str = MODULE,
    **kw: Any,
) -> list[CaseResult]:
    out = []
    outcomes = ["passed"] * passed + ["failed"] * failed + ["error"] * errors
    outcomes += ["skipped"] * skipped
    for i, outcome in enumerate(outcomes):
        out.append(
            CaseResult(
                nodeid=f"{module}::{suite}[q{i}-t{t}]",
                suite=suite,
                module=module,
                item_id=f"q{i}",
                temperature=t,
                sample=None,
                outcome=outcome,
                **kw,
            )
        )
    return out


@pytest.fixture
def summaries() -> list[SuiteSummary]:
    cases = [
        *cases_for("test_truthfulqa", 0.0, 250, 50),  # 0.833
        *cases_for("test_truthfulqa", 0.5, 200, 90, 10),  # 0.667
        *cases_for("test_truthfulqa", 1.0, 137, 150, 13),  # 0.457
        *cases_for(
            "test_arith",
            None,
            9,
            1,
            module="example_suites/test_arith.py",
            calls=1,
            latency_s=0.5,
            prompt_tokens=1000,
            completion_tokens=10,
            total_tokens=1010,
            model="gpt-4o-mini",
            rate_limited=1,
        ),
        *cases_for("test_skipped", 0.0, 0, 0, 0, 4),
        *cases_for(
            "test_local",
            0.0,
            2,
            module="x/test_local.py",
            calls=1,
            prompt_tokens=5,
            model="local-llm",
        ),
    ]
    return summarize(cases, PriceTable())


# ---------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "suite", "temperature", "metric", "op", "threshold"),
    [
        ("test_truthfulqa:accuracy>=0.70", "test_truthfulqa", None, "accuracy", ">=", 0.70),
        ("test_truthfulqa@0.5:accuracy>0.6", "test_truthfulqa", 0.5, "accuracy", ">", 0.6),
        ("*:errors==0", "*", None, "errors", "==", 0.0),
        ("test_x:cost<=1.5", "test_x", None, "cost", "<=", 1.5),
        ("test_x:accuracy>=70%", "test_x", None, "accuracy", ">=", 0.70),
        ("test_x:ci_low >= 62.5 %", "test_x", None, "ci_low", ">=", 0.625),
        (
            "  a/t.py::test_x @ 1 : p95_latency < 2.5 ",
            "a/t.py::test_x",
            1.0,
            "p95_latency",
            "<",
            2.5,
        ),
        ("test_*:rate_limited!=3", "test_*", None, "rate_limited", "!=", 3.0),
        ("t:tokens<1e6", "t", None, "tokens", "<", 1e6),
    ],
)
def test_parse_gate(
    text: str, suite: str, temperature: float | None, metric: str, op: str, threshold: float
) -> None:
    gate = parse_gate(text)
    assert (gate.suite, gate.temperature, gate.metric, gate.op) == (suite, temperature, metric, op)
    assert gate.threshold == pytest.approx(threshold)
    assert gate.text == text.strip()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("test_x:accuracy", r"no comparison; expected SUITE\[@T\]:METRIC OP VALUE"),
        ("test_x:accuracy=>0.7", r"unknown operator '=>'; allowed: >=, >, <=, <, ==, !="),
        ("test_x:accuracy=0.7", r"unknown operator '='"),
        ("test_x accuracy>=0.7", r"missing ':METRIC'"),
        ("test_x:acc>=0.7", r"unknown metric 'acc'; metrics: accuracy, ci_low, delta"),
        ("test_x:>=0.7", r"missing metric; metrics: accuracy"),
        (":accuracy>=0.7", r"empty suite; name a test function, path::name or a glob"),
        ("@0.5:accuracy>=0.7", r"empty suite"),
        ("test_x:accuracy>=abc", r"value 'abc' is not a number; expected 0.7 or 70%"),
        ("test_x:accuracy>=", r"value '' is not a number"),
        ("test_x:accuracy>=nan", r"value 'nan' is not a number"),
        ("test_x:cost<=inf", r"value 'inf' is not a number; expected a number such as"),
        ("test_x:accuracy>=70", r"accuracy is a fraction in \[0, 1\]; write e.g. 0.7 or 70%"),
        ("test_x:accuracy>=120%", r"accuracy is a fraction in \[0, 1\]"),
        ("test_x:errors<=5%", r"a percentage is only allowed for fractions and differences"),
        ("test_x:delta>=-120%", r"delta is a difference of fractions in \[-1, 1\]"),
        ("test_x:errors<=-1", r"errors cannot be negative"),
        ("test_x@hot:accuracy>=0.7", r"bad temperature 'hot' after '@'"),
    ],
)
def test_parse_gate_errors_name_the_gate(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc_info:
        parse_gate(text)
    msg = str(exc_info.value)
    assert msg.startswith(f"gate {text.strip()!r}: ")
    assert "\n" not in msg
    assert isinstance(exc_info.value, LLMBenchError)


@pytest.mark.parametrize(
    ("op", "value", "holds"),
    [
        (">=", 0.7, True),
        (">=", 0.7 - 1e-6, False),
        (">", 0.7, False),
        ("<=", 0.7, True),
        ("<", 0.7, False),
        ("==", 0.1 + 0.2 + 0.4, True),  # 0.7000000000000001 in floating point
        ("!=", 0.7, False),
        ("!=", 0.71, True),
    ],
)
def test_gate_comparisons(op: str, value: float, holds: bool) -> None:
    assert parse_gate(f"s:accuracy{op}0.7").holds(value) is holds


# ---------------------------------------------------------------------- evaluation
def test_pooled_accuracy_over_temperatures(summaries: list[SuiteSummary]) -> None:
    (r,) = evaluate([parse_gate("test_truthfulqa:accuracy>=0.70")], summaries)
    # sum passed / sum graded over 900 cases, not the mean of the three accuracies
    assert r.value == pytest.approx(587 / 900)
    assert r.ci == pytest.approx(wilson(587, 900))
    assert not r.passed
    assert r.cases == 900
    assert r.target == "test_truthfulqa"
    assert r.message == (
        "FAIL test_truthfulqa:accuracy>=0.70 — measured 0.652 "
        "(95% CI 0.62\u20130.68) over 900 cases"
    )


def test_one_temperature(summaries: list[SuiteSummary]) -> None:
    (r,) = evaluate([parse_gate("test_truthfulqa@0.5:accuracy>0.6")], summaries)
    assert r.passed and r.value == pytest.approx(200 / 300) and r.cases == 300
    assert r.message.startswith("PASS test_truthfulqa@0.5:accuracy>0.6 — measured 0.667")


def test_ci_low_is_stricter_than_accuracy(summaries: list[SuiteSummary]) -> None:
    acc, low = evaluate(
        [parse_gate("test_arith:accuracy>=0.8"), parse_gate("test_arith:ci_low>=0.8")],
        summaries,
    )
    assert acc.passed and acc.value == pytest.approx(0.9)
    assert not low.passed and low.value == pytest.approx(wilson(9, 10)[0])


@pytest.mark.parametrize(
    ("text", "value", "passed"),
    [
        ("test_arith:passed==9", 9, True),
        ("test_arith:failed<1", 1, False),
        ("test_truthfulqa:errors==23", 23, True),
        ("test_truthfulqa:cases>=900", 900, True),
        ("test_arith:tokens<=10100", 10100, True),
        ("test_arith:rate_limited==0", 10, False),
        ("test_arith:p95_latency<=0.5", 0.5, True),
        ("test_arith:cost<=0.01", (10_000 * 0.15 + 100 * 0.6) / 1e6, True),
        ("example_suites/test_arith.py::test_arith:passed==9", 9, True),
        ("test_arith.py::test_arith:passed==9", 9, True),  # a trailing part of the path
        ("*/test_arith.py::test_*:passed==9", 9, True),
    ],
)
def test_metrics(summaries: list[SuiteSummary], text: str, value: float, passed: bool) -> None:
    (r,) = evaluate([parse_gate(text)], summaries)
    assert r.value == pytest.approx(value)
    assert r.passed is passed, r.message


def test_unknown_suite_fails(summaries: list[SuiteSummary]) -> None:
    r1, r2 = evaluate(
        [parse_gate("test_truthfulq:accuracy>=0.1"), parse_gate("test_truthfulqa@0.7:errors==0")],
        summaries,
    )
    assert not r1.passed and r1.value is None and r1.target is None
    assert r1.message == "FAIL test_truthfulq:accuracy>=0.1 — no results for suite test_truthfulq"
    assert not r2.passed
    assert r2.message.endswith(
        "no results for suite test_truthfulqa at temperature 0.7 (temperatures run: 0, 0.5, 1)"
    )
    assert evaluate([parse_gate("x:errors==0")], [])[0].passed is False


def test_glob_checks_each_suite(summaries: list[SuiteSummary]) -> None:
    results = evaluate([parse_gate("*:errors==0")], summaries)
    assert [r.target for r in results] == [
        "test_arith",
        "test_skipped",
        "test_truthfulqa",
        "test_local",
    ]
    assert [r.passed for r in results] == [True, True, False, True]
    assert results[2].message.startswith("FAIL *:errors==0 (test_truthfulqa) — measured 23 over")


def test_unmeasurable_values_fail(summaries: list[SuiteSummary]) -> None:
    acc, cost, lat = evaluate(
        [
            parse_gate("test_skipped:accuracy>=0"),
            parse_gate("test_local:cost<=100"),
            parse_gate("test_truthfulqa:p95_latency<=100"),
        ],
        summaries,
    )
    assert not acc.passed and "no graded cases (4 case(s), 4 skipped)" in acc.message
    assert not cost.passed and "no price for model(s) local-llm" in cost.message
    assert not lat.passed and "no latency measured" in lat.message


def test_gate_result_to_dict(summaries: list[SuiteSummary]) -> None:
    (r,) = evaluate([parse_gate("test_arith:accuracy>=90%")], summaries)
    d = r.to_dict()
    assert d["gate"] == "test_arith:accuracy>=90%"
    assert d["threshold"] == pytest.approx(0.9) and d["passed"] is True
    assert d["ci_low"] == pytest.approx(wilson(9, 10)[0]) and d["cases"] == 10


def test_metric_table_is_documented() -> None:
    assert set(METRICS) == {
        "accuracy",
        "ci_low",
        "passed",
        "failed",
        "errors",
        "cases",
        "cost",
        "tokens",
        "p95_latency",
        "rate_limited",
        "delta",
        "delta_ci_low",
        "delta_ci_high",
        "maj_accuracy",
        "agreement",
    }
    assert isinstance(parse_gate("a:cases>1"), Gate)


def test_delta_gates_parse_signed_values_and_percentages() -> None:
    assert parse_gate("test_x:delta>=-0.02").threshold == -0.02
    assert parse_gate("test_x:delta_ci_low>=-2%").threshold == pytest.approx(-0.02)
    assert parse_gate("test_x@0.5:delta_ci_high<0").temperature == 0.5


def test_a_delta_gate_on_a_row_without_baseline_fails_saying_why() -> None:
    rows = summarize(cases_for("test_truthfulqa", 0.0, 8, 2), PriceTable())
    (result,) = evaluate([parse_gate("test_truthfulqa:delta>=-0.02")], rows)
    assert not result.passed
    assert "the baseline has no results for this suite and temperature" in result.message
