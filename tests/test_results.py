from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.errors import ConfigError
from pytest_llmbench.pricing import BATCH_DISCOUNT, DEFAULT_PRICES, Price, PriceTable
from pytest_llmbench.results import (
    CaseResult,
    SuiteSummary,
    format_cost,
    format_summary,
    percentile,
    summarize,
    totals,
    wilson,
)


def case(
    outcome: str = "passed",
    *,
    suite: str = "test_qa",
    module: str = "suites/test_qa.py",
    item: str = "q1",
    t: float | None = 0.0,
    **kw: Any,
) -> CaseResult:
    tpart = "" if t is None else f"-t{t}"
    return CaseResult(
        nodeid=f"{module}::{suite}[{item}{tpart}]",
        suite=suite,
        module=module,
        item_id=item,
        temperature=t,
        sample=None,
        outcome=outcome,
        **kw,
    )


# ---------------------------------------------------------------------- wilson
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (81, 100, 0.7222, 0.8749),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
        (1, 1, 0.2065, 1.0),
        (585, 900, 0.6183, 0.6805),
    ],
)
def test_wilson_known_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_empty_and_invalid() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k=3, n=2"):
        wilson(3, 2)
    # a wider z gives a wider interval
    assert wilson(50, 100, z=2.576)[0] < wilson(50, 100)[0]


# ---------------------------------------------------------------------- percentile
@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, 0.0),
        ([3.0], 95, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 50, 2.5),  # order of input does not matter
        ([1.0, 2.0, 3.0, 4.0, 5.0], 95, 4.8),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 100, 5.0),
        (list(range(1, 101)), 95, 95.05),
        ([10.0, 20.0], 25, 12.5),
    ],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_rejects_fractions_of_one_outside_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


# ---------------------------------------------------------------------- CaseResult
def test_case_result_round_trip() -> None:
    c = case(
        "error",
        error="API error: 503",
        calls=2,
        prompt_tokens=10,
        completion_tokens=3,
        total_tokens=13,
        latency_s=0.5,
        requests=3,
        retries=1,
        rate_limited=1,
        model="gpt-4o-mini",
        batch=True,
    )
    assert CaseResult.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_case_result_from_dict_tolerates_missing_and_unknown_keys() -> None:
    c = CaseResult.from_dict(
        {"nodeid": "a/test_x.py::TestK::test_y[q1-t0.5]", "outcome": "passed", "new": 1}
    )
    assert (c.module, c.suite, c.temperature, c.calls, c.batch) == (
        "a/test_x.py",
        "test_y",
        None,
        0,
        False,
    )
    with pytest.raises(ValueError, match="outcome"):
        CaseResult.from_dict({"nodeid": "x::y"})


# ---------------------------------------------------------------------- summarize
def test_summarize_mixed_outcomes_and_temperatures() -> None:
    prices = PriceTable()
    cases = [
        case(
            "passed",
            t=0.5,
            item="a",
            calls=1,
            latency_s=1.0,
            prompt_tokens=100,
            completion_tokens=10,
            total_tokens=110,
            model="gpt-4o-mini",
            requests=1,
        ),
        case("failed", t=0.5, item="b", calls=1, latency_s=3.0, model="gpt-4o-mini"),
        case("error", t=0.5, item="c", calls=0),  # API error before any answer
        case("skipped", t=0.5, item="d"),
        case("passed", t=0.0, item="a", calls=1, latency_s=2.0, cached=1),
        case("passed", t=None, suite="test_free", item="z", calls=1, latency_s=0.2),
        case("passed", t=0.0, module="a/test_first.py", suite="test_zzz"),
    ]
    rows = summarize(cases, prices)
    keys = [(r.module, r.suite, r.temperature) for r in rows]
    assert keys == [
        ("a/test_first.py", "test_zzz", 0.0),
        ("suites/test_qa.py", "test_free", None),
        ("suites/test_qa.py", "test_qa", 0.0),
        ("suites/test_qa.py", "test_qa", 0.5),
    ]
    hot = rows[3]
    assert (hot.cases, hot.passed, hot.failed, hot.errors, hot.skipped) == (4, 1, 1, 1, 1)
    assert hot.graded == 3
    assert hot.accuracy == pytest.approx(1 / 3)  # the API error counts as not passed
    assert (hot.ci_low, hot.ci_high) == pytest.approx(wilson(1, 3))
    # latency only over cases that made a call (the error made none)
    assert hot.latency_p50 == pytest.approx(2.0)
    assert hot.latency_p95 == pytest.approx(2.9)
    assert hot.cost_usd == pytest.approx((100 * 0.15 + 10 * 0.60) / 1e6)
    assert (hot.prompt_tokens, hot.total_tokens, hot.requests) == (100, 110, 1)
    assert rows[2].cached == 1
    assert rows[1].temperature is None


def test_summary_of_only_skipped_cases_has_no_accuracy() -> None:
    (row,) = summarize([case("skipped"), case("skipped", item="q2")], PriceTable())
    assert row.accuracy is None and row.ci_low is None and row.ci_high is None
    assert row.latency_p50 is None and row.latency_p95 is None
    assert row.cost_usd == 0.0


def test_summary_cost_unknown_model_and_batch() -> None:
    cases = [
        case(item="a", prompt_tokens=1_000_000, model="gpt-4o", batch=True),
        case(item="b", prompt_tokens=0, model="my-local-llm"),  # no tokens: costs nothing
    ]
    (row,) = summarize(cases, PriceTable())
    assert row.cost_usd == pytest.approx(2.50 * BATCH_DISCOUNT)
    cases.append(case(item="c", completion_tokens=5, model="my-local-llm"))
    (row,) = summarize(cases, PriceTable())
    assert row.cost_usd is None
    assert row.unpriced_models == ("my-local-llm",)


def test_totals_pool_counts_and_recompute() -> None:
    cases = [case("passed", t=0.0, item=str(i), calls=1, latency_s=float(i)) for i in range(9)]
    cases += [
        case("failed", t=1.0, item="x", calls=1, latency_s=100.0, model="nope", prompt_tokens=1)
    ]
    rows = summarize(cases, PriceTable())
    total = totals(rows)
    assert (total.suite, total.module, total.temperature) == ("TOTAL", "", None)
    assert (total.cases, total.passed, total.failed) == (10, 9, 1)
    assert total.accuracy == pytest.approx(0.9)  # not the mean of 1.0 and 0.0
    assert total.latency_p50 == pytest.approx(percentile([*range(9), 100.0], 50))
    assert total.cost_usd is None and total.unpriced_models == ("nope",)
    empty = totals([])
    assert empty.cases == 0 and empty.accuracy is None


# ---------------------------------------------------------------------- format
def test_format_summary_table() -> None:
    cases = [
        case(
            "passed",
            t=0.5,
            item="a",
            calls=1,
            latency_s=1.234,
            prompt_tokens=123_456,
            completion_tokens=789,
            total_tokens=124_245,
            model="gpt-4o-mini",
            requests=2,
            retries=1,
            rate_limited=1,
        ),
        case("failed", t=0.5, item="b", calls=1, latency_s=0.5, model="gpt-4o-mini"),
        case("passed", t=None, suite="test_" + "very_long_suite_name_" * 4, item="c"),
        case(
            "passed",
            t=0.0,
            suite="test_qa",
            module="other/test_qa.py",
            model="x",
            completion_tokens=1,
        ),
    ]
    rows = summarize(cases, PriceTable())
    lines = format_summary(rows, totals(rows))
    assert lines[0].split()[:4] == ["suite", "T", "cases", "passed"]
    assert all(len(line) <= 120 for line in lines), "\n".join(lines)
    # every data line has the same width up to the right-aligned cost column
    text = "\n".join(lines)
    assert "0.500" in text and "123.5k" in text and "$0.0" in text
    assert "…" in text  # the long suite name was shortened
    assert "test_qa.py::test_qa" in text  # the same suite name in two files is told apart
    long_row = next(line for line in lines if "…" in line)
    assert long_row.split()[1] == "-"  # no temperature
    assert lines[-1].startswith("TOTAL") and set(lines[-2]) == {"-"}
    assert lines[-1].rstrip().endswith("?")  # one model has no price


def test_format_summary_single_row_has_no_total_and_empty() -> None:
    rows = summarize([case()], PriceTable())
    assert len(format_summary(rows, totals(rows))) == 2
    assert format_summary([], SuiteSummary("TOTAL", "", None)) == ["no llmbench results"]


@pytest.mark.parametrize(
    ("usd", "text"),
    [(None, "?"), (0.0, "$0.0000"), (0.01234, "$0.0123"), (12.345, "$12.35"), (12345, "$12,345")],
)
def test_format_cost(usd: float | None, text: str) -> None:
    assert format_cost(usd) == text


# ---------------------------------------------------------------------- pricing
@pytest.mark.parametrize(
    ("model", "price"),
    [
        ("gpt-4o-mini", (0.15, 0.60)),
        ("gpt-4o-mini-2024-07-18", (0.15, 0.60)),  # longest prefix, not gpt-4o
        ("gpt-4o-2024-08-06", (2.50, 10.00)),
        ("gpt-4.1-nano-2025-04-14", (0.10, 0.40)),
        ("gpt-4.1-2025-04-14", (2.00, 8.00)),
        ("GPT-5-Mini", (0.25, 2.00)),
        ("o4-mini-2025-04-16", (1.10, 4.40)),
        ("gpt-3.5-turbo-0125", (0.50, 1.50)),
        ("gpt-4o-minix", (2.50, 10.00)),  # the longest prefix ending at a "-" is gpt-4o
        ("gpt-4ox", None),  # a prefix must end at a "-"
        ("llama-3", None),
        ("", None),
        (None, None),
    ],
)
def test_price_resolution(model: str | None, price: tuple[float, float] | None) -> None:
    assert PriceTable().price(model) == price


def test_cost_unknown_model_and_batch_discount() -> None:
    table = PriceTable()
    assert table.cost("gpt-4o", 1_000_000, 1_000_000) == pytest.approx(12.50)
    assert table.cost("gpt-4o", 1_000_000, 1_000_000, batch=True) == pytest.approx(6.25)
    assert table.cost("unknown-model", 10, 10) is None
    assert table.cost(None, 10, 10) is None
    assert set(DEFAULT_PRICES) <= set(table.prices)


def test_price_file_overrides_and_extends(tmp_path: Path) -> None:
    p = tmp_path / "prices.json"
    p.write_text(
        json.dumps({"gpt-4o": {"input": 1, "output": 2}, "My-Model": {"input": 0.5, "output": 0}})
    )
    table = PriceTable.load(p)
    assert table.price("gpt-4o-2024-08-06") == Price(1.0, 2.0)
    assert table.cost("my-model-v2", 2_000_000, 5) == pytest.approx(1.0)
    assert table.price("gpt-4o-mini") == DEFAULT_PRICES["gpt-4o-mini"]  # others kept
    assert "PriceTable(" in repr(table)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", r"prices\.json:1: invalid JSON"),
        ("[1, 2]", r"prices\.json: expected a JSON object .* got an array"),
        ('{"m": 3}', r"model 'm': expected \{.*got a number"),
        ('{"m": {"input": 1}}', r"model 'm': missing 'output'"),
        ('{"m": {"input": "1", "output": 2}}', r"model 'm': 'input' must be a non-negative number"),
        ('{"m": {"input": -1, "output": 2}}', r"'input' must be a non-negative number.*got -1"),
        ('{"m": {"input": true, "output": 2}}', r"'input' must be a non-negative .*got true"),
        ('{"m": {"input": 1, "outptu": 2}}', r"unknown key 'outptu'; allowed: 'input', 'output'"),
        ('{"": {"input": 1, "output": 2}}', r"empty model name"),
    ],
)
def test_bad_price_file(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "prices.json"
    p.write_text(content)
    with pytest.raises(ConfigError, match=message) as exc_info:
        PriceTable.load(p)
    assert str(p) in str(exc_info.value)


def test_missing_price_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json: cannot read prices file"):
        PriceTable.load(tmp_path / "nope.json")
