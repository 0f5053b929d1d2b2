"""The Batch API fetcher: the run's planned requests as few jobs as the API allows, resumable,
at half price.

A batch run is a state machine that may span several pytest invocations: plan, upload,
create, wait (for hours, or not at all with ``--llm-batch-detach``), collect, resubmit
what the API asks to, and plan again for calls that depend on the first answers. Every
step that could be lost to a crash is saved first, so the next identical invocation
resumes where this one stopped and never submits the same request twice. Results are
joined on ``custom_id``, which *is* the store key (sha256 of node id, ordinal, endpoint,
body), so the order of output lines does not matter.

The parts, each in its own module so it can be read (and tested) alone:

- ``batch_ledger``: the job records saved in the store, and failures (:class:`JobLedger`);
- ``batch_api``: the Batch API calls with their retry policy (:class:`BatchApi`);
- ``batch_wait``: polling until jobs are final, the progress line, detach and timeout;
- ``batch_collect``: settling each request of a finished job, and the per-line retry
  verdict (:func:`~pytest_llmbench.batch_collect.line_verdict`);
- ``batch_rounds``: the rounds of dependent calls (:class:`Rounds`) and the stage's
  statistics (:class:`BatchStats`, the report's ``run.batch``).

- ``batch_runner``: :class:`BatchRunner`, which submits and collects the jobs of one
  invocation, without pytest (a standalone client uses it too: ``batch_client``).

This module ties them to pytest: :func:`make_runner` writes to the terminal,
:func:`fetch_batch` runs one round, :func:`run_rounds` the whole stage (a detach or a
timeout becomes ``pytest.exit``), and :func:`summary_lines` writes the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .batch_api import NoBatchApi
from .batch_collect import Collected
from .batch_ledger import JOBS_STATE, REQUESTS_PREFIX, JobLedger, clear_errors, record_errors
from .batch_rounds import BatchCost, BatchStats, FetchLog, Rounds
from .batch_runner import (
    MAX_BYTES,
    MAX_REQUESTS,
    BatchRunner,
    Limits,
    TokenLimits,
    input_line,
    split_requests,
)
from .batch_wait import TERMINAL, BatchProgress, BatchWaitError
from .errors import FATAL_EXIT_STATUS, LLMCallError
from .plan import run_plan
from .progress import LiveLine, note
from .runtime import stop_message

if TYPE_CHECKING:
    from .pricing import PriceTable
    from .results import CaseResult
    from .runtime import RunState
    from .store import PlannedRequest


def make_runner(config: pytest.Config, state: RunState) -> BatchRunner:
    # input files reach 200 MB: uploads and downloads get more time than a chat call
    client = state.client.openai_client()
    client = client.with_options(timeout=max(state.llm_config.timeout, 600.0))
    return BatchRunner(
        state,
        client,
        state.store,
        lambda total: BatchProgress(LiveLine(config), total),
        limits=_limits(state),
        note=lambda line: note(config, line),
    )


def fetch_batch(
    config: pytest.Config,
    state: RunState,
    planned: Sequence[PlannedRequest],
    runner: BatchRunner | None = None,
) -> int:
    """One round: submit what is neither stored nor in an open job, wait, collect, and
    resubmit what the API asks to (expired lines, 5xx/429 lines, token-limit splits).

    Returns the number of responses stored.
    """
    runner = runner or make_runner(config, state)
    return runner.fetch(planned, state.is_answered)


def run_rounds(
    config: pytest.Config,
    state: RunState,
    workdir: Path,
    publish: Callable[[BatchStats], None],
) -> BatchStats:
    """Plan, batch, and plan again with the first answers until nothing new is asked.

    Each round is one plan subprocess and (when it found unanswered requests) one fetch
    through the Batch API; a test with a call that depends on an earlier answer needs one
    round per level, at most ``--llm-batch-max-rounds``. Requests still unanswered then,
    and requests whose body changed between rounds (a prompt that is not reproducible),
    fail with that reason instead of being sent again and again. The statistics go to
    ``publish`` (the controller) however the stage ends (a timeout or detach exits pytest).
    """
    # failures of earlier invocations are asked again, as a live run would
    clear_errors(state.store)
    stage = _BatchStage(config, state, workdir)
    stats: BatchStats | None = None
    try:
        stage.run()
        stats = stage.settle()
    except NoBatchApi as exc:  # the server has none: one line, no "fix it and rerun"
        pytest.exit(f"llmbench: {exc}", FATAL_EXIT_STATUS)
    except BatchWaitError as exc:  # detached or timed out: the jobs stay saved
        pytest.exit(wait_message(exc), returncode=exc.returncode)
    except LLMCallError as exc:
        if exc.fatal:  # a wrong key, no quota...: every other call would fail the same way
            pytest.exit(stop_message(f"the Batch API refused the run: {exc}"), FATAL_EXIT_STATUS)
        pytest.exit(f"llmbench: a Batch API call failed: {exc}", returncode=1)
    finally:
        if stats is None:  # stopped early: what is known so far
            stats = BatchStats.of(stage.rounds, stage.log)
        publish(stats)
    return stats


class _BatchStage:
    """One invocation's rounds, and the runner made at the first round that sends anything
    (making it needs credentials, which a pure replay does not)."""

    def __init__(self, config: pytest.Config, state: RunState, workdir: Path) -> None:
        self.config = config
        self.state = state
        self.workdir = workdir
        self.rounds = Rounds(state.llm_config.batch.max_rounds)
        self.runner: BatchRunner | None = None

    @property
    def log(self) -> FetchLog:
        return self.runner.log if self.runner is not None else FetchLog()

    def run(self) -> None:
        config, state, rounds = self.config, self.state, self.rounds
        while True:
            planned, plan_s = run_plan(config, state, self.workdir, rounds.only)
            fresh = rounds.plan(planned, plan_s, state.is_answered)
            if not fresh or rounds.exhausted(fresh):
                return
            state.check_credentials()
            if self.runner is None:
                self.runner = make_runner(config, state)
            rounds.start(fresh)
            fetch_batch(config, state, fresh, self.runner)

    def settle(self) -> BatchStats:
        """The statistics of a stage that ran to its end; its unsent requests fail."""
        record_errors(self.state.store, self.rounds.errors, self.state.run_token)
        live = self.state.llm_config.batch.fallback == "live"
        log = self.log
        return BatchStats.of(self.rounds, log).settle(self.rounds, log, live)


def wait_message(exc: BatchWaitError) -> str:
    """What a ``--llm-batch-detach`` or ``--llm-batch-timeout`` exit says."""
    if exc.kind == "detach":
        return (
            f"llmbench: batch job(s) {exc.pending} submitted and running; run the same "
            "command again without --llm-batch-detach to wait for them and collect "
            "the results (nothing is submitted twice)"
        )
    return (
        f"llmbench: batch job(s) {exc.pending} not finished after --llm-batch-timeout "
        f"{exc.timeout:g}s; they are saved in the run directory: run "
        "the same command again to resume waiting (nothing is submitted twice)"
    )


def _limits(state: RunState) -> Limits:
    # lowered limits are a test-only knob (see tests/test_batch.py)
    raw = state.options.batch_max_requests
    return Limits(max_requests=raw) if raw else Limits()


def summary_lines(stats: BatchStats, cases: Sequence[CaseResult], prices: PriceTable) -> list[str]:
    """The batch lines of the summary (jobs, waiting, rounds, saving, problems); also
    adds the cost figures to ``stats`` (the report's ``run.batch``)."""
    stats.cost = BatchCost.of(cases, prices)
    return stats.summary_lines(any(c.batch for c in cases))


__all__ = [
    "JOBS_STATE",
    "MAX_BYTES",
    "MAX_REQUESTS",
    "REQUESTS_PREFIX",
    "TERMINAL",
    "BatchRunner",
    "BatchStats",
    "Collected",
    "JobLedger",
    "LLMCallError",
    "Limits",
    "Rounds",
    "TokenLimits",
    "clear_errors",
    "fetch_batch",
    "input_line",
    "make_runner",
    "record_errors",
    "run_rounds",
    "split_requests",
    "summary_lines",
]
