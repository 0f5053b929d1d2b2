"""Figures across an item's cases: samples, temperatures and a baseline run.

A ``SuiteSummary`` row counts cases; this module looks at the items behind them. For
every row (module, suite, temperature) of the run, ``analyze`` fills in:

- ``consistency`` (``samples=K``): maj@K, pass@k, answer agreement and entropy;
- ``flips``: items that changed verdict since the suite's lowest temperature;
- ``baseline`` (``--llm-baseline``): the paired difference with an earlier run.

An item is a dataset item (``item_id``, else the case's node id) within a row; its
samples are its graded cases (skipped ones are ignored everywhere) in sample order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .results import (
    BaselineDelta,
    BaselineRun,
    CaseResult,
    Consistency,
    Flips,
    SuiteSummary,
    wilson,
)
from .stats import agreement, entropy, majority, mcnemar_exact, mean_interval, pass_at_k

__all__ = ["BaselineRun", "analyze", "baseline_delta", "consistency", "flips", "group_items"]

#: A row of the summary: (module, suite, temperature).
RowKey = tuple[str, str, float | None]


@dataclass
class Item:
    """An item's graded samples in sample order: their answers and verdicts."""

    answers: list[str | None] = field(default_factory=list)
    rights: list[bool] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Graded samples."""
        return len(self.rights)

    @property
    def c(self) -> int:
        """Samples that passed."""
        return sum(self.rights)

    @property
    def score(self) -> float:
        """The share of samples that passed."""
        return self.c / self.n

    @property
    def majority_right(self) -> bool:
        """Whether the item's majority vote is right (one sample: whether it passed)."""
        return majority(self.answers, self.rights)


def group_items(cases: Iterable[CaseResult]) -> dict[RowKey, dict[str, Item]]:
    """The graded cases by row, then by item key, each item's samples in sample order.

    Every row with a case appears, even one whose cases were all skipped (no items).
    """
    rows: dict[RowKey, dict[str, Item]] = {}
    ordered = sorted(cases, key=lambda c: (c.sample is not None, c.sample or 0))  # stable
    for c in ordered:
        items = rows.setdefault((c.module, c.suite, c.temperature), {})
        if c.outcome == "skipped":
            continue
        item = items.setdefault(c.nodeid if c.item_id is None else c.item_id, Item())
        item.answers.append(c.answer)
        item.rights.append(c.outcome == "passed")  # failed, error or unknown: wrong
    return rows


# ---------------------------------------------------------------------- consistency
def consistency(items: dict[str, Item]) -> Consistency | None:
    """The consistency figures of one row; None unless some item has several samples."""
    samples = max((it.n for it in items.values()), default=0)
    if samples < 2:
        return None
    its = list(items.values())
    maj = sum(it.majority_right for it in its)
    maj_low, maj_high = wilson(maj, len(its))
    agree = mean_interval([agreement(it.answers) for it in its], 0.0, 1.0)
    # n answers have at most log2(n) bits: the upper clip for the interval
    ent = mean_interval([entropy(it.answers) for it in its], 0.0, math.log2(samples))
    pass_k = {
        k: math.fsum(pass_at_k(it.n, it.c, k) for it in at_least) / len(at_least)
        for k in range(1, samples + 1)
        if (at_least := [it for it in its if it.n >= k])
    }
    return Consistency(
        samples=samples,
        items=len(its),
        maj_accuracy=maj / len(its),
        maj_ci_low=maj_low,
        maj_ci_high=maj_high,
        pass_at_k=pass_k,
        agreement=agree.value,
        agreement_ci_low=agree.low,
        agreement_ci_high=agree.high,
        entropy=ent.value,
        entropy_ci_low=ent.low,
        entropy_ci_high=ent.high,
        inconsistent_items=tuple(sorted(k for k, it in items.items() if len(set(it.answers)) > 1)),
    )


# ---------------------------------------------------------------------- flips
def flips(against: float, low: dict[str, Item], here: dict[str, Item]) -> Flips:
    """Items right at temperature ``against`` (``low``) and wrong ``here``, and back.

    Paired on the items graded at both; right means the majority vote is right.
    """
    shared = sorted(low.keys() & here.keys())
    down = [k for k in shared if low[k].majority_right and not here[k].majority_right]
    up = [k for k in shared if not low[k].majority_right and here[k].majority_right]
    return Flips(
        against=against,
        items=len(shared),
        right_to_wrong=len(down),
        wrong_to_right=len(up),
        mcnemar_p=mcnemar_exact(len(down), len(up)),
        right_to_wrong_items=tuple(down),
        wrong_to_right_items=tuple(up),
    )


def _lowest_temperatures(keys: Iterable[RowKey]) -> dict[tuple[str, str], float]:
    lowest: dict[tuple[str, str], float] = {}
    for module, suite, t in keys:
        if t is not None:
            old = lowest.get((module, suite))
            lowest[(module, suite)] = t if old is None else min(old, t)
    return lowest


# ---------------------------------------------------------------------- baseline
def baseline_delta(here: dict[str, Item], base: dict[str, Item]) -> BaselineDelta:
    """One row against the baseline's same row, paired item by item on their scores."""
    shared = sorted(here.keys() & base.keys())
    return BaselineDelta.build(
        [(here[k].score, base[k].score) for k in shared],
        sum(base[k].c for k in shared),
        sum(base[k].n for k in shared),
        right_to_wrong_items=[k for k in shared if here[k].score < base[k].score],
        wrong_to_right_items=[k for k in shared if here[k].score > base[k].score],
        new_items=here.keys() - base.keys(),
        missing_items=base.keys() - here.keys(),
    )


def _baseline_run(
    rows: dict[RowKey, dict[str, Item]], base_rows: dict[RowKey, dict[str, Item]]
) -> BaselineRun:
    shared = new = missing = 0
    for key, items in rows.items():
        base = base_rows.get(key, {})
        shared += len(items.keys() & base.keys())
        new += len(items.keys() - base.keys())
        missing += len(base.keys() - items.keys())
    absent = sorted((k for k in base_rows if k not in rows), key=_row_order)
    missing += sum(len(base_rows[k]) for k in absent)
    return BaselineRun(shared, new, missing, tuple(_row_label(k) for k in absent))


def _row_order(key: RowKey) -> tuple[str, str, bool, float]:
    module, suite, t = key
    return (module, suite, t is not None, t or 0.0)


def _row_label(key: RowKey) -> str:
    module, suite, t = key
    return f"{module}::{suite}" + ("" if t is None else f"@{t:g}")


# ---------------------------------------------------------------------- the run
def analyze(
    summaries: Sequence[SuiteSummary],
    cases: Sequence[CaseResult],
    baseline_cases: Sequence[CaseResult] | None = None,
) -> BaselineRun | None:
    """Fill in ``consistency``, ``flips`` and ``baseline`` of each row, in place.

    ``summaries`` are the rows ``results.summarize`` made of ``cases``. Each figure is
    set on every row (None where it does not apply), so calling again recomputes them.
    Returns the run-level comparison with the baseline, None without baseline cases.
    """
    rows = group_items(cases)
    base_rows = None if baseline_cases is None else group_items(baseline_cases)
    lowest = _lowest_temperatures(rows)
    for s in summaries:
        key: RowKey = (s.module, s.suite, s.temperature)
        items = rows.get(key, {})
        s.consistency = consistency(items)
        low = lowest.get((s.module, s.suite))
        if s.temperature is None or low is None or s.temperature <= low:
            s.flips = None
        else:
            s.flips = flips(low, rows.get((s.module, s.suite, low), {}), items)
        if base_rows is None or key not in base_rows:
            s.baseline = None
        else:
            s.baseline = baseline_delta(items, base_rows[key])
    return None if base_rows is None else _baseline_run(rows, base_rows)
