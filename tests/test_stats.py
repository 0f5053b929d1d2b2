"""The statistics of stats.py against values computed by hand (arithmetic in comments)."""

from __future__ import annotations

import math

import pytest

from pytest_llmbench.stats import (
    Estimate,
    agreement,
    entropy,
    majority,
    mcnemar_exact,
    mean_interval,
    paired_difference,
    pass_at_k,
)


# ---------------------------------------------------------------------- pass@k
@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (5, 2, 4, 1.0),  # only 3 wrong samples: any 4 hold a right one
        (5, 2, 5, 1.0),  # k = n: the item has a right sample
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (5, 0, 1, 0.0),  # c = 0: never right
        (5, 0, 5, 0.0),  # c = 0, k = n: still never
        (5, 5, 1, 1.0),  # c = n: always right
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_share_right() -> None:
    # 1 - C(n-c,1)/C(n,1) = 1 - (n-c)/n = c/n
    assert pass_at_k(20, 7, 1) == pytest.approx(7 / 20)


def test_pass_at_k_large_n_is_stable() -> None:
    # 1 - C(900,10)/C(1000,10) = 1 - prod_{i=0..9} (900-i)/(1000-i), about 0.65
    exact = 1 - math.comb(900, 10) / math.comb(1000, 10)
    assert pass_at_k(1000, 100, 10) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 2, 0), (5, 2, 6), (5, 6, 1), (3, -1, 1)])
def test_pass_at_k_rejects(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------- McNemar
@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        (0, 0, 1.0),  # no discordant pair: no evidence
        (1, 9, 2 * (1 + 10) / 1024),  # 2 (C(10,0) + C(10,1)) / 2^10 = 0.0215
        (9, 1, 2 * (1 + 10) / 1024),  # two-sided: symmetric
        (0, 5, 2 * 1 / 32),  # 2 C(5,0) / 2^5 = 0.0625
        (2, 8, 2 * (1 + 10 + 45) / 1024),  # 0.109375
        (9, 3, 2 * (1 + 12 + 66 + 220) / 4096),  # 598/4096 = 0.146
        (5, 5, 1.0),  # 2 * 638/1024 > 1: capped at 1
        (3, 4, 1.0),  # 2 (1 + 7 + 21 + 35)/128 = 1
        (1, 2, 1.0),  # 2 (1 + 3)/8 = 1
    ],
)
def test_mcnemar_exact(b: int, c: int, expected: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-15)


def test_mcnemar_exact_large_counts() -> None:
    # 2000 discordant pairs: exact integers, no overflow; 1000 vs 1000 is no evidence
    assert mcnemar_exact(1000, 1000) == 1.0
    assert mcnemar_exact(800, 1200) < 1e-15
    with pytest.raises(ValueError, match="negative"):
        mcnemar_exact(-1, 2)


# ---------------------------------------------------------------------- paired difference
def test_paired_difference_agresti_min() -> None:
    # 10 items: b = 1 right -> wrong, c = 4 wrong -> right, 3 right twice, 2 wrong twice
    pairs = [(0.0, 1.0)] + [(1.0, 0.0)] * 4 + [(1.0, 1.0)] * 3 + [(0.0, 0.0)] * 2
    est = paired_difference(pairs)
    # raw (c - b)/n = 3/10; n' = 12, b' = 1.5, c' = 4.5, diff' = 3/12 = 0.25
    # se = sqrt((1.5 + 4.5) - 3^2/12)/12 = sqrt(5.25)/12 = 0.190941
    # 1.96 se = 0.374244: [0.25 - 0.374244, 0.25 + 0.374244]
    assert est.value == pytest.approx(0.3)
    assert est.low == pytest.approx(-0.124244, abs=1e-6)
    assert est.high == pytest.approx(0.624244, abs=1e-6)


def test_paired_difference_no_change_is_centred() -> None:
    # 4 items right in both: b = c = 0; n' = 6, b' = c' = 0.5, diff' = 0
    # se = sqrt(1 - 0)/6 = 1/6; 1.96/6 = 0.326667
    est = paired_difference([(1.0, 1.0)] * 4)
    assert est.value == 0.0
    assert est.low == pytest.approx(-0.326667, abs=1e-6)
    assert est.high == pytest.approx(0.326667, abs=1e-6)


def test_paired_difference_is_clipped() -> None:
    # one item, wrong -> right: raw 1; n' = 3, b' = 0.5, c' = 1.5, diff' = 1/3
    # se = sqrt(2 - 1/3)/3 = 0.430331; 1/3 + 1.96 se = 1.18 > 1: clipped
    est = paired_difference([(1.0, 0.0)])
    assert est.value == 1.0
    assert est.low == pytest.approx(1 / 3 - 1.96 * math.sqrt(5 / 3) / 3)
    assert est.high == 1.0


def test_paired_difference_fractional_scores() -> None:
    # per-item differences 0.5, 0, -0.5, 1.0: mean 1.0/4 = 0.25
    # squared deviations 0.0625 + 0.0625 + 0.5625 + 0.5625 = 1.25; sd = sqrt(1.25/3) = 0.645497
    # 1.96 sd/sqrt(4) = 0.632587
    pairs = [(1.0, 0.5), (0.5, 0.5), (0.0, 0.5), (1.0, 0.0)]
    est = paired_difference(pairs)
    assert est.value == pytest.approx(0.25)
    assert est.low == pytest.approx(0.25 - 0.632587, abs=1e-6)
    assert est.high == pytest.approx(0.25 + 0.632587, abs=1e-6)


def test_paired_difference_edges() -> None:
    assert paired_difference([]) == Estimate(None, None, None)
    # one fractional item says nothing of the spread
    assert paired_difference([(2 / 3, 1 / 3)]) == pytest.approx((1 / 3, -1.0, 1.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        paired_difference([(1.5, 0.0)])


# ---------------------------------------------------------------------- agreement, entropy
@pytest.mark.parametrize(
    ("answers", "share", "bits"),
    [
        (["a", "a", "a"], 1.0, 0.0),  # all equal
        (["a", "b", "a", "b"], 0.5, 1.0),  # two halves: -2 (1/2 log2 1/2) = 1
        (["a", "b", "c", "d"], 0.25, 2.0),  # four equal quarters: log2 4
        # 2/3 and 1/3: 2/3 log2(3/2) + 1/3 log2(3) = 0.389975 + 0.528321
        (["a", "a", "b"], 2 / 3, 0.918296),
        ([None, None, "a"], 2 / 3, 0.918296),  # no answer is one more value
        (["a"], 1.0, 0.0),
    ],
)
def test_agreement_and_entropy(answers: list[str | None], share: float, bits: float) -> None:
    assert agreement(answers) == pytest.approx(share)
    assert entropy(answers) == pytest.approx(bits, abs=1e-6)


def test_entropy_of_one_answer_is_positive_zero() -> None:
    assert math.copysign(1.0, entropy(["x", "x"])) == 1.0
    with pytest.raises(ValueError):
        entropy([])
    with pytest.raises(ValueError):
        agreement([])


# ---------------------------------------------------------------------- majority
@pytest.mark.parametrize(
    ("answers", "rights", "expected"),
    [
        (["x", "y", "y"], [True, False, False], False),  # y wins, and y is wrong
        (["y", "x", "y"], [True, False, False], True),  # y wins; its first sample passed
        (["y", "x"], [False, True], False),  # a tie goes to the first answer, y
        (["x", "y"], [True, False], True),
        (["a", "b", "c"], [False, False, True], False),  # three-way tie: a
        (["a"], [True], True),  # one sample: whether it passed
        ([None, None, "a"], [False, False, True], False),  # "no answer" can win
    ],
)
def test_majority(answers: list[str | None], rights: list[bool], expected: bool) -> None:
    assert majority(answers, rights) is expected


def test_majority_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError):
        majority(["a"], [True, False])
    with pytest.raises(ValueError):
        majority([], [])


# ---------------------------------------------------------------------- mean interval
def test_mean_interval() -> None:
    # mean 0.5; sd = sqrt(4 * 0.25 / 3) = 0.577350; 1.96 sd / sqrt(4) = 0.565803
    est = mean_interval([1.0, 0.0, 1.0, 0.0])
    assert est.value == 0.5
    assert est.low == pytest.approx(0.5 - 0.565803, abs=1e-6)
    assert est.high == pytest.approx(0.5 + 0.565803, abs=1e-6)
    # clipped to [0, 1]
    assert mean_interval([1.0, 0.0, 1.0, 0.0], 0.0, 1.0) == (0.5, 0.0, 1.0)
    # all equal: no spread
    assert mean_interval([0.25, 0.25, 0.25]) == (0.25, 0.25, 0.25)


def test_mean_interval_edges() -> None:
    assert mean_interval([]) == Estimate(None, None, None)
    # one value: the interval is the allowed range, or unknown
    assert mean_interval([0.7], 0.0, 1.0) == (0.7, 0.0, 1.0)
    assert mean_interval([0.7]) == (0.7, None, None)
