"""The JSON report (``--llm-report PATH``): build, write atomically, document, validate.

One table (``_SECTIONS``) describes every field of the report; the Markdown reference
(``REPORT_SCHEMA_DOC``) and the checker (``validate_report``) are both generated from it,
so the documentation cannot drift from what is checked.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .atomic import write_text_atomically
from .errors import ConfigError
from .gates import GateResult
from .results import CaseResult, SuiteSummary

__all__ = [
    "REPORT_SCHEMA",
    "REPORT_SCHEMA_DOC",
    "REPORT_SCHEMA_VERSION",
    "build_report",
    "validate_report",
    "write_report",
]

#: Bumped on any change a reader of old reports would trip over.
REPORT_SCHEMA_VERSION = 1
#: The report's ``schema`` field.
REPORT_SCHEMA = "pytest-llmbench/report"

MODES = ("live", "prefetch", "batch", "replay")


def build_report(
    *,
    meta: Mapping[str, Any],
    cases: Sequence[CaseResult],
    summaries: Sequence[SuiteSummary],
    total: SuiteSummary,
    gates: Sequence[GateResult],
) -> dict[str, Any]:
    """The report as a JSON-ready dict (see ``REPORT_SCHEMA_DOC``).

    ``meta`` gives the ``run`` section: ``started_at``/``finished_at`` may be epoch
    seconds (``time.time()``), datetimes or ISO strings and are written as ISO-8601 UTC;
    ``wall_time_s``, ``plugin_version`` and ``python`` are filled in when absent; any
    further key is copied as is.
    """
    started = _to_datetime(meta.get("started_at"))
    finished = _to_datetime(meta.get("finished_at"))
    wall = meta.get("wall_time_s")
    if wall is None and started is not None and finished is not None:
        wall = round((finished - started).total_seconds(), 3)
    run: dict[str, Any] = {
        "model": meta.get("model"),
        "mode": meta.get("mode", "live"),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "wall_time_s": wall,
        "pytest_args": [str(a) for a in meta.get("pytest_args", ())],
        "plugin_version": meta.get("plugin_version") or _plugin_version(),
        "python": meta.get("python") or platform.python_version(),
        "workers": meta.get("workers", 0),
        "exit_status": meta.get("exit_status"),
    }
    run.update({k: v for k, v in meta.items() if k not in run})
    totals = total.to_dict()
    for key in ("suite", "module", "temperature"):
        del totals[key]
    if totals.get("baseline"):
        # the per-item lists are in suites[]; pooled here they would only repeat them
        totals["baseline"] = {
            k: v for k, v in totals["baseline"].items() if not isinstance(v, list)
        }
    return {
        "schema": REPORT_SCHEMA,
        "version": REPORT_SCHEMA_VERSION,
        "run": run,
        "totals": totals,
        "suites": [s.to_dict() for s in summaries],
        "gates": [g.to_dict() for g in gates],
        "cases": [c.to_dict() for c in sorted(cases, key=lambda c: c.nodeid)],
    }


def report_text(report: Mapping[str, Any]) -> str:
    """The report as JSON text: indented, but each case on one line. Indenting every case
    takes the standard library's pure-Python encoder (its C encoder writes compact JSON
    only): 0.15-0.2 s for 2,000 cases at the end of every run, against a few
    milliseconds; and a case per line is what ``grep`` and ``diff`` want.
    ``allow_nan=False``: NaN is not JSON, and a report other tools cannot parse is useless."""
    cases = report.get("cases")
    rest = {k: v for k, v in report.items() if k != "cases"}
    text = json.dumps(rest, indent=2, ensure_ascii=False, allow_nan=False)
    if cases is None:
        return text + "\n"
    lines = ",\n".join("    " + json.dumps(c, ensure_ascii=False, allow_nan=False) for c in cases)
    body = f"[\n{lines}\n  ]" if lines else "[]"
    head = text[:-2] + ",\n" if rest else "{\n"  # text ends with "\n}"
    return f'{head}  "cases": {body}\n}}\n'


def write_report(path: str | Path, report: Mapping[str, Any]) -> None:
    """Write the report as JSON, atomically: a reader sees the old file or the new one.

    Parent directories are created. Raises ConfigError naming ``--llm-report`` and the
    path when it cannot be written.
    """
    path = Path(path)
    try:
        text = report_text(report)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--llm-report: cannot serialise the report for {path}: {exc}") from None
    write_text_atomically(path, text, "--llm-report")


def _to_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str):
        # Python 3.10's fromisoformat does not accept a trailing "Z"
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    raise TypeError(f"expected a timestamp, datetime or ISO string, got {value!r}")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    utc = value.astimezone(timezone.utc)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plugin_version() -> str:
    # the installed distribution's version: importing the package root from here would
    # make this low-level module depend on the whole package (see the layers contract)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pytest-llmbench")
    except PackageNotFoundError:  # pragma: no cover - run from an uninstalled tree
        return "unknown"


# ---------------------------------------------------------------------- schema
@dataclass(frozen=True)
class _Field:
    name: str
    types: tuple[str, ...]  # JSON types: string, integer, number, boolean, array, object, null
    doc: str
    required: bool = True
    enum: tuple[Any, ...] | None = None


def _f(name: str, types: str, doc: str, *, required: bool = True, enum: Any = None) -> _Field:
    return _Field(name, tuple(types.split("|")), doc, required, enum)


_TOP = (
    _f("schema", "string", f'always `"{REPORT_SCHEMA}"`', enum=(REPORT_SCHEMA,)),
    _f(
        "version",
        "integer",
        f"schema version, `{REPORT_SCHEMA_VERSION}`; bumped on breaking changes",
    ),
    _f("run", "object", "how the run was made (below)"),
    _f("totals", "object", "the whole run as one row: the figures of `suites[]`, pooled"),
    _f(
        "suites",
        "array",
        "one object per suite x temperature, sorted by module, suite, temperature",
    ),
    _f(
        "gates",
        "array",
        "one object per gate and matched suite, in the order given; empty without gates",
    ),
    _f("cases", "array", "one object per test case, sorted by node id"),
    _f(
        "baseline",
        "object|null",
        "with `--llm-baseline` only: the earlier report compared with (below)",
        required=False,
    ),
)

_RUN = (
    _f("model", "string|null", "the configured model"),
    _f(
        "mode",
        "string",
        "`live` (calls made as tests run), `prefetch` (planned, fetched concurrently, "
        "replayed), `batch` (through the Batch API) or `replay` (every answer from the store)",
        enum=MODES,
    ),
    _f(
        "started_at",
        "string|null",
        "start of the session, ISO-8601 UTC (`2025-01-31T12:00:00.000Z`)",
    ),
    _f("finished_at", "string|null", "end of the session, ISO-8601 UTC"),
    _f("wall_time_s", "number|null", "seconds from start to end"),
    _f("pytest_args", "array", "the command-line arguments given to pytest"),
    _f("plugin_version", "string", "pytest-llmbench version"),
    _f("python", "string", "Python version"),
    _f("workers", "integer", "pytest-xdist workers (`0` without xdist)"),
    _f("exit_status", "integer|null", "pytest's exit status, after gates decided it"),
    _f(
        "stopped",
        "string",
        "why llmbench stopped the run (exit status 6: a refusal every request would get, "
        "or `--llm-max-cost` reached); absent when it did not",
        required=False,
    ),
    _f("base_url", "string", "API base URL (never a key)", required=False),
    _f("simulator", "boolean", "whether the built-in simulator answered", required=False),
    _f(
        "origin",
        "string",
        "where the answers come from: `simulator` or the API base URL; stored answers and "
        "cassettes are replayed only for the origin that gave them",
        required=False,
    ),
    _f(
        "prefetch",
        "object",
        "prefetch mode only: `planned`, `fetched`, `failed` requests, `plan_lead_s` "
        "(seconds before the first request could be sent), `plan_s` (until planning "
        "ended, overlapping the fetch), `fetch_s`, `rate_limited`, `concurrency` (the "
        "requests in flight it settled at), `concurrency_adaptive` (false with "
        "`--llm-concurrency-fixed`)",
        required=False,
    ),
    _f(
        "batch",
        "object",
        "Batch API only: `jobs` (batch ids), `waited_s`, `rounds`, `plan_s`, `failed` "
        "(requests the Batch API failed for good), `unanswered` (those plus requests beyond "
        "the round limit), `notes`, `cost_usd` (batch prices), `realtime_cost_usd` (the same "
        "tokens at real-time prices), `saved_usd`",
        required=False,
    ),
)

_FIGURES = (
    _f("cases", "integer", "test cases"),
    _f("passed", "integer", "cases passed"),
    _f("failed", "integer", "cases failed (a wrong answer, or any failed assertion)"),
    _f("errors", "integer", "cases ended by an API error or a setup error"),
    _f("skipped", "integer", "cases skipped (not graded)"),
    _f("accuracy", "number|null", "passed / (passed + failed + errors); `null` when that is 0"),
    _f("ci_low", "number|null", "lower bound of accuracy's 95% Wilson score interval"),
    _f("ci_high", "number|null", "upper bound of accuracy's 95% Wilson score interval"),
    _f("prompt_tokens", "integer", "prompt (input) tokens"),
    _f("completion_tokens", "integer", "completion (output) tokens"),
    _f("total_tokens", "integer", "total tokens"),
    _f(
        "reasoning_tokens",
        "integer",
        "hidden reasoning tokens of reasoning models (gpt-5, o-series): already part of "
        "`completion_tokens`, and priced with them once",
        required=False,
    ),
    _f(
        "latency_p50",
        "number|null",
        "median per-case latency in seconds (sum of the case's calls; replayed calls keep "
        "their original latency), over cases that made a call; `null` when none did",
    ),
    _f("latency_p95", "number|null", "95th percentile of the same"),
    _f("requests", "integer", "HTTP requests sent in this run (retries included)"),
    _f("retries", "integer", "requests that were retries"),
    _f("rate_limited", "integer", "429 responses received"),
    _f("cached", "integer", "calls answered from the response store"),
    _f(
        "cost_usd",
        "number|null",
        "estimated cost of the answers in USD (replayed ones too; Batch API at half price); "
        "`null` when a model has no known price",
    ),
    _f("unpriced_models", "array", "models without a known price (why `cost_usd` is `null`)"),
)

_SUITE = (
    _f("suite", "string", "the test function's name, e.g. `test_truthfulqa`"),
    _f("module", "string", "the test file, relative to rootdir"),
    _f("temperature", "number|null", "the temperature; `null` for a suite without temperatures"),
    *_FIGURES,
    _f(
        "consistency",
        "object|null",
        "across an item's samples (`samples=K`), below; `null` with one sample per item",
        required=False,
    ),
    _f(
        "flips",
        "object|null",
        "items that changed from the suite's lowest temperature to this one, below; `null` "
        "at the lowest temperature",
        required=False,
    ),
    _f(
        "baseline",
        "object|null",
        "against `--llm-baseline`, paired item by item, below; `null` without a baseline "
        "or when it has no row for this suite and temperature",
        required=False,
    ),
)

_CONSISTENCY = (
    _f("samples", "integer", "K: the most graded samples an item has"),
    _f("items", "integer", "items with at least one graded sample"),
    _f(
        "maj_accuracy",
        "number|null",
        "maj@K: share of items whose most common answer is right (ties: the answer that "
        "came first); `maj_ci_low`/`maj_ci_high` its 95% Wilson interval over items",
    ),
    _f(
        "pass_at_k",
        "object",
        'pass@k for k = 1..K (keys `"1"`..`"K"`), the unbiased estimator '
        "1 - C(n-c, k)/C(n, k) per item (n samples, c right), averaged over items",
    ),
    _f(
        "agreement",
        "number|null",
        "mean over items of the share of samples giving the item's most common normalised "
        "answer (1 = always the same); `agreement_ci_low`/`_high` a normal 95% interval",
    ),
    _f(
        "entropy",
        "number|null",
        "mean Shannon entropy of an item's answers in bits (0 = always the same); "
        "`entropy_ci_low`/`_high` likewise",
    ),
    _f("inconsistent_items", "array", "ids of items whose samples do not all agree"),
)

_FLIPS = (
    _f("against", "number", "the suite's lowest temperature, the reference"),
    _f("items", "integer", "items graded at both temperatures"),
    _f(
        "right_to_wrong",
        "integer",
        "items right at the lowest temperature and wrong here (with samples: by majority vote)",
    ),
    _f("wrong_to_right", "integer", "the reverse"),
    _f(
        "mcnemar_p",
        "number",
        "two-sided exact McNemar p-value of the two counts (binomial, p = 1/2); small means "
        "the change in accuracy is more than chance",
    ),
    _f("right_to_wrong_items", "array", "their ids"),
    _f("wrong_to_right_items", "array", "their ids"),
)

_BASELINE_ROW = (
    _f("items", "integer", "items both runs graded (paired by module, suite, temperature, id)"),
    _f("accuracy", "number|null", "this run's accuracy on those items (mean per-item score)"),
    _f(
        "baseline_accuracy",
        "number|null",
        "the baseline's on the same items; `baseline_ci_low`/`_high` its Wilson interval",
    ),
    _f(
        "delta",
        "number|null",
        "accuracy - baseline_accuracy, paired; `delta_ci_low`/`delta_ci_high` its 95% "
        "interval (Agresti-Min adjusted Wald when each item has one sample, else a normal "
        "interval of the per-item differences)",
    ),
    _f("right_to_wrong_items", "array", "ids of items whose score went down"),
    _f("wrong_to_right_items", "array", "ids of items whose score went up"),
    _f("new_items", "array", "ids of items only this run has"),
    _f("missing_items", "array", "ids of items only the baseline has"),
)

_BASELINE = (
    _f("path", "string", "the baseline report's path as given"),
    _f("model", "string|null", "its model"),
    _f("mode", "string|null", "its mode"),
    _f("started_at", "string|null", "when it started"),
    _f(
        "shared_items",
        "integer",
        "item x temperature pairs both runs graded",
    ),
    _f("new_items", "integer", "item x temperature pairs only this run graded"),
    _f("missing_items", "integer", "item x temperature pairs only the baseline graded"),
    _f(
        "missing_suites",
        "array",
        "suite x temperature rows of the baseline this run does not have (`module::suite@T`)",
    ),
)

_GATE = (
    _f("gate", "string", "the gate as given, e.g. `test_qa:accuracy>=0.7`"),
    _f("suite", "string|null", "the suite measured; `null` when the gate matched nothing"),
    _f("temperature", "number|null", "the gate's `@T`; `null` when it pools all temperatures"),
    _f(
        "metric",
        "string",
        "`accuracy`, `ci_low`, `passed`, `failed`, `errors`, `cases`, `cost`, `tokens`, "
        "`p95_latency`, `rate_limited`, `maj_accuracy`, `agreement`, `delta`, "
        "`delta_ci_low` or `delta_ci_high`",
    ),
    _f(
        "op",
        "string",
        "`>=`, `>`, `<=`, `<`, `==` or `!=`",
        enum=(">=", ">", "<=", "<", "==", "!="),
    ),
    _f("threshold", "number", "the bound (a percentage is stored as a fraction)"),
    _f("value", "number|null", "the measured value; `null` when it could not be measured"),
    _f(
        "ci_low",
        "number|null",
        "the measured figure's 95% interval, for accuracy, consistency and delta gates",
    ),
    _f("ci_high", "number|null", "its upper bound"),
    _f(
        "cases",
        "integer",
        "what the value is over: graded cases for accuracy gates, items for consistency "
        "gates, shared items for delta gates, else cases",
    ),
    _f("passed", "boolean", "whether the gate holds"),
    _f("message", "string", "the line printed in the terminal summary"),
)

_CASE = (
    _f("nodeid", "string", "pytest node id, e.g. `tests/test_tqa.py::test_truthfulqa[q0042-t0.5]`"),
    _f("suite", "string", "the test function's name"),
    _f("module", "string", "the test file, relative to rootdir"),
    _f("item_id", "string|null", "the dataset item's id"),
    _f("temperature", "number|null", "the case's temperature"),
    _f("sample", "integer|null", "the sample number when the suite has `samples=K`"),
    _f(
        "outcome",
        "string",
        "`passed`, `failed`, `error` (API or setup error) or `skipped`",
        enum=("passed", "failed", "error", "skipped"),
    ),
    _f("error", "string|null", "first line of the API error or of the failed assertion"),
    _f("response", "string|null", "text of the case's last response"),
    _f("calls", "integer", "model calls the case made"),
    _f("prompt_tokens", "integer", "prompt tokens"),
    _f("completion_tokens", "integer", "completion tokens"),
    _f("total_tokens", "integer", "total tokens"),
    _f(
        "reasoning_tokens",
        "integer",
        "hidden reasoning tokens (`usage.completion_tokens_details`), part of `completion_tokens`",
        required=False,
    ),
    _f("latency_s", "number", "sum of the calls' latencies, seconds (as recorded)"),
    _f("requests", "integer", "HTTP requests sent in this run (`0` when all were replayed)"),
    _f("retries", "integer", "requests that were retries"),
    _f("rate_limited", "integer", "429 responses received"),
    _f("cached", "integer", "calls answered from the response store"),
    _f("model", "string|null", "the model that answered, as the API named it"),
    _f("duration_s", "number", "pytest's duration of the test call, seconds"),
    _f("batch", "boolean", "answered through the Batch API (priced at half)"),
    _f(
        "question",
        "string|null",
        "the question (given to `check`, else the item's `question`/`prompt`/`input` field)",
        required=False,
    ),
    _f(
        "expected",
        "string|null",
        "the expected answer (given to `check`, else the item's `answer`/`expected` field)",
        required=False,
    ),
    _f(
        "answer",
        "string|null",
        "what was compared (`check`'s `got`, else the response), normalised as the suite "
        "says (`normalize=`): the value the consistency figures compare",
        required=False,
    ),
)

# (title, path prefix in problem messages, fields, whether the path is a list of objects,
# and a sentence that replaces the field table in the documentation)
_SECTIONS: tuple[tuple[str, str, tuple[_Field, ...], bool, str | None], ...] = (
    ("Top level", "", _TOP, False, None),
    ("`run`", "run", _RUN, False, None),
    ("`suites[]`", "suites", _SUITE, True, None),
    (
        "`totals`",
        "totals",
        _FIGURES,
        False,
        "The fields of `suites[]` from `cases` on (no `suite`, `module`, `temperature`), "
        "over every case of the run; accuracy and percentiles are recomputed from the "
        "pooled cases, not averaged.",
    ),
    ("`gates[]`", "gates", _GATE, True, None),
    ("`cases[]`", "cases", _CASE, True, None),
    ("`baseline`", "baseline", _BASELINE, False, None),
    # nested in suites[]: documented, not checked (readers must accept null)
    ("`suites[].consistency`", "-", _CONSISTENCY, False, None),
    ("`suites[].flips`", "-", _FLIPS, False, None),
    ("`suites[].baseline`", "-", _BASELINE_ROW, False, None),
)


def _schema_doc() -> str:
    parts = [
        "### Report schema",
        "",
        f"`--llm-report PATH` writes one JSON object (`schema` `{REPORT_SCHEMA}`, "
        f"`version` {REPORT_SCHEMA_VERSION}). Readers should ignore keys they do not know: "
        "new keys may appear without a version bump; removing or changing one bumps it. "
        "The file is replaced atomically, so a reader never sees half a report. "
        "Accuracy counts API errors as not passed; cost is an estimate from a price table.",
    ]
    for title, _, flds, _, note in _SECTIONS:
        if note is not None:
            parts += ["", f"#### {title}", "", note]
            continue
        parts += ["", f"#### {title}", "", "| field | type | meaning |", "|---|---|---|"]
        for fld in flds:
            opt = "" if fld.required else " (optional)"
            parts.append(f"| `{fld.name}` | {' or '.join(fld.types)}{opt} | {fld.doc} |")
    return "\n".join(parts) + "\n"


#: Markdown reference of every report field (pasted into the README).
REPORT_SCHEMA_DOC = _schema_doc()


def validate_report(report: Any) -> list[str]:
    """Check a report (a parsed JSON object) against the schema.

    Returns the problems found, one line each (``cases[3].outcome: missing``); an empty
    list means the report is valid. Unknown keys are allowed.
    """
    if not isinstance(report, dict):
        return [f"report: expected object, got {_type_name(report)}"]
    problems: list[str] = []
    for _, prefix, flds, is_list, _ in _SECTIONS:
        if not prefix:
            problems += _check_object(report, flds, "")
            continue
        value = report.get(prefix)
        if prefix == "-":
            continue
        if is_list and isinstance(value, list):
            for i, item in enumerate(value):
                where = f"{prefix}[{i}]"
                if isinstance(item, dict):
                    problems += _check_object(item, flds, where + ".")
                else:
                    problems.append(f"{where}: expected object, got {_type_name(item)}")
        elif not is_list and isinstance(value, dict):
            problems += _check_object(value, flds, prefix + ".")
    return problems


def _check_object(obj: Mapping[str, Any], flds: Sequence[_Field], where: str) -> list[str]:
    problems: list[str] = []
    for fld in flds:
        path = where + fld.name
        if fld.name not in obj:
            if fld.required:
                problems.append(f"{path}: missing")
            continue
        value = obj[fld.name]
        if not any(_is_type(value, t) for t in fld.types):
            expected = " or ".join(fld.types)
            problems.append(f"{path}: expected {expected}, got {_type_name(value)}")
        elif fld.enum is not None and value not in fld.enum:
            allowed = ", ".join(json.dumps(e) for e in fld.enum)
            problems.append(f"{path}: {json.dumps(value)} is not one of {allowed}")
    return problems


def _is_type(value: Any, t: str) -> bool:
    if t == "null":
        return value is None
    if t == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):  # a bool is an int in Python, never in JSON Schema
        return False
    if t == "integer":
        return isinstance(value, int)
    if t == "number":
        return isinstance(value, (int, float)) and math.isfinite(value)
    if t == "string":
        return isinstance(value, str)
    if t == "array":
        return isinstance(value, list)
    if t == "object":
        return isinstance(value, dict)
    raise ValueError(f"unknown schema type {t!r}")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    for t in ("boolean", "integer", "number", "string", "array", "object"):
        if _is_type(value, t):
            return t
    return type(value).__name__
