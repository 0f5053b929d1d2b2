"""The statistics behind consistency, temperature flips and the baseline comparison.

Pure functions of counts and lists, standard library only (the bottom of the import
layers: ``results`` and ``analysis`` build on them).

- ``pass_at_k``: the unbiased pass@k estimator of Chen et al. (2021).
- ``mcnemar_exact``: the two-sided exact McNemar test of two paired counts.
- ``paired_difference``: the mean paired difference of per-item scores and its 95%
  interval (Agresti-Min adjusted Wald for right/wrong items, else a normal interval).
- ``agreement``, ``entropy``, ``majority``: how an item's samples agree.
- ``mean_interval``: a mean and its normal 95% interval, clipped to a range.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "Z95",
    "Estimate",
    "agreement",
    "entropy",
    "majority",
    "mcnemar_exact",
    "mean_interval",
    "paired_difference",
    "pass_at_k",
]

#: The normal quantile of a two-sided 95% interval.
Z95 = 1.96


class Estimate(NamedTuple):
    """A point estimate and its 95% interval; all None when there was nothing to measure."""

    value: float | None
    low: float | None
    high: float | None


_NOTHING = Estimate(None, None, None)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn from an item's n is right.

    c of the n samples are right. This is the unbiased estimator 1 - C(n-c, k)/C(n, k)
    of Chen et al. (2021), computed as 1 - prod_{i=n-c+1..n} (1 - k/i) so that no large
    binomial coefficient is formed. It is 1.0 when fewer than k samples are wrong (every
    draw of k holds a right one). ValueError unless 1 <= k <= n and 0 <= c <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mcnemar_exact(b: int, c: int) -> float:
    """The two-sided exact McNemar p-value of b and c discordant pairs.

    Under "no change" each discordant pair goes either way with probability 1/2, so
    min(b, c) is binomial(b + c, 1/2) at most that small: p = min(1, 2 P(X <= min(b, c))).
    A small p means the two directions are too unbalanced to be chance. 1.0 when there is
    no discordant pair. Computed in exact integers, then divided once.
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: counts cannot be negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    term, tail = 1, 0  # term = C(n, i), updated in place
    for i in range(min(b, c) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / (1 << n))


def paired_difference(pairs: Sequence[tuple[float, float]]) -> Estimate:
    """The mean of new - base over paired per-item scores (each in [0, 1]), with a 95% CI.

    When every score is 0 or 1 (one sample per item, or samples that all agree), the
    interval is the Agresti-Min (2005) adjusted Wald interval for paired proportions:
    with b items right -> wrong, c items wrong -> right and n items, half a count is
    added to each of the four cells (n' = n + 2, b' = b + 1/2, c' = c + 1/2) and the
    interval is (c' - b')/n' +- 1.96 sqrt((b' + c') - (c' - b')^2/n') / n'. The point
    estimate stays the raw (c - b)/n. Otherwise the interval is the normal one of the
    per-item differences, mean +- 1.96 sd/sqrt(n) (a single item gives [-1, 1]).
    Intervals are clipped to [-1, 1]; an empty input gives None values.
    """
    if not pairs:
        return _NOTHING
    for new, base in pairs:
        if not (0.0 <= new <= 1.0 and 0.0 <= base <= 1.0):
            raise ValueError(f"paired_difference: scores must be in [0, 1], got {(new, base)}")
    n = len(pairs)
    if all(new in (0.0, 1.0) and base in (0.0, 1.0) for new, base in pairs):
        b = sum(1 for new, base in pairs if base > new)
        c = sum(1 for new, base in pairs if new > base)
        n2, b2, c2 = n + 2, b + 0.5, c + 0.5
        centre = (c2 - b2) / n2
        half = Z95 * math.sqrt((b2 + c2) - (c2 - b2) ** 2 / n2) / n2
        return Estimate((c - b) / n, max(-1.0, centre - half), min(1.0, centre + half))
    diffs = [new - base for new, base in pairs]
    mean = statistics.fmean(diffs)
    if n == 1:
        return Estimate(mean, -1.0, 1.0)
    half = Z95 * statistics.stdev(diffs) / math.sqrt(n)
    return Estimate(mean, max(-1.0, mean - half), min(1.0, mean + half))


def agreement(answers: Sequence[str | None]) -> float:
    """The share of answers equal to the most common one (1.0: all the same).

    A missing answer (None) counts as one more value, "no answer". ValueError when empty.
    """
    if not answers:
        raise ValueError("agreement: no answers")
    return Counter(answers).most_common(1)[0][1] / len(answers)


def entropy(answers: Sequence[str | None]) -> float:
    """The Shannon entropy of the answers' distribution, in bits (0: all the same).

    -sum p log2 p over the distinct answers (None is one more value); at most log2(n)
    for n answers. ValueError when empty.
    """
    if not answers:
        raise ValueError("entropy: no answers")
    n = len(answers)
    # p log2(1/p) keeps every term >= 0, so one answer gives 0.0, never -0.0
    return sum(k / n * math.log2(n / k) for k in Counter(answers).values())


def majority(answers: Sequence[str | None], rights: Sequence[bool]) -> bool:
    """Whether the majority vote of an item's samples is right.

    The vote is the most common answer, ties going to the answer that appears first
    (answers in sample order); it counts as right when the first sample that gave it was
    right. With one sample this is whether that sample was right.
    """
    if not answers or len(answers) != len(rights):
        raise ValueError("majority: need as many answers as verdicts, at least one")
    # most_common orders equal counts by first appearance
    top = Counter(answers).most_common(1)[0][0]
    return bool(rights[answers.index(top)])


def mean_interval(
    values: Sequence[float], lo: float | None = None, hi: float | None = None
) -> Estimate:
    """The mean of values and its normal 95% interval, mean +- 1.96 sd/sqrt(n).

    sd is the sample standard deviation (n - 1). The interval is clipped to [lo, hi]
    when they are given; a single value says nothing of the spread, so its interval is
    [lo, hi] itself (None where a bound is not given). An empty input gives None values.
    """
    if not values:
        return _NOTHING
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Estimate(mean, lo, hi)
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values))
    low, high = mean - half, mean + half
    if lo is not None:
        low = max(lo, low)
    if hi is not None:
        high = min(hi, high)
    return Estimate(mean, low, high)
