"""CI gates: ``--llm-gate 'SUITE[@T]:METRIC OP VALUE'`` parsed into checks.

As pytest-benchmark does with ``--benchmark-compare-fail``, each option value is parsed
up front into a ``Gate`` (so a typo is a usage error before any API call) and judged
against the run's summaries at the end (``evaluate``).

- SUITE: a test function name (``test_truthfulqa``), ``path::name``
  (``example_suites/test_truthfulqa.py::test_truthfulqa``, or any trailing part of the
  path), or an fnmatch glob of either (``test_*``, ``*``). A glob is checked for each
  suite it matches, as if written once per suite.
- ``@T``: only the cases at temperature T. Without it the suite's temperatures are
  pooled: counts are summed, then accuracy = sum(passed) / sum(graded).
- METRIC: see ``METRICS``. OP: one of ``OPS``. VALUE: a number, or a percentage
  (``70%``) for the fractions ``accuracy`` and ``ci_low``.

A gate that matches no results fails: a misspelt suite name must not pass CI silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from .errors import ConfigError
from .results import SuiteSummary, format_ci, format_cost, pool

__all__ = ["METRICS", "OPS", "Gate", "GateResult", "evaluate", "parse_gate"]

#: The comparison operators a gate may use.
OPS = (">=", ">", "<=", "<", "==", "!=")

_Getter = Callable[[SuiteSummary], "float | None"]


@dataclass(frozen=True)
class _Metric:
    get: _Getter
    kind: str  # "fraction", "delta", "count", "usd" or "seconds": how values parse and print
    doc: str
    ci: Callable[[SuiteSummary], tuple[float | None, float | None]] | None = None
    n: Callable[[SuiteSummary], int] | None = None  # what the value is measured over


def _base(s: SuiteSummary, name: str) -> float | None:
    b = s.baseline
    return None if b is None else getattr(b, name)


def _cons(s: SuiteSummary, name: str) -> float | None:
    c = s.consistency
    return None if c is None else getattr(c, name)


def _base_ci(s: SuiteSummary) -> tuple[float | None, float | None]:
    return _base(s, "delta_ci_low"), _base(s, "delta_ci_high")


def _base_items(s: SuiteSummary) -> int:
    return 0 if s.baseline is None else s.baseline.items


def _cons_items(s: SuiteSummary) -> int:
    return 0 if s.consistency is None else s.consistency.items


def _accuracy_ci(s: SuiteSummary) -> tuple[float | None, float | None]:
    return s.ci_low, s.ci_high


#: Metric name -> how it is read from a summary.
METRICS: Mapping[str, _Metric] = {
    "accuracy": _Metric(
        lambda s: s.accuracy,
        "fraction",
        "passed / (passed + failed + errors)",
        _accuracy_ci,
        lambda s: s.graded,
    ),
    "ci_low": _Metric(
        lambda s: s.ci_low,
        "fraction",
        "lower bound of accuracy's 95% Wilson interval (the strict gate)",
        _accuracy_ci,
        lambda s: s.graded,
    ),
    "delta": _Metric(
        lambda s: _base(s, "delta"),
        "delta",
        "accuracy minus the baseline's (`--llm-baseline`), paired on the items both runs "
        "share; negative is a drop",
        _base_ci,
        _base_items,
    ),
    "delta_ci_low": _Metric(
        lambda s: _base(s, "delta_ci_low"),
        "delta",
        "lower bound of that difference's 95% interval: `delta_ci_low>=-0.02` fails only a "
        "drop beyond noise",
        _base_ci,
        _base_items,
    ),
    "delta_ci_high": _Metric(
        lambda s: _base(s, "delta_ci_high"),
        "delta",
        "upper bound of that interval: `delta_ci_high<0` fails unless the drop is certain",
        _base_ci,
        _base_items,
    ),
    "maj_accuracy": _Metric(
        lambda s: _cons(s, "maj_accuracy"),
        "fraction",
        "with `samples=K`: accuracy of the majority answer per item (maj@K)",
        lambda s: (_cons(s, "maj_ci_low"), _cons(s, "maj_ci_high")),
        _cons_items,
    ),
    "agreement": _Metric(
        lambda s: _cons(s, "agreement"),
        "fraction",
        "with `samples=K`: mean share of an item's samples giving its most common answer",
        lambda s: (_cons(s, "agreement_ci_low"), _cons(s, "agreement_ci_high")),
        _cons_items,
    ),
    "passed": _Metric(lambda s: s.passed, "count", "cases passed"),
    "failed": _Metric(lambda s: s.failed, "count", "cases failed (wrong answers)"),
    "errors": _Metric(lambda s: s.errors, "count", "cases ended by an API or setup error"),
    "cases": _Metric(lambda s: s.cases, "count", "cases run, skipped ones included"),
    "cost": _Metric(lambda s: s.cost_usd, "usd", "estimated cost in USD"),
    "tokens": _Metric(lambda s: s.total_tokens, "count", "total tokens"),
    "p95_latency": _Metric(
        lambda s: s.latency_p95, "seconds", "95th percentile of per-case latency, seconds"
    ),
    "rate_limited": _Metric(lambda s: s.rate_limited, "count", "429 responses received"),
}

_SYNTAX = "expected SUITE[@T]:METRIC OP VALUE, e.g. 'test_qa:accuracy>=0.7'"
_OP_RUN = re.compile(r"[<>=!]+")


@dataclass(frozen=True)
class Gate:
    """One parsed ``--llm-gate``; ``threshold`` is a fraction when given as a percentage."""

    text: str
    suite: str
    temperature: float | None
    metric: str
    op: str
    threshold: float

    def matches(self, summary: SuiteSummary) -> bool:
        """Whether the summary row is one of this gate's suite (and temperature)."""
        if self.temperature is not None and (
            summary.temperature is None or not _same_temperature(summary.temperature, self)
        ):
            return False
        return self.matches_suite(summary)

    def matches_suite(self, summary: SuiteSummary) -> bool:
        """Whether the row's suite matches, whatever its temperature."""
        if "::" not in self.suite:
            return fnmatchcase(summary.suite, self.suite)
        full = f"{summary.module}::{summary.suite}"
        # paths are relative to rootdir; accept them relative to a sub-directory too
        return fnmatchcase(full, self.suite) or fnmatchcase(full, "*/" + self.suite)

    def holds(self, value: float) -> bool:
        """Whether ``value OP threshold`` is true.

        Equality is judged with a relative tolerance of 1e-9, so that a cost summed in
        floating point or 0.7 measured as 7/10 meets a bound written as the same number.
        """
        close = math.isclose(value, self.threshold, rel_tol=1e-9, abs_tol=1e-12)
        if self.op == ">=":
            return value > self.threshold or close
        if self.op == ">":
            return value > self.threshold and not close
        if self.op == "<=":
            return value < self.threshold or close
        if self.op == "<":
            return value < self.threshold and not close
        if self.op == "==":
            return close
        return not close


@dataclass(frozen=True)
class GateResult:
    """A gate judged on one suite: the measured value, its interval and the verdict.

    ``target`` names the suite that was measured (None when nothing matched);
    ``ci`` is the 95% Wilson interval for ``accuracy`` and ``ci_low`` gates.
    """

    gate: Gate
    value: float | None
    ci: tuple[float, float] | None
    passed: bool
    message: str
    target: str | None = None
    cases: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, as in the report's ``gates`` list."""
        return {
            "gate": self.gate.text,
            "suite": self.target,
            "temperature": self.gate.temperature,
            "metric": self.gate.metric,
            "op": self.gate.op,
            "threshold": self.gate.threshold,
            "value": self.value,
            "ci_low": None if self.ci is None else self.ci[0],
            "ci_high": None if self.ci is None else self.ci[1],
            "cases": self.cases,
            "passed": self.passed,
            "message": self.message,
        }


# ---------------------------------------------------------------------- parsing
def parse_gate(text: str) -> Gate:
    """Parse ``SUITE[@T]:METRIC OP VALUE``; ConfigError names the gate and what is allowed."""
    raw = text.strip()
    where = f"gate {raw!r}"
    m = _OP_RUN.search(raw)
    if m is None:
        raise ConfigError(f"{where}: no comparison; {_SYNTAX} (OP one of {', '.join(OPS)})")
    op = m.group()
    if op not in OPS:
        raise ConfigError(f"{where}: unknown operator {op!r}; allowed: {', '.join(OPS)}")
    lhs, value_text = raw[: m.start()].strip(), raw[m.end() :].strip()
    target, colon, metric = lhs.rpartition(":")
    metric = metric.strip()
    if not colon:
        raise ConfigError(f"{where}: missing ':METRIC'; {_SYNTAX}")
    if metric not in METRICS:
        what = f"unknown metric {metric!r}" if metric else "missing metric"
        raise ConfigError(f"{where}: {what}; metrics: {', '.join(METRICS)}")
    suite, temperature = _split_temperature(where, target.strip())
    if not suite:
        raise ConfigError(
            f"{where}: empty suite; name a test function, path::name or a glob such as '*'"
        )
    threshold = _parse_value(where, metric, value_text)
    return Gate(raw, suite, temperature, metric, op, threshold)


def _split_temperature(where: str, target: str) -> tuple[str, float | None]:
    suite, at, t_text = target.rpartition("@")
    if not at:
        return target, None
    try:
        t = float(t_text)
    except ValueError:
        t = math.nan
    if not math.isfinite(t) or t < 0:
        raise ConfigError(
            f"{where}: bad temperature {t_text!r} after '@'; "
            "expected a number such as 'test_qa@0.5:accuracy>=0.7'"
        )
    return suite.strip(), t


def _parse_value(where: str, metric: str, text: str) -> float:
    kind = METRICS[metric].kind
    percent = text.endswith("%")
    number = text[:-1].strip() if percent else text
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not number or not math.isfinite(value):
        example = "0.7 or 70%" if kind == "fraction" else "a number such as 10 or 1.5"
        raise ConfigError(f"{where}: value {text!r} is not a number; expected {example}")
    if percent and kind not in ("fraction", "delta"):
        raise ConfigError(
            f"{where}: a percentage is only allowed for fractions and differences "
            f"(accuracy, ci_low, delta, ...); give {metric} as a number"
        )
    if percent:
        value /= 100
    if kind == "fraction" and not 0 <= value <= 1:
        # accuracy>=70 is surely meant as 70%, and would fail every run
        raise ConfigError(f"{where}: {metric} is a fraction in [0, 1]; write e.g. 0.7 or 70%")
    if kind == "delta":
        if not -1 <= value <= 1:
            raise ConfigError(
                f"{where}: {metric} is a difference of fractions in [-1, 1]; "
                "write e.g. -0.02 or -2%"
            )
        return value
    if value < 0:
        raise ConfigError(f"{where}: {metric} cannot be negative")
    return value


def _same_temperature(t: float, gate: Gate) -> bool:
    return gate.temperature is not None and abs(t - gate.temperature) <= 1e-9


# ---------------------------------------------------------------------- evaluation
def evaluate(gates: Sequence[Gate], summaries: Sequence[SuiteSummary]) -> list[GateResult]:
    """Judge every gate; one result per gate and matched suite, in gate order.

    A gate that matches no row yields one failed result "no results for suite X".
    """
    results: list[GateResult] = []
    for gate in gates:
        rows = [s for s in summaries if gate.matches(s)]
        if not rows:
            results.append(_no_results(gate, summaries))
            continue
        groups: dict[tuple[str, str], list[SuiteSummary]] = {}
        for s in rows:
            groups.setdefault((s.module, s.suite), []).append(s)
        names = [suite for _, suite in groups]
        for (module, suite), group in groups.items():
            label = suite if names.count(suite) == 1 else f"{module}::{suite}"
            row = (
                group[0]
                if len(group) == 1
                else pool(group, suite=suite, module=module, temperature=gate.temperature)
            )
            results.append(_judge(gate, row, label))
    return results


def _judge(gate: Gate, row: SuiteSummary, label: str) -> GateResult:
    metric = METRICS[gate.metric]
    value = metric.get(row)
    ci = metric.ci(row) if metric.ci is not None else None
    ci_pair = None if ci is None or ci[0] is None or ci[1] is None else (ci[0], ci[1])
    n = metric.n(row) if metric.n is not None else row.cases
    what = {"delta": "shared item", "maj_accuracy": "item", "agreement": "item"}.get(
        gate.metric.removesuffix("_ci_low").removesuffix("_ci_high"), "case"
    )
    head = gate.text if label == gate.suite else f"{gate.text} ({label})"
    if value is None:
        why = _why_missing(gate.metric, row)
        return GateResult(gate, None, None, False, f"FAIL {head} — {why}", label, n)
    value = float(value)
    ok = gate.holds(value)
    measured = f"measured {_format_value(metric.kind, value)}"
    if ci_pair is not None:
        measured += f" (95% CI {_format_ci(metric.kind, ci_pair)})"
    measured += f" over {n} {what}{'s' if n != 1 else ''}"
    if metric.kind == "fraction" and row.skipped:
        measured += f" ({row.skipped} skipped)"
    verdict = "PASS" if ok else "FAIL"
    return GateResult(gate, value, ci_pair, ok, f"{verdict} {head} — {measured}", label, n)


def _why_missing(metric: str, row: SuiteSummary) -> str:
    if metric.startswith("delta"):
        if row.baseline is None:
            return "the baseline has no results for this suite and temperature"
        return f"no graded item shared with the baseline ({len(row.baseline.new_items)} new)"
    if metric in ("maj_accuracy", "agreement"):
        return "no item with several graded samples (samples=K in the suite's marker)"
    if metric in ("accuracy", "ci_low"):
        return f"no graded cases ({row.cases} case(s), {row.skipped} skipped)"
    if metric == "cost":
        return "cost unknown: no price for model(s) " + ", ".join(row.unpriced_models)
    return f"no latency measured: none of the {row.cases} case(s) made a call"


def _no_results(gate: Gate, summaries: Sequence[SuiteSummary]) -> GateResult:
    msg = f"FAIL {gate.text} — no results for suite {gate.suite}"
    if gate.temperature is not None:
        msg += f" at temperature {gate.temperature:g}"
        ran = sorted(
            {s.temperature for s in summaries if gate.matches_suite(s)},
            key=lambda t: (t is not None, t or 0.0),
        )
        if ran:
            msg += " (temperatures run: " + ", ".join(_temp(t) for t in ran) + ")"
    return GateResult(gate, None, None, False, msg, None, 0)


def _temp(t: float | None) -> str:
    return "none" if t is None else f"{t:g}"


def _format_ci(kind: str, ci: tuple[float, float]) -> str:
    if kind == "delta":
        return f"{ci[0]:+.3f} to {ci[1]:+.3f}"
    return format_ci(*ci)


def _format_value(kind: str, value: float) -> str:
    if kind == "delta":
        return f"{value:+.3f}"
    if kind == "fraction":
        return f"{value:.3f}"
    if kind == "usd":
        return format_cost(value)
    if kind == "seconds":
        return f"{value:.2f}s"
    return f"{value:g}" if value != int(value) else str(int(value))
