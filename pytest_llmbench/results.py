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

__all__ = [
    "OUTCOMES",
    "CaseResult",
    "SuiteSummary",
    "format_ci",
    "format_cost",
    "format_summary",
    "percentile",
    "pool",
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


# ---------------------------------------------------------------------- summaries
@dataclass
class SuiteSummary:
    """The figures of one suite at one temperature (or a pool of such rows).

    ``accuracy`` is passed / (passed + failed + errors), None when nothing was graded;
    ``ci_low``/``ci_high`` its 95% Wilson interval. Latency percentiles are over the
    cases that made at least one call (None when none did). ``cost_usd`` is None when
    some case used a model without a known price (listed in ``unpriced_models``); it
    counts replayed answers too, since it estimates what the answers cost to fetch.
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
    latency_p50: float | None = None
    latency_p95: float | None = None
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    cached: int = 0
    cost_usd: float | None = 0.0
    unpriced_models: tuple[str, ...] = ()
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
    temperature with more cases weighs more.
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
            requests=sum(r.requests for r in rows),
            retries=sum(r.retries for r in rows),
            rate_limited=sum(r.rate_limited for r in rows),
            cached=sum(r.cached for r in rows),
            cost_usd=None if unpriced else sum(r.cost_usd or 0.0 for r in rows),
            unpriced_models=tuple(unpriced),
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
