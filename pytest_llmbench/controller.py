"""The controlling process's role: the simulator, the collected results, the gates, the
prefetch or Batch API stage, the summary, the exit status and the report.

:class:`Controller` is registered as a plugin only in the process that controls the run
(the only process without xdist; xdist's controller, which never collects, with it), as
pytest-xdist registers its ``DSession`` only there; workers and the plan subprocess never
see it. It keeps what only the controller has; per-process values live in ``RunState``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .errors import FATAL_EXIT_STATUS, ConfigError
from .outputs import (
    html_path,
    load_baseline,
    output_path,
    pytest_html_section,
    read_json,
    write_outputs,
)
from .results import CaseResult
from .runtime import stop_message

if TYPE_CHECKING:
    from collections.abc import Generator

    from xdist.workermanage import WorkerController  # type: ignore[import-untyped]

    from .batch import BatchStats
    from .engine import Fetch
    from .gates import Gate, GateResult
    from .interrupts import Interrupts
    from .plan_fork import PlanFork
    from .pricing import PriceTable
    from .progress import PrefetchStats
    from .results import BaselineRun, SuiteSummary
    from .runtime import RunState
    from .sim import Simulator


#: at most this long the tests' collection waits for the first planned request to go out
WORKERS_WAIT_S = 10.0


@dataclass
class RunSummary:
    summaries: list[SuiteSummary]
    total: SuiteSummary
    gates: list[GateResult]
    report_path: Path | None
    mode: str
    extra: list[str] = field(default_factory=list)
    compared: BaselineRun | None = None


class Controller:
    """The controlling process's plugin object (see the module docstring)."""

    def __init__(self, config: pytest.Config, state: RunState) -> None:
        self.config = config
        self.state = state
        self.cases: dict[str, CaseResult] = {}
        self.gates = parse_gates(state.options.gate)
        self.prices = load_prices(state.options.prices)
        options = state.options
        self.report_path = output_path(config, options.report, "--llm-report")
        self.html_path = html_path(config, options.html)
        self.baseline = load_baseline(config, options.baseline)
        if self.baseline is None and any(g.metric.startswith("delta") for g in self.gates):
            raise pytest.UsageError(
                "--llm-gate: a delta gate compares with a baseline: add --llm-baseline "
                "REPORT (the JSON report of an earlier run)"
            )
        self.prefetch: PrefetchStats | None = None
        self.batch: BatchStats | None = None  # what the Batch API stage did
        self.batch_lines: list[str] = []
        self.pacing: str | None = None  # how the requests sent were paced (a summary note)
        self.summary: RunSummary | None = None
        self.sim: Simulator | None = None
        self.session: pytest.Session | None = None
        self.fetch: Fetch | None = None  # the prefetch, running or done
        self.staged = False  # the Batch API stage has run (before xdist's workers, if any)
        self.estimate: list[str] | None = None  # --llm-estimate's lines
        self.interrupts: Interrupts | None = None
        self.notices: list[str] = []  # what the run directory's check did, said once
        self.plan_fork: PlanFork | None = None  # waits to become the plan process

    # ------------------------------------------------------------------ start and stop
    def start(self) -> None:
        """At configure time: the run directory's check, --cache-clear, the simulator, an
        early look at the budget."""
        state = self.state
        self.plan_fork = self.fork_for_plan()  # first: no thread has started yet
        if not _asks_help(self.config):
            from .errors import StoreError
            from .run_dir import check_run_dir

            try:
                self.notices = check_run_dir(state.llm_config.run_dir)
            except StoreError as exc:
                raise pytest.UsageError(str(exc)) from None
        if getattr(self.config.option, "cacheclear", False):
            # pytest's --cache-clear clears stored responses too (controller only: workers
            # start after this and must not wipe what a sibling just saved)
            from .store import ResponseStore

            with ResponseStore.open(state.llm_config.run_dir) as store:
                store.clear()
        if state.sim_enabled:
            self.sim = start_simulator(self.config, state)
        elif not _asks_help(self.config):
            check_budget(state)
        from .engine import streams

        if streams(self.config, state) and state.has_credentials() and self.first_run():
            # a first run (nothing stored, or --llm-fresh) starts planning and fetching
            # now, before xdist starts its workers: they collect while it fetches
            self.begin_stream(None)

    def fork_for_plan(self) -> PlanFork | None:
        """A fork of this process to become the plan process (``plan_fork.py``), made
        only in a run that may stream: it asks for llmbench or has a store."""
        from .engine import streams
        from .plan_fork import PlanFork
        from .store import STORE_FILENAME

        state, config = self.state, self.config
        if _asks_help(config) or not streams(config, state):
            return None
        if (state.llm_config.run_dir / STORE_FILENAME).exists() or self.asks_llmbench():
            return PlanFork.start()
        return None

    def first_run(self) -> bool:
        """Whether this is an llmbench run with nothing stored yet (or ``--llm-fresh``).

        Only a run that asks for llmbench counts (an ``--llm-*`` option or ``--batch-api``,
        an ``llm_*`` ini key, an ``LLMBENCH_*`` variable, or a run directory that holds a
        store): the plugin is active in every pytest run of its environment, and a key in
        the environment alone must not make a project without benchmarks collect twice
        or get a run directory. Any other run starts planning once collection shows it
        calls the model (:meth:`collected`)."""
        from .store import STORE_FILENAME

        state = self.state
        stored = (state.llm_config.run_dir / STORE_FILENAME).exists()
        if not stored:
            return self.asks_llmbench()
        return state.fresh_since is not None or len(state.store) == 0

    def asks_llmbench(self) -> bool:
        """Whether the run names llmbench: an option, an ini key or a variable."""
        from .options import OPTIONS

        config = self.config
        args = [str(a) for a in config.invocation_params.args]
        asked = any(a.startswith(("--llm-", "--batch-api")) for a in args)
        asked = asked or any(_ini_set(config, o.dest) for o in OPTIONS)
        return asked or any(name.startswith("LLMBENCH_") for name in os.environ)

    def close(self) -> None:
        from .plan import remove_collection_flags

        remove_collection_flags(self.state)
        if self.plan_fork is not None:  # never used: it exits
            self.plan_fork.close()
            self.plan_fork = None
        if self.interrupts is not None:
            self.interrupts.restore()
        fetch = self.fetch
        if fetch is not None:
            if fetch.running:  # the session never ran (a usage error): no orphans
                fetch.abort()
                fetch.join(5.0)
            if fetch.journal is not None:
                fetch.journal.close()
        self.state.stop.remove()
        if self.state.options.max_cost is not None:
            from .spend import ledger_name

            self.state.store.delete_state(ledger_name(self.state.run_token))  # this run's spend
        if self.sim is not None:
            self.sim.stop()
            self.sim = None

    # ------------------------------------------------------------------ hooks
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        self.state.collect_as_it_goes(self.config)
        props = [(k, v) for k, v in report.user_properties if str(k).startswith("llm.")]
        if props:
            data = {str(k)[4:]: v for k, v in props}
            self.cases[str(data["nodeid"])] = CaseResult.from_dict(data)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """The session exists: catch Ctrl-C and SIGTERM for a fetch already running.
        The tests' collection (xdist's workers, or this process's own without xdist)
        starts once the first request is on its way: the tests have nothing to do before
        its answer, and on a small machine collecting would otherwise slow the planning
        and the fetch's start down (the workers' start is this hook's next
        implementation, xdist's own; this process's collection comes after the hook)."""
        self.session = session
        if self.notices:
            from .progress import note

            for line in self.notices:
                note(self.config, line, yellow=True)
        if self.fetch is None:
            self.batch_before_workers()
            return
        self.watch(self.fetch)
        self.fetch.under_way.wait(WORKERS_WAIT_S)

    def batch_before_workers(self) -> None:
        """With xdist, the Batch API stage runs before the workers start: it plans the
        whole selection in its own subprocess anyway, and a wait of minutes or hours
        inside an xdist hook would keep xdist from seeing a worker that dies meanwhile."""
        from .engine import prefetch_enabled

        state = self.state
        batch = state.llm_config.batch.enabled
        if not (batch and _workers(self.config) and state.has_credentials()):
            return
        if prefetch_enabled(self.config, state):
            self.collected(None, True)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[Any]) -> None:
        """--llm-estimate: plan what the selection would send, then deselect every test
        (after -k, -m and --lf have chosen): nothing runs, nothing is sent."""
        if not self.state.options.estimate:
            return
        from .estimate import run_estimate

        self.estimate = run_estimate(config, self.state, self.prices)
        if items:
            config.hook.pytest_deselected(items=list(items))
            items[:] = []

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Without xdist this process collects: what the run will call is known now."""
        from .plan import calls_model, llm_nodeids

        self.collected(llm_nodeids(session.items), calls_model(session.items))

    def collected(self, nodeids: list[str] | None, calls: bool) -> None:
        """What the run will call is known (None: every selected test may call): start
        the prefetch if it has not started (a run with answers stored plans only the
        cases without any); the Batch API and cassettes finish theirs before any test."""
        from .engine import prefetch_enabled, run_staged, streams, unanswered
        from .plan import runs_tests

        state = self.state
        if calls and runs_tests(self.config) and not state.options.estimate:
            state.check_credentials()
        wanted = (nodeids is None or bool(nodeids)) and prefetch_enabled(self.config, state)
        if wanted and self.fetch is None and not self.staged:
            if streams(self.config, state):
                only = unanswered(state, nodeids)
                if only is None or only:
                    self.begin_stream(only)
            else:
                self.staged = True
                staged = run_staged(self.config, state, nodeids, self.batch_done)
                if staged is not None:
                    self.watch(staged)
                    self.wait_fetch()
        if self.fetch is not None and state.options.no_overlap:
            self.wait_fetch()
        reason = state.stopped()
        if reason is not None:
            pytest.exit(stop_message(reason), returncode=FATAL_EXIT_STATUS)

    def begin_stream(self, only: list[str] | None) -> None:
        from .engine import start_stream

        live_line = self.state.options.no_overlap  # else the tests' progress is shown
        fork, self.plan_fork = self.plan_fork, None
        self.watch(start_stream(self.config, self.state, only, live_line=live_line, fork=fork))

    def watch(self, fetch: Fetch) -> None:
        """Keep the fetch, and catch Ctrl-C and SIGTERM while it runs."""
        import threading

        from .config import DEFAULT_DRAIN_S
        from .interrupts import Interrupts

        self.fetch = fetch
        drain = self.state.options.drain_timeout
        main = threading.current_thread() is threading.main_thread()
        if self.session is not None and main and self.interrupts is None:
            drain_s = DEFAULT_DRAIN_S if drain is None else drain
            self.interrupts = Interrupts(fetch, self.session, drain_s)
            self.interrupts.install()
        elif self.interrupts is not None:
            self.interrupts.fetch = fetch

    def wait_fetch(self) -> None:
        """Wait for the whole fetch (no overlap, cassettes); its figures and notes."""
        from .progress import note

        fetch = self.fetch
        if fetch is None:
            return
        fetch.join()
        for line in fetch.notes:
            note(self.config, line, yellow=True)
        fetch.notes.clear()
        self.prefetch = fetch.stats() or self.prefetch

    def end_fetch(self, session: pytest.Session) -> None:
        """At the end of the session: a fetch still running finishes what the tests left
        (a run stopped early sends nothing new and waits only for what is in flight)."""
        from .config import DEFAULT_DRAIN_S

        fetch = self.fetch
        if fetch is None:
            return
        early = bool(session.shouldstop or session.shouldfail)
        early = early or session.exitstatus == pytest.ExitCode.INTERRUPTED
        try:
            if early and fetch.running:
                fetch.stop()
                drain = self.state.options.drain_timeout
                if not fetch.join(DEFAULT_DRAIN_S if drain is None else drain):
                    fetch.abort()
            self.wait_fetch()
        except KeyboardInterrupt:
            fetch.abort()  # a Ctrl-C now: the handler has already drained or aborted
        if self.interrupts is not None:
            self.interrupts.restore()

    def batch_done(self, stats: BatchStats) -> None:
        self.batch = stats

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.end_fetch(session)
        new_status = self.finish(int(session.exitstatus), time.time())
        if new_status is not None:
            session.exitstatus = new_status
        if self.state.stopped() is not None:
            session.exitstatus = FATAL_EXIT_STATUS
        elif self.estimate is not None and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
            session.exitstatus = pytest.ExitCode.OK  # every test deselected on purpose
        elif self.interrupts is not None and self.interrupts.message is not None:
            session.exitstatus = pytest.ExitCode.INTERRUPTED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.estimate is not None:
            model = self.state.llm_config.model
            terminalreporter.write_sep("=", f"llmbench estimate (model {model})")
            for line in self.estimate:
                terminalreporter.write_line(line)
        if self.summary is not None:
            self.print_summary(terminalreporter)
        reason = self.state.stopped()
        if reason is not None:
            terminalreporter.write_line(
                f"llmbench stopped the run (exit status {FATAL_EXIT_STATUS}): {reason}",
                red=True,
                bold=True,
            )

    # ------------------------------------------------------------------ the end
    def run_mode(self, requests: int | None = None) -> str:
        """live, prefetch, batch, or replay when this run sent no request at all."""
        if self.state.llm_config.batch.enabled:
            return "batch"
        if self.prefetch is not None:
            return "prefetch"
        called = any(c.calls for c in self.cases.values())
        return "replay" if requests == 0 and called else "live"

    def finish(self, exitstatus: int, now: float) -> int | None:
        """Summarise, judge the gates and write the reports; a new exit status or None."""
        from .analysis import analyze
        from .results import summarize, totals

        cases = list(self.cases.values())
        stopped = self.state.stopped()
        if not cases and not self.gates and stopped is None:
            return None  # a run that stops before any case still writes its report
        summaries = summarize(cases, self.prices)
        base_cases = None if self.baseline is None else list(self.baseline.cases)
        compared = analyze(summaries, cases, base_cases)
        total = totals(summaries)
        if self.state.llm_config.batch.enabled:
            from .batch import BatchStats, summary_lines

            # jobs, waiting, rounds and the saving vs real-time prices (also in the report)
            self.batch = self.batch or BatchStats.from_report(None)  # the stage never ran
            self.batch_lines = summary_lines(self.batch, cases, self.prices)
        from .gates import evaluate

        results = evaluate(self.gates, summaries) if self.gates else []
        new_status: int | None = None
        if self.gates and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
            # gates decide: cases may fail individually as long as the suite's figures hold
            new_status = 0 if all(r.passed for r in results) else 1
        final_status = exitstatus if new_status is None else new_status
        mode = self.run_mode(total.requests)
        if mode != "batch" and total.requests:
            self.pacing = pacing_line(self.state, self.prefetch)
        if self.report_path is not None or self.html_path is not None:
            report = self.report(cases, summaries, total, results, mode, final_status, now)
            if self.baseline is not None:
                report["baseline"] = {**self.baseline.describe(), **_to_dict(compared)}
            write_outputs(report, self.report_path, self.html_path)
        if cases or self.gates:  # else only the line saying why the run stopped
            self.summary = RunSummary(
                summaries, total, results, self.report_path, mode, compared=compared
            )
        return new_status

    def report(
        self,
        cases: list[CaseResult],
        summaries: list[SuiteSummary],
        total: SuiteSummary,
        gates: list[GateResult],
        mode: str,
        exit_status: int,
        now: float,
    ) -> dict[str, Any]:
        from .report import build_report

        state, config = self.state, self.config
        meta: dict[str, Any] = {
            "model": state.llm_config.model,
            "mode": mode,
            "started_at": state.started_at,
            "finished_at": now,
            "pytest_args": list(config.invocation_params.args),
            "python": platform.python_version(),
            "workers": _workers(config),
            "exit_status": int(exit_status),
            "base_url": state.llm_config.endpoint,
            "simulator": state.sim_enabled,
            "origin": state.origin,
        }
        stopped = state.stopped()
        if stopped is not None:
            meta["stopped"] = stopped
        if self.batch is not None:
            meta["batch"] = self.batch.to_report()
        if self.prefetch is not None:
            meta["prefetch"] = prefetch_report(self.prefetch)
        return build_report(meta=meta, cases=cases, summaries=summaries, total=total, gates=gates)

    # ------------------------------------------------------------------ the terminal
    def notes(self) -> list[str]:
        """The lines under the summary table, in the order the stages ran."""
        state, lines = self.state, []
        if state.record_mode is not None:
            what = "replaying only" if state.record_mode == "none" else "recording"
            where = state.cassette_dir or "cassettes/ beside each suite"
            lines.append(f"llmbench cassettes: {what} (mode {state.record_mode}) in {where}")
        if self.prefetch is not None:
            lines.append(prefetch_line(self.prefetch))
        if self.pacing is not None:
            lines.append(self.pacing)
        from .tokens import describe

        lines.append(describe(state.llm_config.model))  # exact or estimated prompt tokens
        if state.options.max_cost is not None:
            from .spend import Spend, ledger_name, summary_line

            spend = Spend.of(state.store.get_state(ledger_name(state.run_token)))
            lines.append(summary_line(state.options.max_cost, spend))
        return lines + self.batch_lines

    def print_summary(self, tr: pytest.TerminalReporter) -> None:
        """The one place the run's figures are formatted for the terminal."""
        from .results import format_analysis, format_summary

        summary = self.summary
        assert summary is not None
        tr.write_sep("=", f"llmbench summary ({summary.mode}, model {self.state.llm_config.model})")
        for line in format_summary(summary.summaries, summary.total):
            tr.write_line(line)
        for line in format_analysis(summary.summaries, summary.total, summary.compared):
            tr.write_line(line)
        tr.write_line(origin_line(self.state, summary.total))
        for line in self.notes():
            tr.write_line(line)
        if summary.gates:
            tr.write_line("")
            for g in summary.gates:
                tr.write_line(g.message, green=g.passed, red=not g.passed, bold=not g.passed)
            holds = all(g.passed for g in summary.gates)
            verdict = "all gates hold" if holds else "a gate failed"
            tr.write_line(f"llmbench gates: {verdict}; gates decide the exit status")
        if summary.report_path is not None:
            tr.write_line(f"llmbench report: {summary.report_path}")
        if self.html_path is not None:
            tr.write_line(f"llmbench HTML report: {self.html_path}")
        sys.stdout.flush()

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_summary(
        self, prefix: list[str], summary: list[str], postfix: list[str], session: Any
    ) -> None:
        """pytest-html's report gets the llmbench summary (its hook; only with that plugin)."""
        from .results import format_analysis, format_summary

        if self.summary is None:
            return
        s = self.summary
        lines = [
            *format_summary(s.summaries, s.total),
            *format_analysis(s.summaries, s.total, s.compared),
        ]
        lines.append(origin_line(self.state, s.total))
        lines += [g.message for g in s.gates]
        prefix.append(pytest_html_section(lines))


class XdistController:
    """The controller's xdist hooks: registered only when xdist is loaded, so that their
    names need not exist otherwise."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.planned = False

    def pytest_configure_node(self, node: WorkerController) -> None:
        node.workerinput["llmbench"] = self.controller.state.shared_for_children()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> Generator[None, Any, Any]:
        return (yield from self.interruptible())

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, Any, Any]:
        return (yield from self.interruptible())

    def interruptible(self) -> Generator[None, Any, Any]:
        """A Ctrl-C or SIGTERM while xdist starts or drives its workers ends the session
        with the interrupt's one line, whatever the signal broke on its way: the handler
        raises wherever it finds the main thread (inside pytest's own code, whose frames
        pytest may then fail to show), and a terminal's Ctrl-C also reaches the workers,
        so execnet's wait for a worker still starting ends in an EOFError that replaces
        the interrupt."""
        from .errors import RunInterrupted

        try:
            return (yield)
        except BaseException:
            interrupts = self.controller.interrupts
            if interrupts is None or interrupts.message is None:
                raise
            raise RunInterrupted(interrupts.message) from None

    def pytest_xdist_node_collection_finished(self, node: WorkerController, ids: list[str]) -> None:
        # The first worker to finish collecting says whether tests use `llm` (and, when
        # the fetch has not started yet, what to plan); scheduling waits for this hook.
        if self.planned:
            return
        self.planned = True
        from .plan import read_collection_flag

        nodeids, calls = read_collection_flag(self.controller.state, node.workerinput["workerid"])
        self.controller.collected(nodeids, calls)


def prefetch_line(stats: PrefetchStats) -> str:
    rate = stats.fetched / stats.fetch_s if stats.fetch_s > 0 else 0.0
    return (
        f"llmbench prefetch: planned {stats.planned} request(s) in {stats.plan_s:.1f}s, "
        f"fetched {stats.fetched} in {stats.fetch_s:.1f}s ({rate:.1f}/s), {stats.failed} "
        f"failed (a refusal fails its case, a timeout or 5xx is tried again live), "
        f"429s {stats.rate_limited}, retries {stats.retries}"
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
        "concurrency": stats.concurrency,
        "concurrency_adaptive": stats.concurrency_adaptive,
    }


def pacing_line(state: RunState, fetch: PrefetchStats | None = None) -> str | None:
    """How the run's requests were paced: by the configured limits, by the limits the
    budget learned from the server's headers, or not at all; and, with a prefetch, the
    concurrency it settled at. The budget of the run's model is asked, since it knows
    whether any process learned a limit; None when it cannot tell (or cannot be
    reached)."""
    from .errors import BudgetError
    from .transport import budget_for

    cfg = state.llm_config
    alone = f"concurrency alone (--llm-concurrency {cfg.max_concurrency}) bounds it"
    settled = ""
    if fetch is not None:
        alone = f"concurrency alone bounds it: {fetch.concurrency_text()}"
        settled = f"; concurrency {fetch.concurrency_text()}"
    if cfg.budget_url == "none":
        return f"llmbench pacing: not paced (--llm-budget none); {alone}"
    try:
        budget = budget_for(cfg, cfg.model)
        try:
            learned = getattr(budget, "learned_limits", lambda: None)()
            granted = getattr(budget, "opening_granted", lambda: None)()
        finally:
            budget.close()
    except BudgetError:
        learned = granted = None
    opening = opening_text(granted) if cfg.opening_burst and granted is not None else ""
    if cfg.rpm is not None or cfg.tpm is not None:
        set_ = [f"{n} {v}" for n, v in (("rpm", cfg.rpm), ("tpm", cfg.tpm)) if v is not None]
        also = " and the server's x-ratelimit headers (the lower limit wins)" if learned else ""
        by = f"--llm-rpm/--llm-tpm ({', '.join(set_)}){also}"
        return f"llmbench pacing: paced by {by}{opening}{settled}"
    if learned is None:
        return None
    if learned:
        return f"llmbench pacing: paced by the server's x-ratelimit headers{opening}{settled}"
    return f"llmbench pacing: not paced: the server sends no rate-limit headers; {alone}"


def opening_text(granted: float) -> str:
    """What ``--llm-opening-burst`` did, for the pacing line: the level the budget's last
    opening was raised to, as the server advertised it."""
    if granted:
        return (
            f"; the opening burst allowed up to {int(granted)} requests at once, as the "
            "server advertised (--llm-opening-burst)"
        )
    return (
        "; opening burst on (--llm-opening-burst), not used: no first answer advertised "
        "more than the burst cap"
    )


def origin_line(state: RunState, total: SuiteSummary) -> str:
    """Where this run's answers came from: sent now, or replayed (store or cassettes)."""
    from .store import SIM_ORIGIN

    where = "the built-in simulator" if state.origin == SIM_ORIGIN else state.origin
    line = f"llmbench answers from {where}: {total.requests} request(s) sent in this run"
    if total.cached:
        source = "cassettes" if state.record_mode == "none" else "the store"
        line += f", {total.cached} answer(s) replayed from {source} (recorded on {where})"
    return line


def _to_dict(obj: Any) -> dict[str, Any]:
    return {} if obj is None else dict(obj.to_dict())


def _workers(config: pytest.Config) -> int:
    n = getattr(config.option, "numprocesses", None)
    try:
        return int(n) if n else 0
    except (TypeError, ValueError):
        return os.cpu_count() or 1


def _ini_set(config: pytest.Config, name: str) -> bool:
    try:
        return bool(config.getini(name))  # unset: "" or []
    except (ValueError, KeyError):
        return False


def _asks_help(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "help", False) or getattr(config.option, "version", 0))


def parse_gates(texts: tuple[str, ...]) -> list[Gate]:
    from .gates import parse_gate

    try:
        return [parse_gate(text) for text in texts]
    except ConfigError as exc:
        raise pytest.UsageError(f"--llm-gate: {exc}") from None


def load_prices(path: Path | None) -> PriceTable:
    """The price table, overridden by ``--llm-prices`` (read now, not after the run)."""
    from .pricing import PriceTable

    try:
        return PriceTable.load(Path(path)) if path is not None else PriceTable()
    except ConfigError as exc:
        raise pytest.UsageError(f"--llm-prices: {exc}") from None


def check_budget(state: RunState) -> None:
    """Reach a Redis budget now: an unreachable one is a usage error, not a crash later."""
    cfg = state.llm_config
    if cfg.budget_url is None or cfg.budget_url == "none":
        return
    from .errors import BudgetError
    from .transport import budget_for

    try:
        budget = budget_for(cfg, cfg.model)
    except BudgetError as exc:
        raise pytest.UsageError(f"--llm-budget: {exc}") from None
    budget.close()


def start_simulator(config: pytest.Config, state: RunState) -> Simulator:
    """Start the in-process simulator for ``--llm-sim`` (controller only); the run's
    requests go to it."""
    from .sim import SimConfig, Simulator

    data: dict[str, Any] = {}
    path = state.options.sim_config
    if path is not None:
        data.update(_read_json(Path(path), "--llm-sim-config"))
    for part in config.hook.pytest_llmbench_sim_config(config=config):
        if not part:
            continue
        for key, value in part.items():
            if key == "answer_key":
                data.setdefault("answer_key", [])
                data["answer_key"] = [*data["answer_key"], *value]
            else:
                data[key] = value
    try:
        sim_config = SimConfig.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError, shortened
        first = str(exc).splitlines()
        raise pytest.UsageError(
            f"--llm-sim: invalid simulator settings: {' '.join(first[:3])}"
        ) from None
    sim = Simulator(sim_config, port=0)
    sim.start()
    state.llm_config = state.llm_config.with_changes(base_url=sim.base_url)
    return sim


def _read_json(path: Path, option: str) -> dict[str, Any]:
    data = read_json(path, f"{option}: {path}")
    if not isinstance(data, dict):
        raise pytest.UsageError(f"{option}: {path} must hold a JSON object")
    return data
