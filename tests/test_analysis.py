"""Consistency, temperature flips and the baseline comparison (analysis.py), by hand."""

from __future__ import annotations

import json
import math

import pytest

from pytest_llmbench.analysis import BaselineRun, analyze
from pytest_llmbench.gates import evaluate, parse_gate
from pytest_llmbench.pricing import PriceTable
from pytest_llmbench.results import (
    CaseResult,
    SuiteSummary,
    format_analysis,
    pool,
    summarize,
    totals,
    wilson,
)
from pytest_llmbench.stats import paired_difference

MODULE = "suites/test_q.py"


def case(
    item: str | None,
    outcome: str = "passed",
    *,
    t: float | None = 0.0,
    sample: int | None = None,
    answer: str | None = None,
    suite: str = "test_q",
) -> CaseResult:
    name = item or "plain"
    return CaseResult(
        nodeid=f"{MODULE}::{suite}[{name}-t{t}-s{sample}]",
        suite=suite,
        module=MODULE,
        item_id=item,
        temperature=t,
        sample=sample,
        outcome=outcome,
        answer=answer,
    )


def samples(item: str, marks: str, answers: str, *, t: float | None = 0.0) -> list[CaseResult]:
    """One case per sample: marks "PFES" (passed, failed, error, skipped), one answer letter
    each ("-": no answer)."""
    outcome = {"P": "passed", "F": "failed", "E": "error", "S": "skipped"}
    return [
        case(item, outcome[m], t=t, sample=i, answer=None if a == "-" else a)
        for i, (m, a) in enumerate(zip(marks, answers, strict=True))
    ]


def singles(
    marks: dict[str, str], *, t: float | None = 0.0, suite: str = "test_q"
) -> list[CaseResult]:
    """One case per item, no samples: {"q1": "P", ...}."""
    outcome = {"P": "passed", "F": "failed", "E": "error", "S": "skipped"}
    return [case(i, outcome[m], t=t, suite=suite) for i, m in marks.items()]


def analysed(
    cases: list[CaseResult], base: list[CaseResult] | None = None
) -> tuple[list[SuiteSummary], BaselineRun | None]:
    rows = summarize(cases, PriceTable())
    return rows, analyze(rows, cases, base)


# ---------------------------------------------------------------------- consistency
def consistency_cases() -> list[CaseResult]:
    return [
        *samples("q1", "PPP", "aaa"),  # all right, one answer
        *samples("q2", "FPP", "abb"),  # majority b, right; 2 of 3 right
        *samples("q3", "FFF", "xyx"),  # majority x, wrong
        # a skipped sample of q1 with another answer: not graded, ignored everywhere
        case("q1", "skipped", sample=3, answer="zzz"),
    ]


def test_consistency_figures() -> None:
    cases = consistency_cases()
    (row,), _ = analysed(list(reversed(cases)))  # order of arrival does not matter
    c = row.consistency
    assert c is not None
    assert (c.samples, c.items) == (3, 3)
    # maj@3: q1 and q2 right, q3 wrong: 2/3, Wilson over 3 items
    assert c.maj_accuracy == pytest.approx(2 / 3)
    assert (c.maj_ci_low, c.maj_ci_high) == wilson(2, 3)
    # pass@1 = mean(3/3, 2/3, 0/3) = 5/9
    # pass@2: q1 1, q2 1 - C(1,2)/C(3,2) = 1 (one wrong sample < 2), q3 0: 2/3
    # pass@3: 1, 1, 0: 2/3
    assert c.pass_at_k == pytest.approx({1: 5 / 9, 2: 2 / 3, 3: 2 / 3})
    # agreement per item 1, 2/3, 2/3: mean 7/9; sd = sqrt(((2/9)^2 + 2 (1/9)^2) / 2) = sqrt(1/27)
    # 1.96 sd / sqrt(3) = 1.96/9: [5.04/9, 8.96/9]
    assert c.agreement == pytest.approx(7 / 9)
    assert c.agreement_ci_low == pytest.approx(5.04 / 9)
    assert c.agreement_ci_high == pytest.approx(8.96 / 9)
    # entropy per item 0, h, h with h = H(2/3, 1/3) = 0.918296 bits: mean 2h/3
    # sd = h/sqrt(3); 1.96 sd/sqrt(3) = 1.96h/3: [0.04h/3, 3.96h/3]
    h = 2 / 3 * math.log2(3 / 2) + 1 / 3 * math.log2(3)
    assert c.entropy == pytest.approx(2 * h / 3)
    assert c.entropy_ci_low == pytest.approx(0.04 * h / 3)
    assert c.entropy_ci_high == pytest.approx(3.96 * h / 3)
    assert c.inconsistent_items == ("q2", "q3")
    assert row.skipped == 1 and row.graded == 9


def test_consistency_to_dict_has_string_keys_and_is_json() -> None:
    (row,), _ = analysed(consistency_cases())
    data = row.to_dict()
    cons = data["consistency"]
    assert list(cons) == [
        "samples",
        "items",
        "maj_accuracy",
        "maj_ci_low",
        "maj_ci_high",
        "pass_at_k",
        "agreement",
        "agreement_ci_low",
        "agreement_ci_high",
        "entropy",
        "entropy_ci_low",
        "entropy_ci_high",
        "inconsistent_items",
    ]
    assert list(cons["pass_at_k"]) == ["1", "2", "3"]
    assert cons["inconsistent_items"] == ["q2", "q3"]
    assert data["flips"] is None and data["baseline"] is None
    json.dumps(data, allow_nan=False)


def test_one_sample_per_item_has_no_consistency() -> None:
    # K = 1: nothing to agree on
    (row,), _ = analysed(singles({"q1": "P", "q2": "F"}))
    assert row.consistency is None
    # samples=3 but two of them skipped: one graded sample per item is K = 1 as well
    (row,), _ = analysed(samples("q1", "PSS", "abc"))
    assert row.consistency is None


def test_all_equal_answers() -> None:
    cases = [*samples("q1", "PPPP", "aaaa"), *samples("q2", "FFFF", "bbbb")]
    (row,), _ = analysed(cases)
    c = row.consistency
    assert c is not None
    # every item agrees with itself: agreement 1 and entropy 0, with no spread
    assert (c.agreement, c.agreement_ci_low, c.agreement_ci_high) == (1.0, 1.0, 1.0)
    assert (c.entropy, c.entropy_ci_low, c.entropy_ci_high) == (0.0, 0.0, 0.0)
    assert c.inconsistent_items == ()
    # maj@4 = 1/2; pass@k = mean(1, 0) = 1/2 for every k
    assert c.maj_accuracy == 0.5
    assert c.pass_at_k == {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}


def test_pass_at_k_skips_items_with_fewer_samples() -> None:
    # q1 has 3 graded samples (1 right), q2 only 2 (an error counts as graded, wrong)
    cases = [*samples("q1", "PFF", "abb"), *samples("q2", "PES", "a-b")]
    (row,), _ = analysed(cases)
    c = row.consistency
    assert c is not None and c.samples == 3 and c.items == 2
    # pass@1 = mean(1/3, 1/2) = 5/12
    # pass@2: q1 1 - C(2,2)/C(3,2) = 2/3; q2 1 - C(1,2)/C(2,2) = 1 (1 wrong < 2): 5/6
    # pass@3: q1 only (q2 has 2 samples): 1 - C(2,3)/C(3,3) = 1
    assert c.pass_at_k == pytest.approx({1: 5 / 12, 2: 5 / 6, 3: 1.0})
    # q2's answers a, None: inconsistent; its majority (tie) is a, right
    assert c.inconsistent_items == ("q1", "q2")
    assert c.maj_accuracy == 0.5


def test_items_without_dataset_use_the_node_id() -> None:
    cases = [case(None, "passed", sample=i, answer="a") for i in range(2)]
    (row,), _ = analysed(cases)
    # different node ids: two items of one sample each
    assert row.consistency is None


# ---------------------------------------------------------------------- flips
def flip_cases() -> list[CaseResult]:
    return [
        *singles({"q1": "P", "q2": "P", "q3": "F", "q4": "P"}, t=0.0),
        *singles({"q1": "F", "q2": "P", "q3": "P", "q4": "F", "q5": "P"}, t=1.0),
        *singles({"q1": "P", "q2": "P", "q3": "F", "q4": "S"}, t=0.5),
    ]


def test_flips_against_the_lowest_temperature() -> None:
    cold, warm, hot = analysed(flip_cases())[0]
    assert cold.temperature == 0.0 and cold.flips is None
    f = hot.flips
    assert f is not None
    # paired q1..q4 (q5 only at T=1): q1, q4 right -> wrong; q3 wrong -> right
    assert (f.against, f.items, f.right_to_wrong, f.wrong_to_right) == (0.0, 4, 2, 1)
    assert f.right_to_wrong_items == ("q1", "q4") and f.wrong_to_right_items == ("q3",)
    # McNemar: n = 3, 2 P(X <= 1) = 2 (1 + 3)/8 = 1
    assert f.mcnemar_p == 1.0
    # T=0.5 against T=0 too; q4 skipped there: 3 paired items, no change
    assert warm.flips is not None
    assert (warm.flips.against, warm.flips.items, warm.flips.right_to_wrong) == (0.0, 3, 0)
    assert warm.flips.mcnemar_p == 1.0
    assert hot.flips is not None and list(hot.to_dict()["flips"]) == [
        "against",
        "items",
        "right_to_wrong",
        "wrong_to_right",
        "mcnemar_p",
        "right_to_wrong_items",
        "wrong_to_right_items",
    ]


def test_flips_use_the_majority_vote() -> None:
    cases = [
        *samples("q1", "PPF", "aab", t=0.0),  # majority a: right
        *samples("q1", "FFP", "bba", t=0.7),  # majority b: wrong, though one sample passed
        *samples("q2", "FFP", "bba", t=0.0),  # wrong
        *samples("q2", "FPP", "baa", t=0.7),  # right
    ]
    _, hot = analysed(cases)[0]
    assert hot.flips is not None
    assert hot.flips.right_to_wrong_items == ("q1",)
    assert hot.flips.wrong_to_right_items == ("q2",)


def test_no_flips_without_temperatures() -> None:
    # a suite without temperatures (None), and one with a single temperature
    cases = [*singles({"q1": "P"}, t=None), *singles({"q1": "F"}, t=0.3, suite="test_r")]
    rows, _ = analysed(cases)
    assert [r.flips for r in rows] == [None, None]


def test_many_flips_one_way_are_significant() -> None:
    cold = singles({f"q{i}": "P" for i in range(10)}, t=0.0)
    hot = singles({f"q{i}": "F" if i < 9 else "P" for i in range(10)}, t=1.0)
    _, row = analysed(cold + hot)[0]
    assert row.flips is not None
    # 9 right -> wrong, 0 back: 2 C(9,0)/2^9 = 1/256
    assert row.flips.mcnemar_p == pytest.approx(2 / 512)


# ---------------------------------------------------------------------- baseline
def test_baseline_paired_delta() -> None:
    base = [
        *singles({"q1": "P", "q2": "P", "q3": "F", "q4": "F", "q6": "F"}),
        *singles({"q1": "P", "q2": "F"}, suite="test_gone"),
    ]
    new = [
        *singles({"q1": "P", "q2": "F", "q3": "P", "q4": "P", "q5": "P"}),
        *singles({"q1": "P"}, suite="test_fresh"),
    ]
    rows, run = analysed(new, base)
    fresh, row = rows  # sorted by suite: test_fresh, test_q
    assert fresh.baseline is None  # the baseline has no such row
    b = row.baseline
    assert b is not None
    # shared q1..q4: this run 3/4 right, the baseline 2/4; Wilson of the baseline's 2 of 4
    assert (b.items, b.accuracy, b.baseline_accuracy) == (4, 0.75, 0.5)
    assert (b.baseline_ci_low, b.baseline_ci_high) == wilson(2, 4)
    # b = 1 (q2 right -> wrong), c = 2 (q3, q4 wrong -> right): raw (2 - 1)/4 = 0.25
    # Agresti-Min: n' = 6, b' = 1.5, c' = 2.5, diff' = 1/6
    # se = sqrt(4 - 1/6)/6 = 0.326315; 1.96 se = 0.639577
    assert b.delta == pytest.approx(0.25)
    assert b.delta_ci_low == pytest.approx(1 / 6 - 0.639577, abs=1e-6)
    assert b.delta_ci_high == pytest.approx(1 / 6 + 0.639577, abs=1e-6)
    assert b.right_to_wrong_items == ("q2",) and b.wrong_to_right_items == ("q3", "q4")
    assert b.new_items == ("q5",) and b.missing_items == ("q6",)
    # the run: 4 shared; new q5 and test_fresh's q1; missing q6 and test_gone's q1, q2
    assert run == BaselineRun(4, 2, 3, (f"{MODULE}::test_gone@0",))
    assert run.to_dict() == {
        "shared_items": 4,
        "new_items": 2,
        "missing_items": 3,
        "missing_suites": [f"{MODULE}::test_gone@0"],
    }
    data = row.to_dict()["baseline"]
    assert "pairs" not in data and data["new_items"] == ["q5"]
    json.dumps(data, allow_nan=False)


def test_baseline_with_samples_scores_items_by_share() -> None:
    base = [*samples("q1", "PPF", "aab"), *samples("q2", "FFF", "bbb")]
    new = [*samples("q1", "PFF", "abb"), *samples("q2", "PFF", "abb")]
    (row,), _ = analysed(new, base)
    b = row.baseline
    assert b is not None
    # scores (new, base): q1 (1/3, 2/3), q2 (1/3, 0): differences -1/3, +1/3
    # mean 0; sd = sqrt(2 (1/3)^2 / 1) = 0.471405; 1.96 sd/sqrt(2) = 0.653333
    assert b.delta == pytest.approx(0.0, abs=1e-12)
    assert b.delta_ci_low == pytest.approx(-0.653333, abs=1e-6)
    assert b.delta_ci_high == pytest.approx(0.653333, abs=1e-6)
    # accuracy = mean(1/3, 1/3); the baseline's mean(2/3, 0); its Wilson over 2 of 6 cases
    assert b.accuracy == pytest.approx(1 / 3) and b.baseline_accuracy == pytest.approx(1 / 3)
    assert (b.baseline_ci_low, b.baseline_ci_high) == wilson(2, 6)
    assert b.right_to_wrong_items == ("q1",) and b.wrong_to_right_items == ("q2",)


def test_baseline_without_shared_items() -> None:
    base = singles({"a1": "P", "a2": "F"})
    new = singles({"b1": "P"})
    (row,), run = analysed(new, base)
    b = row.baseline
    assert b is not None and b.items == 0
    assert (b.accuracy, b.baseline_accuracy, b.baseline_ci_low, b.baseline_ci_high) == (None,) * 4
    assert (b.delta, b.delta_ci_low, b.delta_ci_high) == (None, None, None)
    assert b.new_items == ("b1",) and b.missing_items == ("a1", "a2")
    assert run == BaselineRun(0, 1, 2, ())
    # a delta gate on it fails and says why
    (result,) = evaluate([parse_gate("test_q:delta>=-0.02")], [row])
    assert not result.passed and "no graded item shared with the baseline (1 new)" in result.message


def test_skipped_cases_are_ignored_in_the_comparison() -> None:
    base = singles({"q1": "P", "q2": "S", "q3": "P"})
    new = singles({"q1": "P", "q2": "P", "q3": "S"})
    (row,), run = analysed(new, base)
    b = row.baseline
    assert b is not None
    # q1 shared; q2 graded only here (new), q3 only in the baseline (missing)
    assert (b.items, b.new_items, b.missing_items) == (1, ("q2",), ("q3",))
    assert run == BaselineRun(1, 1, 1, ())


def test_no_baseline_gives_none() -> None:
    rows, run = analysed(flip_cases())
    assert run is None and all(r.baseline is None for r in rows)


def test_analyze_recomputes_in_place() -> None:
    cases = singles({"q1": "P", "q2": "F"})
    rows = summarize(cases, PriceTable())
    analyze(rows, cases, singles({"q1": "F", "q2": "F"}))
    assert rows[0].baseline is not None
    assert analyze(rows, cases) is None
    assert rows[0].baseline is None


# ---------------------------------------------------------------------- pooling
def pooled_cases() -> tuple[list[CaseResult], list[CaseResult]]:
    base = [
        *singles({"q1": "P", "q2": "P", "q3": "P", "q4": "F"}, t=0.0),
        *singles({"q1": "P", "q2": "F", "q3": "F", "q4": "F"}, t=1.0),
    ]
    new = [
        *singles({"q1": "P", "q2": "F", "q3": "P", "q4": "F"}, t=0.0),
        *singles({"q1": "F", "q2": "F", "q3": "F", "q4": "P"}, t=1.0),
    ]
    return new, base


def test_pooled_baseline_delta_over_temperatures() -> None:
    new, base = pooled_cases()
    rows, _ = analysed(new, base)
    pooled = pool(rows, suite="test_q", module=MODULE)
    b = pooled.baseline
    assert b is not None
    # 8 pairs: T=0 q2 right -> wrong; T=1 q1 right -> wrong, q4 wrong -> right
    # b = 2, c = 1, n = 8: raw (1 - 2)/8 = -0.125
    # n' = 10, b' = 2.5, c' = 1.5, diff' = -0.1; se = sqrt(4 - 1/10)/10 = 0.197484
    # 1.96 se = 0.387069
    assert b.items == 8
    assert b.delta == pytest.approx(-0.125)
    assert b.delta_ci_low == pytest.approx(-0.1 - 0.387069, abs=1e-6)
    assert b.delta_ci_high == pytest.approx(-0.1 + 0.387069, abs=1e-6)
    assert (b.delta, b.delta_ci_low, b.delta_ci_high) == paired_difference(b.pairs)
    # accuracy 3/8 against the baseline's 4/8, whose Wilson is over its 8 shared cases
    assert (b.accuracy, b.baseline_accuracy) == (3 / 8, 4 / 8)
    assert (b.baseline_ci_low, b.baseline_ci_high) == wilson(4, 8)
    assert b.right_to_wrong_items == ("q1", "q2") and b.wrong_to_right_items == ("q4",)
    assert pooled.consistency is None and pooled.flips is None
    # the total pools the same way
    total = totals(rows)
    assert total.baseline is not None and total.baseline.delta == pytest.approx(-0.125)


def test_delta_gate_without_temperature_pools() -> None:
    new, base = pooled_cases()
    rows, _ = analysed(new, base)
    (result,) = evaluate([parse_gate("test_q:delta>=-0.02")], rows)
    assert result.value == pytest.approx(-0.125) and not result.passed
    assert "over 8 shared items" in result.message
    (at0,) = evaluate([parse_gate("test_q@0:delta_ci_low>=-0.9")], rows)
    assert at0.passed and at0.cases == 4


def test_pool_without_baseline_has_none() -> None:
    rows, _ = analysed(flip_cases())
    assert pool(rows, suite="x").baseline is None


# ---------------------------------------------------------------------- terminal lines
def unwrap(lines: list[str]) -> list[str]:
    """The logical lines: a long one goes on, indented by 4, on the next line."""
    assert all(len(line) <= 120 for line in lines)
    return "\n".join(lines).replace("\n    ", " ").split("\n")


def test_format_analysis_lines() -> None:
    new = [
        *samples("q1", "PPF", "aab", t=0.0),
        *samples("q2", "FFF", "bbb", t=0.0),
        *samples("q1", "FFF", "bbb", t=1.0),
        *samples("q2", "FFF", "bbb", t=1.0),
    ]
    base = [*samples("q1", "PPP", "aaa", t=0.0), *samples("q3", "PPP", "aaa", t=0.0)]
    base += [*samples("q1", "PPP", "aaa", t=2.0)]
    rows, run = analysed(new, base)
    text = "\n".join(unwrap(format_analysis(rows, totals(rows), run)))
    # maj@3 at T=0: q1 right, q2 wrong: 50.0%, Wilson(1, 2) = [9.5-90.5]
    # pass@1 = mean(2/3, 0) = 33.3%; pass@3 = mean(1, 0) = 50.0%
    assert (
        "llmbench consistency: test_q@0: maj@3 50.0% [9.5-90.5], pass@1 33.3%, pass@3 50.0%, "
        "agreement 0.83, entropy 0.46 bits, 1 of 2 items inconsistent"
    ) in text
    # q1 right at T=0 by majority (a, a, b), wrong at T=1; q2 wrong at both
    assert (
        "llmbench flips vs T=0: test_q@1: 1 right->wrong, 0 wrong->right of 2 (McNemar p=1.000)"
    ) in text
    # shared q1 at T=0: 100.0% -> 66.7%, scores 2/3 vs 1: fractional, one item: [-1, 1]
    assert (
        "llmbench vs baseline: test_q@0: 100.0% -> 66.7% (delta -33.3 pts [-100.0, +100.0], "
        "1 shared item; 1 scored lower, 0 higher)"
    ) in text
    # new: q2 at T=0, q1 and q2 at T=1 (a row the baseline lacks); missing: q3 at T=0, q1 at
    # T=2 (a row this run lacks)
    assert (
        "llmbench vs baseline: 3 new items (not in the baseline), 2 missing (not in this run)"
    ) in text
    assert "llmbench vs baseline: not in the baseline: test_q@1" in text
    assert f"llmbench vs baseline: not in this run: {MODULE}::test_q@2" in text


def test_format_analysis_binary_baseline_and_total() -> None:
    new, base = pooled_cases()
    rows, run = analysed(new, base)
    lines = unwrap(format_analysis(rows, totals(rows), run))
    # q1 and q3 right at T=0, wrong at T=1; q4 the reverse: 2 P(X <= 1) for n = 3 is 1
    assert lines[0] == (
        "llmbench flips vs T=0: test_q@1: 2 right->wrong, 1 wrong->right of 4 (McNemar p=1.000)"
    )
    # T=0: 75.0% -> 50.0%; b = 1, c = 0 of 4; Agresti-Min n' = 6, diff' = -1/6,
    # se = sqrt(2 - 1/6)/6 = 0.225668, 1.96 se = 0.442309: [-60.9, +27.6]
    assert lines[1] == (
        "llmbench vs baseline: test_q@0: 75.0% -> 50.0% (delta -25.0 pts [-60.9, +27.6], "
        "4 shared items; 1 right->wrong, 0 wrong->right)"
    )
    assert lines[3].startswith("llmbench vs baseline: TOTAL: 50.0% -> 37.5% (delta -12.5 pts")
    assert len(lines) == 4  # nothing new or missing


def test_format_analysis_is_empty_with_nothing_to_say() -> None:
    rows, _ = analysed(singles({"q1": "P", "q2": "F"}))
    assert format_analysis(rows, totals(rows)) == []
    assert format_analysis([], totals([])) == []


def test_format_analysis_wraps_long_lines() -> None:
    suite = "test_" + "x" * 90
    cases = [
        case(f"q{i}", "passed", sample=s, answer="a", suite=suite)
        for i in range(2)
        for s in range(2)
    ]
    rows, _ = analysed(cases)
    lines = format_analysis(rows, totals(rows))
    assert len(lines) > 1 and all(line.startswith("    ") for line in lines[1:])
    assert all(len(line) <= 120 for line in lines)
