from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench import __version__
from pytest_llmbench.errors import ConfigError
from pytest_llmbench.gates import evaluate, parse_gate
from pytest_llmbench.pricing import PriceTable
from pytest_llmbench.report import (
    REPORT_SCHEMA_DOC,
    REPORT_SCHEMA_VERSION,
    build_report,
    validate_report,
    write_report,
)
from pytest_llmbench.results import CaseResult, SuiteSummary, summarize, totals

STARTED = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def make_cases() -> list[CaseResult]:
    def c(nodeid: str, outcome: str, t: float | None, **kw: Any) -> CaseResult:
        module, _, rest = nodeid.partition("::")
        return CaseResult(nodeid, rest.split("[")[0], module, "q", t, None, outcome, **kw)

    return [
        c(
            "s/test_b.py::test_b[q2-t0.5]",
            "failed",
            0.5,
            error="assert 'B' == 'A'",
            response="B",
            calls=1,
            prompt_tokens=20,
            completion_tokens=1,
            total_tokens=21,
            latency_s=0.25,
            requests=2,
            retries=1,
            rate_limited=1,
            model="gpt-4o-mini-2024-07-18",
            duration_s=0.3,
        ),
        c(
            "s/test_a.py::test_a[q1]",
            "passed",
            None,
            calls=1,
            cached=1,
            model="gpt-4o-mini",
            prompt_tokens=10,
            completion_tokens=2,
            total_tokens=12,
            latency_s=0.5,
            batch=True,
        ),
        c("s/test_b.py::test_b[q1-t0.5]", "error", 0.5, error="API error: quota"),
        c("s/test_b.py::test_b[q3-t0.0]", "skipped", 0.0),
    ]


def make_report(**meta: Any) -> dict[str, Any]:
    cases = make_cases()
    summaries = summarize(cases, PriceTable())
    gates = evaluate([parse_gate("test_b:accuracy>=0.5"), parse_gate("nope:errors==0")], summaries)
    base: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "mode": "live",
        "started_at": STARTED,
        "finished_at": STARTED + 12.5,
        "pytest_args": ["-n", "2", "example_suites"],
        "workers": 2,
        "exit_status": 1,
        "base_url": "https://api.openai.com/v1",
        "simulator": False,
    }
    base.update(meta)
    return build_report(
        meta=base, cases=cases, summaries=summaries, total=totals(summaries), gates=gates
    )


def test_build_report_shape() -> None:
    report = make_report(prefetch={"planned": 4, "fetched": 3})
    assert validate_report(report) == []
    assert report["schema"] == "pytest-llmbench/report"
    assert report["version"] == REPORT_SCHEMA_VERSION == 1
    run = report["run"]
    assert run["started_at"] == "2023-11-14T22:13:20.000Z"
    assert run["finished_at"] == "2023-11-14T22:13:32.500Z"
    assert run["wall_time_s"] == pytest.approx(12.5)
    assert run["plugin_version"] == __version__
    assert run["python"].count(".") == 2
    assert run["prefetch"] == {"planned": 4, "fetched": 3}  # further meta copied as is
    assert [c["nodeid"] for c in report["cases"]] == sorted(c.nodeid for c in make_cases())
    assert [(s["suite"], s["temperature"]) for s in report["suites"]] == [
        ("test_a", None),
        ("test_b", 0.0),
        ("test_b", 0.5),
    ]
    assert "latencies" not in report["suites"][0]
    assert report["totals"]["cases"] == 4 and "suite" not in report["totals"]
    assert report["totals"]["accuracy"] == pytest.approx(1 / 3)
    assert [g["passed"] for g in report["gates"]] == [False, False]
    assert report["gates"][1]["suite"] is None


def test_meta_timestamps_as_iso_strings() -> None:
    report = make_report(started_at="2025-01-31T12:00:00Z", finished_at="2025-01-31T12:01:00Z")
    assert report["run"]["wall_time_s"] == 60.0
    assert report["run"]["finished_at"] == "2025-01-31T12:01:00.000Z"


def test_report_round_trip(tmp_path: Path) -> None:
    report = make_report()
    path = tmp_path / "deep" / "dir" / "report.json"
    write_report(path, report)
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == report
    assert validate_report(loaded) == []
    cases = [CaseResult.from_dict(d) for d in loaded["cases"]]
    assert cases == sorted(make_cases(), key=lambda c: c.nodeid)
    # no temporary file is left behind
    assert os.listdir(path.parent) == ["report.json"]


def test_the_report_is_indented_with_a_case_per_line(tmp_path: Path) -> None:
    report = make_report()
    path = tmp_path / "report.json"
    write_report(path, report)
    lines = path.read_text(encoding="utf-8").splitlines()
    case_lines = [line for line in lines if line.startswith('    {"')]
    assert [json.loads(line.rstrip(",")) for line in case_lines] == report["cases"]
    assert '  "schema": "pytest-llmbench/report",' in lines  # the rest stays indented
    for cases in ([], None):
        other = {"a": {"b": 1}} if cases is None else {"a": {"b": 1}, "cases": cases}
        write_report(path, other)
        assert json.loads(path.read_text(encoding="utf-8")) == other
    with pytest.raises(ConfigError, match="--llm-report: cannot serialise"):
        write_report(path, {"cases": [{"x": float("nan")}]})


def test_write_report_replaces_existing(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")
    write_report(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}


def test_write_report_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"--llm-report: cannot write .*file.*report\.json"):
        write_report(blocker / "report.json", {"a": 1})
    with pytest.raises(ConfigError, match="--llm-report: cannot write"):
        write_report(tmp_path, {"a": 1})  # a directory
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_write_report_rejects_nan(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--llm-report: cannot serialise"):
        write_report(tmp_path / "r.json", {"x": float("nan")})


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX non-root")
def test_write_report_read_only_dir(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="Permission denied"):
            write_report(ro / "r.json", {})
    finally:
        ro.chmod(0o700)


def _drop(report: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    obj: Any = report
    for p in parents:
        obj = obj[int(p)] if p.isdigit() else obj[p]
    del obj[last]


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda r: _drop(r, "run.model"), "run.model: missing"),
        (lambda r: _drop(r, "cases.2.outcome"), "cases[2].outcome: missing"),
        (lambda r: _drop(r, "suites.0.ci_low"), "suites[0].ci_low: missing"),
        (lambda r: _drop(r, "totals.cost_usd"), "totals.cost_usd: missing"),
        (lambda r: _drop(r, "gates.0.message"), "gates[0].message: missing"),
        (lambda r: _drop(r, "cases"), "cases: missing"),
        (lambda r: r.update(version="1"), "version: expected integer, got string"),
        (lambda r: r.update(schema="other"), 'schema: "other" is not one of "pytest-llmbench/'),
        (lambda r: r["run"].update(mode="fast"), 'run.mode: "fast" is not one of "live"'),
        (lambda r: r["run"].update(workers=True), "run.workers: expected integer, got boolean"),
        (lambda r: r["run"].update(simulator="no"), "run.simulator: expected boolean"),
        (lambda r: r["cases"][0].update(outcome="xfail"), 'cases[0].outcome: "xfail" is not'),
        (lambda r: r["cases"][1].update(latency_s=None), "cases[1].latency_s: expected number"),
        (lambda r: r["suites"].append(3), "suites[3]: expected object, got integer"),
        (lambda r: r.update(totals=[]), "totals: expected object, got array"),
    ],
)
def test_validate_report_catches(mutate: Any, problem: str) -> None:
    report = copy.deepcopy(make_report())
    mutate(report)
    problems = validate_report(report)
    assert any(p.startswith(problem) for p in problems), problems


def test_validate_report_not_an_object() -> None:
    assert validate_report([]) == ["report: expected object, got array"]


def test_schema_doc_documents_every_field() -> None:
    report = make_report(prefetch={}, batch={})
    for section in ("run", "totals"):
        for key in report[section]:
            assert f"| `{key}` |" in REPORT_SCHEMA_DOC, key
    for key in report["suites"][0]:
        assert f"| `{key}` |" in REPORT_SCHEMA_DOC, key
    for key in report["gates"][0]:
        assert f"| `{key}` |" in REPORT_SCHEMA_DOC, key
    for f in dataclasses.fields(CaseResult):
        assert f"| `{f.name}` |" in REPORT_SCHEMA_DOC, f.name
    assert {f.name for f in dataclasses.fields(SuiteSummary)} - set(report["suites"][0]) == {
        "latencies"
    }


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_the_report_file_is_readable_like_any_other_output(tmp_path: Path) -> None:
    from pytest_llmbench.atomic import write_text_atomically

    old = os.umask(0o022)
    try:
        write_text_atomically(tmp_path / "r.json", "{}", "--llm-report")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
