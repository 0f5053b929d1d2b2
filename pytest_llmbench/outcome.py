"""End of a run, in the controlling process: summaries, gates, exit status, report."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .errors import ConfigError

if TYPE_CHECKING:
    from .gates import GateResult
    from .progress import PrefetchStats
    from .results import SuiteSummary
    from .runtime import RunState


@dataclass
class RunSummary:
    summaries: list[SuiteSummary]
    total: SuiteSummary
    gates: list[GateResult]
    report_path: Path | None
    mode: str
    extra: list[str] = field(default_factory=list)


def run_mode(state: RunState, requests: int | None = None) -> str:
    """live, prefetch, batch, or replay when this run sent no request at all."""
    if state.llm_config.batch.enabled:
        return "batch"
    if state.prefetch is not None:
        return "prefetch"
    called = any(c.calls for c in state.cases.values())
    return "replay" if requests == 0 and called else "live"


def prefetch_line(stats: PrefetchStats) -> str:
    rate = stats.fetched / stats.fetch_s if stats.fetch_s > 0 else 0.0
    return (
        f"llmbench prefetch: planned {stats.planned} request(s) in {stats.plan_s:.1f}s, "
        f"fetched {stats.fetched} in {stats.fetch_s:.1f}s ({rate:.1f}/s), {stats.failed} "
        f"failed (retried live in the run), 429s {stats.rate_limited}, retries {stats.retries}"
    )


def prefetch_report(stats: PrefetchStats) -> dict[str, Any]:
    return {
        "plan_lead_s": stats.plan_lead_s,
        "planned": stats.planned,
        "fetched": stats.fetched,
        "failed": stats.failed,
        "plan_s": round(stats.plan_s, 3),
        "fetch_s": round(stats.fetch_s, 3),
        "rate_limited": stats.rate_limited,
    }


def notes(state: RunState) -> list[str]:
    """The lines under the summary table, in the order the stages ran."""
    lines = []
    if state.record_mode is not None:
        what = "replaying only" if state.record_mode == "none" else "recording"
        where = state.cassette_dir or "cassettes/ beside each suite"
        lines.append(f"llmbench cassettes: {what} (mode {state.record_mode}) in {where}")
    if state.prefetch is not None:
        lines.append(prefetch_line(state.prefetch))
    return lines + state.summary_notes


def finish_run(config: pytest.Config, state: RunState, exitstatus: int, now: float) -> int | None:
    """Summarise, judge the gates and write the report; returns a new exit status or None."""
    from .pricing import PriceTable
    from .report import build_report, write_report
    from .results import summarize, totals

    gates = state.gates
    cases = list(state.cases.values())
    if not cases and not gates:
        return None
    prices = state.prices or PriceTable()
    summaries = summarize(cases, prices)
    total = totals(summaries)
    if state.llm_config.batch.enabled:
        from .batch import summary_lines

        # jobs, waiting, rounds and the saving vs real-time prices (also in the report)
        state.summary_notes.extend(summary_lines(state, cases, prices))
    from .gates import evaluate

    results = evaluate(gates, summaries) if gates else []
    new_status: int | None = None
    if gates and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        # gates decide: cases may fail individually as long as the suite's figures hold
        new_status = 0 if all(r.passed for r in results) else 1
    final_status = exitstatus if new_status is None else new_status
    report_path = state.report_path
    if report_path is not None:
        meta: dict[str, Any] = {
            "model": state.llm_config.model,
            "mode": run_mode(state, total.requests),
            "started_at": state.started_at,
            "finished_at": now,
            "pytest_args": list(config.invocation_params.args),
            "python": platform.python_version(),
            "workers": _workers(config),
            "exit_status": int(final_status),
            "base_url": state.llm_config.base_url or "https://api.openai.com/v1",
            "simulator": state.sim_enabled,
            "origin": state.origin,
        }
        meta.update(state.report_meta)
        if state.prefetch is not None:
            meta["prefetch"] = prefetch_report(state.prefetch)
        report = build_report(
            meta=meta, cases=cases, summaries=summaries, total=total, gates=results
        )
        try:
            write_report(report_path, report)
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
    state.summary = RunSummary(
        summaries, total, results, report_path, run_mode(state, total.requests)
    )
    return new_status


def _workers(config: pytest.Config) -> int:
    n = getattr(config.option, "numprocesses", None)
    try:
        return int(n) if n else 0
    except (TypeError, ValueError):
        return os.cpu_count() or 1


def origin_line(state: RunState, total: SuiteSummary) -> str:
    """Where this run's answers came from: sent now, or replayed (store or cassettes)."""
    from .store import SIM_ORIGIN

    where = "the built-in simulator" if state.origin == SIM_ORIGIN else state.origin
    line = f"llmbench answers from {where}: {total.requests} request(s) sent in this run"
    if total.cached:
        source = "cassettes" if state.record_mode == "none" else "the store"
        line += f", {total.cached} answer(s) replayed from {source} (recorded on {where})"
    return line


def print_summary(terminalreporter: Any, state: RunState) -> None:
    from .results import format_summary

    summary: RunSummary = state.summary
    tr = terminalreporter
    tr.write_sep("=", f"llmbench summary ({summary.mode}, model {state.llm_config.model})")
    for line in format_summary(summary.summaries, summary.total):
        tr.write_line(line)
    tr.write_line(origin_line(state, summary.total))
    for line in notes(state):
        tr.write_line(line)
    if summary.gates:
        tr.write_line("")
        for g in summary.gates:
            tr.write_line(g.message, green=g.passed, red=not g.passed, bold=not g.passed)
        verdict = "all gates hold" if all(g.passed for g in summary.gates) else "a gate failed"
        tr.write_line(f"llmbench gates: {verdict}; gates decide the exit status")
    if summary.report_path is not None:
        tr.write_line(f"llmbench report: {summary.report_path}")
    sys.stdout.flush()
