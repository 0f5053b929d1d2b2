"""Per-case results and their summary per suite x temperature.

A ``CaseResult`` is built for every test case (on the xdist worker that ran it) and
travels to the controller as ``llm.*`` entries of ``report.user_properties``; the
controller rebuilds it with ``CaseResult.from_dict``. After the run ``summarize`` groups
the cases by (module, suite, temperature) into ``SuiteSummary`` rows, which the terminal
table (``format_summary``), the gates and the JSON report all read.

Accuracy is passed / (passed + failed + errors): a case that ended on an API error counts
as not passed, so an outage can never raise a suite's accuracy above a CI gate. Skipped
cases are not graded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath
from typing import Any

from .pricing import PriceTable
from .stats import paired_difference

__all__ = [
    "OUTCOMES",
    "BaselineDelta",
    "BaselineRun",
    "CaseResult",
    "Consistency",
    "Flips",
    "SuiteSummary",
    "format_analysis",
    "format_ci",
    "format_cost",
    "format_summary",
    "percentile",
    "pool",
    "pool_baseline",
    "summarize",
    "totals",
    "wilson",
]

#: The outcomes a case can have; "error" is an API error or a setup error.
OUTCOMES = ("passed", "failed", "error", "skipped")

#: Width the terminal table aims to stay within.
TABLE_WIDTH = 120


@dataclass
class CaseResult:
    """What one test case (dataset item x temperature x sample) did and cost."""

    nodeid: str
    suite: str
    module: str
    item_id: str | None
    temperature: float | None
    sample: int | None
    outcome: str
    error: str | None = None
    response: str | None = None
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # hidden reasoning of reasoning models: already part of completion_tokens (and its cost)
    reasoning_tokens: int = 0
    latency_s: float = 0.0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    cached: int = 0
    model: str | None = None
    duration_s: float = 0.0
    batch: bool = False
    # what the grader saw (from ``check``, else the dataset's usual fields): the report's
    # items, and ``answer`` (normalised as the suite says) for the consistency figures
    question: str | None = None
    expected: str | None = None
    answer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with every field (the inverse of ``from_dict``)."""
        # every field is a scalar: a shallow dict, not asdict's recursive copy (this runs
        # once per case, 30,000 times in a large replay)
        return {name: getattr(self, name) for name, _ in _case_fields()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseResult:
        """Rebuild a case from ``to_dict`` output.

        Only ``nodeid`` and ``outcome`` are required: ``suite`` and ``module`` default to
        the parts of the node id, other fields to their defaults, and unknown keys are
        ignored, so reports of older and newer versions still load. The fields and their
        conversions come from the dataclass itself: a field is declared once.
        """
        if "nodeid" not in data or "outcome" not in data:
            missing = "nodeid" if "nodeid" not in data else "outcome"
            raise ValueError(f"case result without {missing!r}: {dict(data)!r:.200}")
        nodeid = str(data["nodeid"])
        module, _, rest = nodeid.partition("::")
        values = {name: convert(data.get(name)) for name, convert in _case_fields()}
        values["suite"] = values["suite"] or rest.split("[", 1)[0].split("::")[-1] or nodeid
        values["module"] = values["module"] or module
        return cls(**values)


#: how a JSON value becomes each field type of CaseResult (annotations are strings here)
_CONVERTERS: dict[str, Any] = {
    "str": lambda v: "" if v is None else str(v),
    "int": lambda v: int(v or 0),
    "float": lambda v: float(v or 0.0),
    "bool": lambda v: bool(v or False),
}


@functools.cache
def _case_fields() -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    """CaseResult's fields and how a JSON value becomes each, derived once from the class."""
    out = []
    for f in fields(CaseResult):
        kind = str(f.type)
        if kind.endswith(" | None"):
            inner = _CONVERTERS[kind.removesuffix(" | None")]
            out.append((f.name, functools.partial(_optional, inner)))
        else:
            out.append((f.name, _CONVERTERS[kind]))
    return tuple(out)


def _optional(convert: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else convert(value)


# ---------------------------------------------------------------------- statistics
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (95% for z=1.96).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at k=0,
    k=n and small n, which is where CI gates on small smoke runs live. n=0 gives the
    uninformative (0.0, 1.0).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) with linear interpolation, as numpy's default.

    An empty input gives 0.0.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    data = sorted(values)
    if not data:
        return 0.0
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


# ---------------------------------------------------------------------- analysis figures
@dataclass(frozen=True)
class Consistency:
    """How an item's samples agree (``samples=K``), over the items of one row.

    ``samples`` is K, the most graded samples an item has; ``items`` the items with at
    least one graded sample. ``maj_accuracy`` (maj@K) is the share of items whose
    majority answer is right, ``maj_ci_low``/``maj_ci_high`` its Wilson interval over
    items. ``pass_at_k[k]`` is the mean over items (with at least k samples) of the
    unbiased pass@k. ``agreement`` is the mean share of an item's samples giving its most
    common answer, ``entropy`` the mean Shannon entropy of its answers in bits, each with
    a normal 95% interval. ``inconsistent_items``: items whose samples do not all agree.
    """

    samples: int
    items: int
    maj_accuracy: float | None
    maj_ci_low: float | None
    maj_ci_high: float | None
    pass_at_k: Mapping[int, float]
    agreement: float | None
    agreement_ci_low: float | None
    agreement_ci_high: float | None
    entropy: float | None
    entropy_ci_low: float | None
    entropy_ci_high: float | None
    inconsistent_items: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``pass_at_k`` keyed by ``"1"``..``"K"``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["pass_at_k"] = {str(k): v for k, v in sorted(self.pass_at_k.items())}
        out["inconsistent_items"] = list(self.inconsistent_items)
        return out


@dataclass(frozen=True)
class Flips:
    """Items whose verdict changed from the suite's lowest temperature (``against``).

    On the ``items`` graded at both temperatures (an item is right when its majority
    vote is, with one sample when it passed): ``right_to_wrong`` were right at the
    lowest temperature and are wrong here, ``wrong_to_right`` the reverse;
    ``mcnemar_p`` is the two-sided exact McNemar p-value of those two counts.
    """

    against: float
    items: int
    right_to_wrong: int
    wrong_to_right: int
    mcnemar_p: float
    right_to_wrong_items: tuple[str, ...] = ()
    wrong_to_right_items: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["right_to_wrong_items"] = list(self.right_to_wrong_items)
        out["wrong_to_right_items"] = list(self.wrong_to_right_items)
        return out


@dataclass(frozen=True)
class BaselineDelta:
    """A row compared with the baseline's row, item by item.

    An item's score is the share of its graded samples that passed. On the ``items``
    both runs graded: ``accuracy`` and ``baseline_accuracy`` are the mean scores (None
    when no item is shared), ``baseline_ci_low``/``_high`` the Wilson interval of the
    baseline's graded cases of those items, ``delta`` = accuracy - baseline_accuracy
    with its paired 95% interval (``stats.paired_difference``). Item lists: score down
    (``right_to_wrong_items``), up (``wrong_to_right_items``), only in this run
    (``new_items``), only in the baseline (``missing_items``).

    ``pairs`` (this run's score, the baseline's) and the baseline's case counts are kept,
    outside the report, so that ``pool`` recomputes the delta over several rows.
    """

    items: int
    accuracy: float | None
    baseline_accuracy: float | None
    baseline_ci_low: float | None
    baseline_ci_high: float | None
    delta: float | None
    delta_ci_low: float | None
    delta_ci_high: float | None
    right_to_wrong_items: tuple[str, ...] = ()
    wrong_to_right_items: tuple[str, ...] = ()
    new_items: tuple[str, ...] = ()
    missing_items: tuple[str, ...] = ()
    pairs: tuple[tuple[float, float], ...] = field(default=(), repr=False, compare=False)
    baseline_passed: int = field(default=0, repr=False, compare=False)
    baseline_graded: int = field(default=0, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        pairs: Sequence[tuple[float, float]],
        baseline_passed: int,
        baseline_graded: int,
        *,
        right_to_wrong_items: Iterable[str] = (),
        wrong_to_right_items: Iterable[str] = (),
        new_items: Iterable[str] = (),
        missing_items: Iterable[str] = (),
    ) -> BaselineDelta:
        """The figures from the paired scores and the baseline's passed/graded cases."""
        delta = paired_difference(pairs)
        n = len(pairs)
        low, high = wilson(baseline_passed, baseline_graded) if n else (None, None)
        return cls(
            items=n,
            accuracy=math.fsum(p[0] for p in pairs) / n if n else None,
            baseline_accuracy=math.fsum(p[1] for p in pairs) / n if n else None,
            baseline_ci_low=low,
            baseline_ci_high=high,
            delta=delta.value,
            delta_ci_low=delta.low,
            delta_ci_high=delta.high,
            right_to_wrong_items=tuple(sorted(right_to_wrong_items)),
            wrong_to_right_items=tuple(sorted(wrong_to_right_items)),
            new_items=tuple(sorted(new_items)),
            missing_items=tuple(sorted(missing_items)),
            pairs=tuple(pairs),
            baseline_passed=baseline_passed,
            baseline_graded=baseline_graded,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the public figures (without the pairs and counts)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _HIDDEN}
        for name in _ITEM_LISTS:
            out[name] = list(out[name])
        return out


_HIDDEN = ("pairs", "baseline_passed", "baseline_graded")
_ITEM_LISTS = ("right_to_wrong_items", "wrong_to_right_items", "new_items", "missing_items")


@dataclass(frozen=True)
class BaselineRun:
    """The whole run against the baseline: item x temperature pairs and missing rows.

    ``shared_items`` were graded by both runs, ``new_items`` only by this one (rows the
    baseline lacks included), ``missing_items`` only by the baseline (rows this run
    lacks included); ``missing_suites`` labels (``module::suite@T``) the baseline's rows
    this run does not have.
    """

    shared_items: int = 0
    new_items: int = 0
    missing_items: int = 0
    missing_suites: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The counts for the report's top-level ``baseline`` section."""
        return {
            "shared_items": self.shared_items,
            "new_items": self.new_items,
            "missing_items": self.missing_items,
            "missing_suites": list(self.missing_suites),
        }


def pool_baseline(rows: Sequence[SuiteSummary]) -> BaselineDelta | None:
    """The rows' baseline comparisons as one, the delta recomputed on all their pairs.

    Rows without a baseline comparison are left out; None when no row has one.
    """
    parts = [r.baseline for r in rows if r.baseline is not None]
    if not parts:
        return None
    return BaselineDelta.build(
        [p for b in parts for p in b.pairs],
        sum(b.baseline_passed for b in parts),
        sum(b.baseline_graded for b in parts),
        right_to_wrong_items=[i for b in parts for i in b.right_to_wrong_items],
        wrong_to_right_items=[i for b in parts for i in b.wrong_to_right_items],
        new_items=[i for b in parts for i in b.new_items],
        missing_items=[i for b in parts for i in b.missing_items],
    )


# ---------------------------------------------------------------------- summaries
@dataclass
class SuiteSummary:
    """The figures of one suite at one temperature (or a pool of such rows).

    ``accuracy`` is passed / (passed + failed + errors), None when nothing was graded;
    ``ci_low``/``ci_high`` its 95% Wilson interval. Latency percentiles are over the
    cases that made at least one call (None when none did). ``cost_usd`` is None when
    some case used a model without a known price (listed in ``unpriced_models``); it
    counts replayed answers too, since it estimates what the answers cost to fetch.

    ``consistency``, ``flips`` and ``baseline`` are filled by ``analysis.analyze`` (None
    until then, and when they do not apply); a pooled row has only ``baseline``.
    """

    suite: str
    module: str
    temperature: float | None
    cases: int = 0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    accuracy: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    reasoning_tokens: int = 0  # included in completion_tokens
    latency_p50: float | None = None
    latency_p95: float | None = None
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    cached: int = 0
    cost_usd: float | None = 0.0
    unpriced_models: tuple[str, ...] = ()
    consistency: Consistency | None = None
    flips: Flips | None = None
    baseline: BaselineDelta | None = None
    # kept so that pooling rows (gates over temperatures, the total) gives exact
    # percentiles rather than an average of percentiles; not part of the report
    latencies: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def graded(self) -> int:
        """Cases that count towards accuracy: passed + failed + errors."""
        return self.passed + self.failed + self.errors

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the public figures (without the raw latencies)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latencies"}
        out["unpriced_models"] = list(self.unpriced_models)
        out["consistency"] = None if self.consistency is None else self.consistency.to_dict()
        out["flips"] = None if self.flips is None else self.flips.to_dict()
        out["baseline"] = None if self.baseline is None else self.baseline.to_dict()
        return out


def summarize(cases: Iterable[CaseResult], prices: PriceTable) -> list[SuiteSummary]:
    """One ``SuiteSummary`` per (module, suite, temperature), sorted by those keys."""
    groups: dict[tuple[str, str, float | None], list[CaseResult]] = {}
    for c in cases:
        groups.setdefault((c.module, c.suite, c.temperature), []).append(c)
    rows = [_summarize_group(m, s, t, cs, prices) for (m, s, t), cs in groups.items()]
    return sorted(rows, key=_sort_key)


def _sort_key(s: SuiteSummary) -> tuple[str, str, bool, float]:
    # None (a suite without temperatures) sorts before any number
    return (s.module, s.suite, s.temperature is not None, s.temperature or 0.0)


def _summarize_group(
    module: str,
    suite: str,
    temperature: float | None,
    cases: Sequence[CaseResult],
    prices: PriceTable,
) -> SuiteSummary:
    counts = {o: 0 for o in OUTCOMES}
    for c in cases:
        # an outcome this version does not know is not a pass: grade it as an error
        counts[c.outcome if c.outcome in counts else "error"] += 1
    cost: float = 0.0
    unpriced: set[str] = set()
    for c in cases:
        if c.prompt_tokens == 0 and c.completion_tokens == 0:
            continue
        # completion_tokens include the reasoning tokens: they are priced here, once
        usd = prices.cost(c.model, c.prompt_tokens, c.completion_tokens, batch=c.batch)
        if usd is None:
            unpriced.add(c.model or "<unknown model>")
        else:
            cost += usd
    return _finish(
        SuiteSummary(
            suite=suite,
            module=module,
            temperature=temperature,
            cases=len(cases),
            passed=counts["passed"],
            failed=counts["failed"],
            errors=counts["error"],
            skipped=counts["skipped"],
            prompt_tokens=sum(c.prompt_tokens for c in cases),
            completion_tokens=sum(c.completion_tokens for c in cases),
            total_tokens=sum(c.total_tokens for c in cases),
            reasoning_tokens=sum(c.reasoning_tokens for c in cases),
            requests=sum(c.requests for c in cases),
            retries=sum(c.retries for c in cases),
            rate_limited=sum(c.rate_limited for c in cases),
            cached=sum(c.cached for c in cases),
            cost_usd=None if unpriced else cost,
            unpriced_models=tuple(sorted(unpriced)),
            latencies=tuple(c.latency_s for c in cases if c.calls > 0),
        )
    )


def _finish(s: SuiteSummary) -> SuiteSummary:
    """Fill in the derived figures (accuracy, interval, percentiles) from the counts."""
    if s.graded:
        s.accuracy = s.passed / s.graded
        s.ci_low, s.ci_high = wilson(s.passed, s.graded)
    else:
        s.accuracy = s.ci_low = s.ci_high = None
    if s.latencies:
        s.latency_p50 = percentile(s.latencies, 50)
        s.latency_p95 = percentile(s.latencies, 95)
    else:
        s.latency_p50 = s.latency_p95 = None
    return s


def pool(
    rows: Sequence[SuiteSummary],
    *,
    suite: str,
    module: str = "",
    temperature: float | None = None,
) -> SuiteSummary:
    """Several rows as one: counts summed, then accuracy and percentiles recomputed.

    Pooled accuracy is sum(passed) / sum(graded), not a mean of accuracies, so a
    temperature with more cases weighs more. The baseline comparison is pooled likewise
    (``pool_baseline``: the delta over all the rows' item pairs); consistency and flips
    belong to one temperature and are None in a pool.
    """
    unpriced = sorted({m for r in rows for m in r.unpriced_models})
    return _finish(
        SuiteSummary(
            suite=suite,
            module=module,
            temperature=temperature,
            cases=sum(r.cases for r in rows),
            passed=sum(r.passed for r in rows),
            failed=sum(r.failed for r in rows),
            errors=sum(r.errors for r in rows),
            skipped=sum(r.skipped for r in rows),
            prompt_tokens=sum(r.prompt_tokens for r in rows),
            completion_tokens=sum(r.completion_tokens for r in rows),
            total_tokens=sum(r.total_tokens for r in rows),
            reasoning_tokens=sum(r.reasoning_tokens for r in rows),
            requests=sum(r.requests for r in rows),
            retries=sum(r.retries for r in rows),
            rate_limited=sum(r.rate_limited for r in rows),
            cached=sum(r.cached for r in rows),
            cost_usd=None if unpriced else sum(r.cost_usd or 0.0 for r in rows),
            unpriced_models=tuple(unpriced),
            baseline=pool_baseline(rows),
            latencies=tuple(x for r in rows for x in r.latencies),
        )
    )


def totals(summaries: Sequence[SuiteSummary]) -> SuiteSummary:
    """The whole run as one row (suite ``"TOTAL"``, no module, no temperature)."""
    return pool(summaries, suite="TOTAL")


# ---------------------------------------------------------------------- terminal table
_HEADERS = (
    "suite",
    "T",
    "cases",
    "passed",
    "acc",
    "95% CI",
    "tok in",
    "tok out",
    "p50",
    "p95",
    "req",
    "retry",
    "429",
    "cached",
    "cost",
)
# one space between the right-aligned figures (their headers keep them apart) and two
# after the suite name: with 15 columns, wider gaps would squeeze the names in 120 columns
_GAP = " "
_SUITE_GAP = "  "


def format_summary(summaries: Sequence[SuiteSummary], total: SuiteSummary) -> list[str]:
    """The summary as aligned text lines: a header, one line per row, then the total.

    The total line is shown when there is more than one row. Suite names are shortened
    in the middle so that a line stays within about 120 columns.
    """
    if not summaries:
        return ["no llmbench results"]
    labels = _labels(summaries)
    cells = [[labels[i], *_cells(s)] for i, s in enumerate(summaries)]
    if len(summaries) > 1:
        cells.append(["TOTAL", *_cells(total)])
    widths = [max(len(_HEADERS[j]), *(len(r[j]) for r in cells)) for j in range(len(_HEADERS))]
    others = sum(widths[1:]) + len(_SUITE_GAP) + len(_GAP) * (len(widths) - 2)
    widths[0] = min(widths[0], max(12, TABLE_WIDTH - others))
    lines = [_line(list(_HEADERS), widths)]
    for i, row in enumerate(cells):
        if len(summaries) > 1 and i == len(cells) - 1:
            lines.append("-" * len(lines[0]))
        lines.append(_line([_shorten(row[0], widths[0]), *row[1:]], widths))
    return lines


# ---------------------------------------------------------------------- analysis lines
_INDENT = "    "  # continuation lines of a wrapped analysis line
_MAX_NAMES = 6  # suites named in a line before "and N more"


def format_analysis(
    summaries: Sequence[SuiteSummary],
    total: SuiteSummary,
    baseline: BaselineRun | None = None,
) -> list[str]:
    """The lines under the table on samples, temperatures and the baseline; often none.

    One line per row with consistency figures (``samples=K``), per row with flips since
    the suite's lowest temperature, per row compared with the baseline (and the pooled
    total when several rows were), then what could not be compared: new and missing
    items, rows the baseline lacks and (given ``baseline``, the run-level comparison)
    the baseline's rows this run lacks. A line longer than about 120 columns wraps.
    A run of reasoning models first gets a line on their hidden reasoning tokens.
    """
    labels = [
        label if s.temperature is None else f"{label}@{s.temperature:g}"
        for label, s in zip(_labels(summaries), summaries, strict=True)
    ]
    rows = list(zip(labels, summaries, strict=True))
    parts: list[list[str]] = [_reasoning_parts(total)] if total.reasoning_tokens else []
    parts += [_consistency_parts(lb, s.consistency) for lb, s in rows if s.consistency]
    parts += [_flips_parts(lb, s.flips) for lb, s in rows if s.flips and s.flips.items]
    compared = [(lb, s.baseline) for lb, s in rows if s.baseline is not None]
    parts += [_baseline_parts(lb, b) for lb, b in compared]
    if len(compared) > 1 and total.baseline is not None and total.baseline.items:
        parts.append(_baseline_parts("TOTAL", total.baseline))
    if compared or baseline is not None:
        parts += _uncompared(rows, baseline)
    return [line for p in parts for line in _wrap(p)]


def _reasoning_parts(total: SuiteSummary) -> list[str]:
    share = total.reasoning_tokens / total.completion_tokens if total.completion_tokens else 0.0
    return [
        "llmbench reasoning:",
        f"{total.reasoning_tokens:,} of {total.completion_tokens:,} output tokens",
        f"({share * 100:.0f}%) were hidden reasoning,",
        "counted in tok out and priced as output once",
    ]


def _consistency_parts(label: str, c: Consistency) -> list[str]:
    k = c.samples
    parts = [f"llmbench consistency: {label}:"]
    maj = f"maj@{k} {_pct(c.maj_accuracy)}"
    if c.maj_ci_low is not None and c.maj_ci_high is not None:
        maj += f" [{c.maj_ci_low * 100:.1f}-{c.maj_ci_high * 100:.1f}]"
    parts.append(maj + ",")
    parts += [f"pass@{j} {_pct(c.pass_at_k.get(j))}," for j in sorted({1, k})]
    parts.append(f"agreement {_fixed(c.agreement)},")
    parts.append(f"entropy {_fixed(c.entropy)} bits,")
    parts.append(f"{len(c.inconsistent_items)} of {c.items} items inconsistent")
    return parts


def _flips_parts(label: str, f: Flips) -> list[str]:
    p = f"={f.mcnemar_p:.3f}" if f.mcnemar_p >= 0.001 else "<0.001"
    return [
        f"llmbench flips vs T={f.against:g}:",
        f"{label}:",
        f"{f.right_to_wrong} right->wrong,",
        f"{f.wrong_to_right} wrong->right of {f.items}",
        f"(McNemar p{p})",
    ]


def _baseline_parts(label: str, b: BaselineDelta) -> list[str]:
    head = ["llmbench vs baseline:", f"{label}:"]
    if not b.items or b.delta is None or b.delta_ci_low is None or b.delta_ci_high is None:
        return [
            *head,
            "no shared items",
            f"({len(b.new_items)} new,",
            f"{len(b.missing_items)} missing)",
        ]
    return [
        *head,
        f"{_pct(b.baseline_accuracy)} -> {_pct(b.accuracy)}",
        f"(delta {b.delta * 100:+.1f} pts",
        f"[{b.delta_ci_low * 100:+.1f}, {b.delta_ci_high * 100:+.1f}],",
        f"{b.items} shared item{'s' if b.items != 1 else ''};",
        *_changes(b),
    ]


def _changes(b: BaselineDelta) -> list[str]:
    down, up = len(b.right_to_wrong_items), len(b.wrong_to_right_items)
    if all(x in (0.0, 1.0) for pair in b.pairs for x in pair):
        return [f"{down} right->wrong,", f"{up} wrong->right)"]
    # with samples an item's score is a share: it went down or up, not right or wrong
    return [f"{down} scored lower,", f"{up} higher)"]


def _uncompared(
    rows: Sequence[tuple[str, SuiteSummary]], baseline: BaselineRun | None
) -> list[list[str]]:
    head = "llmbench vs baseline:"
    if baseline is not None:
        new, missing = baseline.new_items, baseline.missing_items
    else:
        new = sum(len(s.baseline.new_items) for _, s in rows if s.baseline is not None)
        missing = sum(len(s.baseline.missing_items) for _, s in rows if s.baseline is not None)
    out = []
    if new or missing:
        out.append(
            [
                head,
                f"{new} new items (not in the baseline),",
                f"{missing} missing (not in this run)",
            ]
        )
    absent = [label for label, s in rows if s.baseline is None]
    if absent:
        out.append([head, "not in the baseline:", *_names(absent)])
    if baseline is not None and baseline.missing_suites:
        out.append([head, "not in this run:", *_names(baseline.missing_suites)])
    return out


def _names(names: Sequence[str]) -> list[str]:
    shown = [f"{n}," for n in names[:_MAX_NAMES]]
    shown[-1] = shown[-1].rstrip(",")
    more = len(names) - _MAX_NAMES
    return shown + (["and", f"{more} more"] if more > 0 else [])


def _wrap(parts: Sequence[str]) -> list[str]:
    """The parts joined by spaces, a new (indented) line where one would pass the width."""
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 1 + len(part) > TABLE_WIDTH:
            lines.append(_INDENT + part)
        else:
            lines[-1] += " " + part
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _fixed(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _labels(summaries: Sequence[SuiteSummary]) -> list[str]:
    # a suite name in two files would read as one suite twice: name the file then
    modules: dict[str, set[str]] = {}
    for s in summaries:
        modules.setdefault(s.suite, set()).add(s.module)
    return [
        f"{PurePosixPath(s.module).name}::{s.suite}" if len(modules[s.suite]) > 1 else s.suite
        for s in summaries
    ]


def _cells(s: SuiteSummary) -> list[str]:
    ci = "-" if s.ci_low is None or s.ci_high is None else format_ci(s.ci_low, s.ci_high)
    return [
        "-" if s.temperature is None else f"{s.temperature:g}",
        str(s.cases),
        str(s.passed),
        "-" if s.accuracy is None else f"{s.accuracy:.3f}",
        ci,
        _count(s.prompt_tokens),
        _count(s.completion_tokens),
        _seconds(s.latency_p50),
        _seconds(s.latency_p95),
        str(s.requests),
        str(s.retries),
        str(s.rate_limited),
        str(s.cached),
        format_cost(s.cost_usd),
    ]


def _line(cells: list[str], widths: list[int]) -> str:
    first = cells[0].ljust(widths[0])
    rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
    return (first + _SUITE_GAP + _GAP.join(rest)).rstrip()


def _shorten(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    # keep both ends: suites tend to share a "test_" prefix and differ at the end
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "…" + text[len(text) - tail :]


def _count(n: int) -> str:
    if n < 10_000:
        return str(n)
    if n < 999_950:  # beyond, "1000.0k" would be printed
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 10:
        return f"{x:.2f}s"
    if x < 100:
        return f"{x:.1f}s"
    return f"{x:.0f}s"


def format_ci(low: float, high: float) -> str:
    """An interval with two decimals joined by an en dash (U+2013), as printed."""
    return f"{low:.2f}\u2013{high:.2f}"


def format_cost(usd: float | None) -> str:
    """A cost for people: ``$0.0123``, ``$12.34``, ``$1,234``; ``?`` when unknown."""
    if usd is None:
        return "?"
    if usd < 1:
        return f"${usd:.4f}"
    if usd < 1000:
        return f"${usd:.2f}"
    return f"${usd:,.0f}"
