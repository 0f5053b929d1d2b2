"""The HTML report (``--llm-html PATH``): one self-contained page of a run's JSON report.

``render_html`` turns the dict ``report.build_report`` makes (see ``REPORT_SCHEMA_DOC``)
into one HTML file that needs no network: Plotly's own JavaScript bundle is inlined once,
each suite's chart is a Plotly figure div, and the items (question, expected answer, every
temperature's and sample's answer) are embedded once as JSON, which a small script in the
template renders a page at a time, always through ``textContent`` (answers are untrusted).

Plotly and Jinja2 are the ``html`` extra: they are imported only when a page is rendered,
and ``html_missing`` tells the plugin at configure time whether they are installed.

This module is a leaf: it imports the standard library and ``errors`` only.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text_atomically
from .errors import ConfigError

__all__ = ["ITEMS_PER_PAGE", "MISSING_MESSAGE", "html_missing", "render_html", "write_html"]

#: The usage error when the ``html`` extra is not installed.
MISSING_MESSAGE = "--llm-html needs plotly and jinja2: pip install 'pytest-llmbench[html]'"
#: Items shown per page of the items table.
ITEMS_PER_PAGE = 100

_TEMPLATES = Path(__file__).resolve().parent / "templates"
_TEMPLATE = "report.html.j2"
#: a response or error longer than this is cut in the page (questions are kept whole)
_MAX_TEXT = 4000
#: item flags, as the page's script reads them
_FAILED, _FLIPPED, _INCONSISTENT, _CHANGED = 1, 2, 4, 8
_OUTCOME_CODES = {"passed": "p", "failed": "f", "error": "e", "skipped": "s"}
_EXIT_STATUS = {
    0: "all passed",
    1: "tests failed",
    2: "interrupted",
    3: "internal error",
    4: "usage error",
    5: "no tests collected",
    6: "stopped: the API refused",
}
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
_COLORS = {
    "accuracy": "#2563eb",
    "maj": "#d97706",
    "agreement": "#059669",
    "baseline": "#6b7280",
}


# ---------------------------------------------------------------------- API
def html_missing() -> str | None:
    """The usage error to give when Plotly or Jinja2 is missing, else None."""
    try:
        _libraries()
    except ConfigError as exc:
        return str(exc)
    return None


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (no network needed to view it).

    Raises ConfigError (``MISSING_MESSAGE``) when Plotly or Jinja2 is not installed.
    """
    libs = _libraries()
    env = libs.jinja2.Environment(
        loader=libs.jinja2.FileSystemLoader(str(_TEMPLATES)),
        autoescape=True,
        undefined=libs.jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    run = _mapping(report.get("run"))
    suites = _suite_views(libs, _list(report.get("suites")))
    items = _item_data(report)
    page: str = env.get_template(_TEMPLATE).render(
        title=_title(run),
        run=_run_view(run),
        glance=_glance(run, _mapping(report.get("totals")), _list(report.get("gates"))),
        gates=[_gate_view(g) for g in _list(report.get("gates")) if isinstance(g, Mapping)],
        baseline=_baseline_view(report.get("baseline")),
        suites=suites,
        items_json=script_json(items),
        item_count=len(items["items"]),
        has_baseline=any(s["baseline_rows"] for s in suites) or bool(report.get("baseline")),
        plotly_js=libs.plotly_js(),
    )
    return page


def write_html(path: str | Path, report: Mapping[str, Any]) -> None:
    """Render the report and write it to ``path`` atomically (old file or new, never half).

    Parent directories are created. Raises ConfigError naming ``--llm-html`` and the path
    when it cannot be written, or ``MISSING_MESSAGE`` without the ``html`` extra.
    """
    write_text_atomically(Path(path), render_html(report), "--llm-html")


def script_json(data: Any) -> str:
    """``data`` as JSON safe inside ``<script type="application/json">``.

    Every ``<``, ``>`` and ``&`` is written as a ``\\u`` escape, so no text (``</script>``,
    ``<!--``) can close or change the element; ``JSON.parse`` reads the escapes back.
    """
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    # valid JSON, but line terminators in a JavaScript source before ES2019
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


# ---------------------------------------------------------------------- the libraries
@dataclass(frozen=True)
class _Libraries:
    go: Any  # plotly.graph_objects
    pio: Any  # plotly.io
    plotly_js: Callable[[], str]
    jinja2: Any


def _libraries() -> _Libraries:
    try:
        go = importlib.import_module("plotly.graph_objects")
        pio = importlib.import_module("plotly.io")
        offline = importlib.import_module("plotly.offline")
        jinja2 = importlib.import_module("jinja2")
    except ImportError:
        raise ConfigError(MISSING_MESSAGE) from None
    return _Libraries(go, pio, offline.get_plotlyjs, jinja2)


# ---------------------------------------------------------------------- formatting
def _num(value: Any) -> float | None:
    """A finite number, else None (a report read from a file may hold anything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> str:
    n = _num(value)
    return "-" if n is None else f"{round(n):,}"


def _pct(value: Any) -> str:
    n = _num(value)
    return "-" if n is None else f"{100 * n:.1f}%"


def _ci(low: Any, high: Any) -> str:
    lo, hi = _num(low), _num(high)
    return "" if lo is None or hi is None else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def _fraction(value: Any) -> str:
    n = _num(value)
    return "-" if n is None else f"{n:.2f}"


def _fraction_ci(low: Any, high: Any) -> str:
    lo, hi = _num(low), _num(high)
    return "" if lo is None or hi is None else f"[{lo:.2f}, {hi:.2f}]"


def _points(value: Any) -> str:
    """A difference of fractions in percentage points, signed."""
    n = _num(value)
    return "-" if n is None else f"{100 * n:+.1f} pts"


def _usd(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "unknown"
    if 0 < n < 0.0001:
        return "<$0.0001"
    return f"${n:,.2f}" if n >= 1 or n == 0 else f"${n:.4f}"


def _seconds(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "-"
    if n < 1:
        return f"{1000 * n:.0f} ms"
    if n < 60:
        return f"{n:.2f} s"
    minutes, secs = divmod(round(n), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _temp(value: Any) -> str:
    n = _num(value)
    return "-" if n is None else f"{n:g}"


def _p_value(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "-"
    return "<0.001" if n < 0.001 else f"{n:.3f}"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _count(value: Any) -> int:
    """How many: an integer, or the length of a list of ids."""
    if isinstance(value, (list, tuple)):
        return len(value)
    n = _num(value)
    return 0 if n is None else round(n)


# ---------------------------------------------------------------------- the run
def _title(run: Mapping[str, Any]) -> str:
    model = _text(run.get("model")) or "unknown model"
    started = _text(run.get("started_at"))
    return f"llmbench report: {model}" + (f", {started}" if started else "")


def _glance(
    run: Mapping[str, Any], totals: Mapping[str, Any], gates: Sequence[Any]
) -> list[dict[str, str]]:
    """The cards at the top: label, value, a line under it, and a state (ok/bad/"")."""
    status = run.get("exit_status")
    status_text = "-" if status is None else f"{status}"
    passed_gates = sum(1 for g in gates if isinstance(g, Mapping) and g.get("passed"))
    unpriced = ", ".join(str(m) for m in _list(totals.get("unpriced_models")))
    return [
        _card("Model", _text(run.get("model")) or "-", _text(run.get("origin"))),
        _card("Mode", _text(run.get("mode")), f"{_int(run.get('workers'))} xdist workers"),
        _card(
            "Cases",
            _int(totals.get("cases")),
            f"{_int(totals.get('passed'))} passed, {_int(totals.get('failed'))} failed, "
            f"{_int(totals.get('errors'))} errors, {_int(totals.get('skipped'))} skipped",
        ),
        _card(
            "Accuracy",
            _pct(totals.get("accuracy")),
            f"95% CI {_ci(totals.get('ci_low'), totals.get('ci_high')) or '-'}",
        ),
        _card("Cost", _usd(totals.get("cost_usd")), f"no price for {unpriced}" if unpriced else ""),
        _card(
            "Tokens",
            _int(totals.get("total_tokens")),
            f"{_int(totals.get('prompt_tokens'))} in, {_int(totals.get('completion_tokens'))} out",
        ),
        _card("Wall time", _seconds(run.get("wall_time_s")), _text(run.get("started_at"))),
        _card(
            "Requests",
            _int(totals.get("requests")),
            f"{_int(totals.get('retries'))} retries, {_int(totals.get('cached'))} cached",
        ),
        _card(
            "429s",
            _int(totals.get("rate_limited")),
            "rate-limited responses",
            "warn" if _count(totals.get("rate_limited")) else "",
        ),
        _card(
            "Latency p50",
            _seconds(totals.get("latency_p50")),
            f"p95 {_seconds(totals.get('latency_p95'))}",
        ),
        _card(
            "Exit status",
            status_text,
            _EXIT_STATUS.get(status, "") if isinstance(status, int) else "",
            "" if status is None else ("ok" if status == 0 else "bad"),
        ),
        _card(
            "Gates",
            f"{passed_gates}/{len(gates)}" if gates else "none",
            "passed" if gates else "no --llm-gate given",
            "" if not gates else ("ok" if passed_gates == len(gates) else "bad"),
        ),
    ]


def _card(label: str, value: str, sub: str, state: str = "") -> dict[str, str]:
    return {"label": label, "value": value, "sub": sub, "state": state}


def _gate_view(gate: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "gate": _text(gate.get("gate")),
        "suite": _text(gate.get("suite")) or "(no match)",
        "passed": bool(gate.get("passed")),
        "message": _text(gate.get("message")),
    }


def _run_view(run: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every field of ``run`` as (name, text), for the details block."""
    rows = []
    for key, value in run.items():
        if isinstance(value, (Mapping, list, tuple)):
            if key == "pytest_args":
                text = " ".join(str(a) for a in value)
            else:
                text = json.dumps(value, ensure_ascii=False, default=str)
        else:
            text = _text(value)
        rows.append((str(key), text))
    return rows


def _baseline_view(baseline: Any) -> dict[str, str] | None:
    if not isinstance(baseline, Mapping):
        return None
    missing_suites = [str(s) for s in _list(baseline.get("missing_suites"))]
    return {
        "path": _text(baseline.get("path")),
        "model": _text(baseline.get("model")) or "-",
        "mode": _text(baseline.get("mode")) or "-",
        "started_at": _text(baseline.get("started_at")) or "-",
        "shared_items": _int(_count(baseline.get("shared_items"))),
        "new_items": _int(_count(baseline.get("new_items"))),
        "missing_items": _int(_count(baseline.get("missing_items"))),
        "missing_suites": ", ".join(missing_suites),
    }


# ---------------------------------------------------------------------- suites
def _suite_groups(rows: Iterable[Any]) -> list[list[Mapping[str, Any]]]:
    """The rows of ``suites[]`` grouped by (module, suite), in the report's order."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if isinstance(row, Mapping):
            key = (_text(row.get("module")), _text(row.get("suite")))
            groups.setdefault(key, []).append(row)
    return list(groups.values())


def _suite_views(libs: _Libraries, rows: Sequence[Any]) -> list[dict[str, Any]]:
    views = []
    for i, group in enumerate(_suite_groups(rows)):
        first = group[0]
        views.append(
            {
                "anchor": f"suite-{i}",
                "name": _text(first.get("suite")),
                "module": _text(first.get("module")),
                "chart": _chart(libs, group, f"llmbench-chart-{i}"),
                "rows": [_summary_row(r) for r in group],
                "consistency_rows": [_consistency_row(r) for r in group if _has(r, "consistency")],
                "flips_rows": [_flips_row(r) for r in group if _has(r, "flips")],
                "baseline_rows": [_baseline_row(r) for r in group if _has(r, "baseline")],
            }
        )
    return views


def _has(row: Mapping[str, Any], key: str) -> bool:
    return isinstance(row.get(key), Mapping)


def _summary_row(row: Mapping[str, Any]) -> dict[str, str]:
    unpriced = ", ".join(str(m) for m in _list(row.get("unpriced_models")))
    return {
        "t": _temp(row.get("temperature")),
        "cases": _int(row.get("cases")),
        "passed": _int(row.get("passed")),
        "failed": _int(row.get("failed")),
        "errors": _int(row.get("errors")),
        "accuracy": _pct(row.get("accuracy")),
        "ci": _ci(row.get("ci_low"), row.get("ci_high")),
        "tokens": _int(row.get("total_tokens")),
        "cost": _usd(row.get("cost_usd")),
        "cost_note": f"no price for {unpriced}" if unpriced else "",
        "p50": _seconds(row.get("latency_p50")),
        "p95": _seconds(row.get("latency_p95")),
        "requests": _int(row.get("requests")),
        "rate_limited": _int(row.get("rate_limited")),
    }


def _consistency_row(row: Mapping[str, Any]) -> dict[str, str]:
    c = _mapping(row.get("consistency"))
    pass_at = _mapping(c.get("pass_at_k"))
    ks = sorted((k for k in pass_at if str(k).isdigit()), key=int)
    return {
        "t": _temp(row.get("temperature")),
        "samples": _int(c.get("samples")),
        "n_items": _int(c.get("items")),
        "maj": _pct(c.get("maj_accuracy")),
        "maj_ci": _ci(c.get("maj_ci_low"), c.get("maj_ci_high")),
        "pass_at_k": ", ".join(f"@{k} {_pct(pass_at[k])}" for k in ks) or "-",
        "agreement": _fraction(c.get("agreement")),
        "agreement_ci": _fraction_ci(c.get("agreement_ci_low"), c.get("agreement_ci_high")),
        "entropy": _fraction(c.get("entropy")),
        "entropy_ci": _fraction_ci(c.get("entropy_ci_low"), c.get("entropy_ci_high")),
        "inconsistent": _int(_count(c.get("inconsistent_items"))),
    }


def _flips_row(row: Mapping[str, Any]) -> dict[str, str]:
    f = _mapping(row.get("flips"))
    p = _num(f.get("mcnemar_p"))
    return {
        "t": _temp(row.get("temperature")),
        "against": _temp(f.get("against")),
        "n_items": _int(f.get("items")),
        "right_to_wrong": _int(_count(f.get("right_to_wrong"))),
        "wrong_to_right": _int(_count(f.get("wrong_to_right"))),
        "p": _p_value(p),
        "state": "bad" if p is not None and p < 0.05 else "",
    }


def _baseline_row(row: Mapping[str, Any]) -> dict[str, str]:
    b = _mapping(row.get("baseline"))
    low, high = _num(b.get("delta_ci_low")), _num(b.get("delta_ci_high"))
    state = ""
    if high is not None and high < 0:
        state = "bad"
    elif low is not None and low > 0:
        state = "ok"
    interval = "" if low is None or high is None else f"[{100 * low:+.1f}, {100 * high:+.1f}]"
    return {
        "t": _temp(row.get("temperature")),
        "n_items": _int(b.get("items")),
        "accuracy": _pct(b.get("accuracy")),
        "baseline": _pct(b.get("baseline_accuracy")),
        "baseline_ci": _ci(b.get("baseline_ci_low"), b.get("baseline_ci_high")),
        "delta": _points(b.get("delta")),
        "delta_ci": interval,
        "state": state,
        "right_to_wrong": _int(_count(b.get("right_to_wrong_items"))),
        "wrong_to_right": _int(_count(b.get("wrong_to_right_items"))),
        "new": _int(_count(b.get("new_items"))),
        "missing": _int(_count(b.get("missing_items"))),
    }


# ---------------------------------------------------------------------- charts
_Triple = tuple[float | None, float | None, float | None]


def _chart(libs: _Libraries, rows: Sequence[Mapping[str, Any]], div_id: str) -> str:
    """Accuracy against temperature with 95% error bars, as a Plotly div (no plotly.js)."""
    xs, categorical = _x_values(rows)
    fig = libs.go.Figure()
    fig.add_trace(
        _trace(libs, "accuracy", xs, [_triple(r, "accuracy", "ci_low", "ci_high") for r in rows])
    )
    cons = [_mapping(r.get("consistency")) for r in rows]
    k = max((_count(c.get("samples")) for c in cons), default=0)
    if k > 1:
        maj = [_triple(c, "maj_accuracy", "maj_ci_low", "maj_ci_high") for c in cons]
        agree = [_triple(c, "agreement", "agreement_ci_low", "agreement_ci_high") for c in cons]
        fig.add_trace(_trace(libs, f"maj@{k}", xs, maj, color=_COLORS["maj"], symbol="diamond"))
        fig.add_trace(
            _trace(libs, "agreement", xs, agree, color=_COLORS["agreement"], symbol="square")
        )
    base = [_mapping(r.get("baseline")) for r in rows]
    if any(base):
        triples = [
            _triple(b, "baseline_accuracy", "baseline_ci_low", "baseline_ci_high") for b in base
        ]
        fig.add_trace(_trace(libs, "baseline", xs, triples, color=_COLORS["baseline"], dash="dash"))
    fig.update_layout(_layout(categorical, len(fig.data)))
    if not categorical:  # ticks at the temperatures run, not at round numbers between them
        fig.update_xaxes(tickvals=sorted(set(xs)), ticktext=[_temp(t) for t in sorted(set(xs))])
    html: str = libs.pio.to_html(
        fig,
        include_plotlyjs=False,
        include_mathjax=False,
        full_html=False,
        div_id=div_id,
        config=_PLOTLY_CONFIG,
        default_width="100%",
        default_height="300px",
        validate=True,
    )
    return html


def _x_values(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Any], bool]:
    """The temperatures as numbers, or as labels when some row has none."""
    temps = [_num(r.get("temperature")) for r in rows]
    if all(t is not None for t in temps):
        return temps, False
    return [("T " + _temp(t)) if t is not None else "no temperature" for t in temps], True


def _triple(data: Mapping[str, Any], value: str, low: str, high: str) -> _Triple:
    return _num(data.get(value)), _num(data.get(low)), _num(data.get(high))


def _trace(
    libs: _Libraries,
    name: str,
    xs: Sequence[Any],
    triples: Sequence[_Triple],
    *,
    color: str = _COLORS["accuracy"],
    symbol: str = "circle",
    dash: str = "solid",
) -> Any:
    """A scatter trace with asymmetric error bars from each (value, low, high)."""
    ys = [y for y, _, _ in triples]
    plus = [max(0.0, hi - y) if y is not None and hi is not None else 0.0 for y, _, hi in triples]
    minus = [max(0.0, y - lo) if y is not None and lo is not None else 0.0 for y, lo, _ in triples]
    interval = [_ci(lo, hi) or "no interval" for _, lo, hi in triples]
    return libs.go.Scatter(
        name=name,
        x=list(xs),
        y=ys,
        mode="lines+markers",
        offsetgroup=name,
        line={"color": color, "dash": dash, "width": 2},
        marker={"color": color, "symbol": symbol, "size": 8},
        error_y={
            "type": "data",
            "symmetric": False,
            "array": plus,
            "arrayminus": minus,
            "color": color,
            "thickness": 1.5,
            "width": 4,
        },
        customdata=interval,
        hovertemplate="%{y:.1%} %{customdata}<extra>%{fullData.name}, T %{x}</extra>",
    )


def _layout(categorical: bool, traces: int) -> dict[str, Any]:
    grid = "#e5e7eb"
    return {
        "template": "none",
        "margin": {"l": 56, "r": 16, "t": 28, "b": 40},
        "font": {"family": "system-ui, -apple-system, 'Segoe UI', sans-serif", "size": 12},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "showlegend": traces > 1,
        "legend": {"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom"},
        # the traces' points side by side at each temperature, so error bars do not overlap
        "scattermode": "group",
        "scattergap": 0.9 if categorical else 0.75,
        "xaxis": {
            "title": {"text": "temperature"},
            "type": "category" if categorical else "linear",
            "gridcolor": grid,
            "zeroline": False,
        },
        "yaxis": {
            "title": {"text": "accuracy (95% CI)"},
            "range": [0, 1.04],
            "tickformat": ".0%",
            "gridcolor": grid,
            "zeroline": False,
        },
    }


# ---------------------------------------------------------------------- items
@dataclass
class _Item:
    suite: int
    id: str
    question: str | None = None
    expected: str | None = None
    flags: int = 0
    answers: list[list[Any]] = field(default_factory=list)


def _item_data(report: Mapping[str, Any]) -> dict[str, Any]:
    """The items table's data: suites, then one entry per (suite, item) with its answers."""
    suites: dict[tuple[str, str], int] = {}
    items: dict[tuple[int, str], _Item] = {}
    for case in _list(report.get("cases")):
        if not isinstance(case, Mapping):
            continue
        key = (_text(case.get("module")), _text(case.get("suite")))
        s = suites.setdefault(key, len(suites))
        item_id = case.get("item_id")
        ident = _text(case.get("nodeid")) if item_id is None else str(item_id)
        item = items.setdefault((s, ident), _Item(s, ident))
        item.question = item.question or _opt_text(case.get("question"))
        item.expected = item.expected or _opt_text(case.get("expected"))
        item.answers.append(_answer(case))
    marks = _marks(report, suites)
    out = []
    for (s, ident), item in sorted(items.items(), key=lambda kv: (kv[0][0], _natural(kv[0][1]))):
        out.append(_item_json(item, marks.get(s, {}), ident))
    labels = _suite_labels(list(suites))
    return {"suites": labels, "items": out, "pageSize": ITEMS_PER_PAGE}


def _opt_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _cut(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + " [...]"


def _answer(case: Mapping[str, Any]) -> list[Any]:
    """[temperature, sample, answer shown, outcome code, raw response or null, error]."""
    answer = case.get("answer")
    response = case.get("response")
    shown = response if answer is None else answer
    raw = None if response is None or response == shown else _cut(response)
    return [
        _num(case.get("temperature")),
        case.get("sample") if isinstance(case.get("sample"), int) else None,
        _cut(shown),
        _OUTCOME_CODES.get(_text(case.get("outcome")), "e"),
        raw,
        _cut(case.get("error")),
    ]


def _natural(text: str) -> tuple[Any, ...]:
    """A sort key that puts q2 before q10 (digits and the rest alternate, so they compare)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", text)))


def _suite_labels(keys: Sequence[tuple[str, str]]) -> list[str]:
    names: dict[str, int] = {}
    for _, suite in keys:
        names[suite] = names.get(suite, 0) + 1
    # a suite name in two files would read as one suite twice: name the file then
    return [f"{module}::{suite}" if names[suite] > 1 else suite for module, suite in keys]


def _item_json(item: _Item, marks: Mapping[str, set[str] | None], ident: str) -> dict[str, Any]:
    answers = sorted(item.answers, key=lambda a: (a[0] is not None, a[0] or 0.0, a[1] or 0))
    flags = _FAILED if any(a[3] in ("f", "e") for a in answers) else 0
    if _marked(ident, marks.get("flipped"), _derived_flip, answers):
        flags |= _FLIPPED
    if _marked(ident, marks.get("inconsistent"), _derived_inconsistent, answers):
        flags |= _INCONSISTENT
    if ident in (marks.get("changed") or ()):
        flags |= _CHANGED
    return {
        "s": item.suite,
        "id": item.id,
        "q": item.question,
        "e": item.expected,
        "f": flags,
        "a": answers,
    }


def _marked(
    ident: str,
    listed: set[str] | None,
    derive: Callable[[Sequence[list[Any]]], bool],
    answers: Sequence[list[Any]],
) -> bool:
    """In the report's list, or (a report without that field) as the answers show."""
    return derive(answers) if listed is None else ident in listed


def _marks(
    report: Mapping[str, Any], suites: Mapping[tuple[str, str], int]
) -> dict[int, dict[str, set[str] | None]]:
    """Per suite: the ids the report calls flipped, inconsistent and changed vs baseline.

    None for flipped/inconsistent when the report has no such field (an older report):
    the items' own answers decide then.
    """
    out: dict[int, dict[str, set[str] | None]] = {}
    for row in _list(report.get("suites")):
        if not isinstance(row, Mapping):
            continue
        s = suites.get((_text(row.get("module")), _text(row.get("suite"))))
        if s is None:
            continue
        marks = out.setdefault(s, {"flipped": None, "inconsistent": None, "changed": set()})
        for mark, key, lists in _MARK_SOURCES:
            if key not in row:
                continue
            ids = marks[mark] or set()
            data = _mapping(row.get(key))
            for name in lists:
                ids.update(str(i) for i in _list(data.get(name)))
            marks[mark] = ids
    return out


_MARK_SOURCES = (
    ("flipped", "flips", ("right_to_wrong_items", "wrong_to_right_items")),
    ("inconsistent", "consistency", ("inconsistent_items",)),
    ("changed", "baseline", ("right_to_wrong_items", "wrong_to_right_items")),
)


def _by_temperature(answers: Sequence[list[Any]]) -> dict[float | None, list[list[Any]]]:
    groups: dict[float | None, list[list[Any]]] = {}
    for a in answers:
        if a[3] != "s":  # skipped: not graded
            groups.setdefault(a[0], []).append(a)
    return groups


def _derived_flip(answers: Sequence[list[Any]]) -> bool:
    """Whether the majority verdict differs between temperatures."""
    verdicts = {2 * sum(a[3] == "p" for a in g) > len(g) for g in _by_temperature(answers).values()}
    return len(verdicts) > 1


def _derived_inconsistent(answers: Sequence[list[Any]]) -> bool:
    """Whether the samples at one temperature give different answers."""
    return any(
        len(group) > 1 and len({a[2] for a in group}) > 1
        for group in _by_temperature(answers).values()
    )
