"""Kills: SIGKILL of the controller, then of a worker, at each stage of a run.

For each stage (plan, fetch, replay, batch upload, batch polling) the same command runs
three times in a row and is killed each time once the stage is under way: the controller
(pytest's own process) twice, then a worker (the plan process at the plan stage, else
an xdist worker), after which the run goes on to its end. A clean rerun follows. Every
stage is recognised from what the run shows, never from a sleep: the plan process and
its spool (``/proc``: its output goes to the plan's log), the fetch journal, the tests'
result lines, the simulator's upload counter, the Batch API progress line.

Afterwards: every case has its answer and passes, the store opens and holds every answer
(none that was stored is missing), the report validates, no process of a killed
controller is left running, and no answer that was stored was requested again (the
simulator counts each body it answered twice; a body answered again that was *not*
stored when the run began was cut off by the kill between the server and the store, which
no client can keep, and is shown apart).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from pytest_llmbench.sim import SimConfig, Simulator

from ..helpers import FAKE_KEY, wait_for
from .harness import (
    FAST_BATCHES,
    ONE_CALL,
    TWO_CALLS,
    Finished,
    KnownProblem,
    PaidTwice,
    Project,
    Run,
    RunAccount,
    answer_key,
    check_clean,
    litter,
    plan_process,
    plan_spool,
    rows,
    sigkill,
    wait_gone,
    xdist_workers,
)

N = 80  # cases per stage
#: the real-time stages: paced, so that each stage lasts long enough to be hit
REALTIME_ARGS = ("-n", "2", "-v", "--llm-rpm", "2400", "--llm-burst-seconds", "0.25")
#: the fetch stage is paced slower: what the fetch sends while the plan subprocess still
#: runs (up to 1.5 s on a busy machine) is gone before the stage is reached, and the third
#: run must still find a fetch under way once its planning is complete (at 2,400 RPM and a
#: third stored before each kill, the first two runs once left it 9 requests, all answered
#: before its plan subprocess had exited; at 1,200 RPM and a kill at the first answer
#: stored after planning, they left it 55 and 57 beside two CPU hogs)
FETCH_ARGS = ("-n", "2", "-v", "--llm-rpm", "1200", "--llm-burst-seconds", "0.25")
BATCH_ARGS = ("-n", "2", "-v", "--batch-api", "--llm-batch-poll", "0.05")
#: the polling stage: one job held open (validating) while three runs start and poll it,
#: however long they take to (a job open for 18 s was once done before the third run's
#: first poll, on a busy machine); the clean rerun lets it go (``Stage.rerun_sim``)
HELD_BATCH = {
    "batch_validating_seconds": 3600.0,
    "batch_finalizing_seconds": 0.05,
    "batch_requests_per_second": 40.0,
}
TARGETS = ("controller", "controller", "worker")
PLANNED_BEFORE_KILL = 8  # the plan stage is hit once this many requests are planned
STAGE_TIMEOUT_S = 60.0
RESULT_LINE = re.compile(r"^\[gw\d+\] \[ *\d+%\] (PASSED|FAILED|ERROR) ", re.MULTILINE)
POLL_LINE = re.compile(r"^llmbench batch: (validating|in_progress|finalizing) ", re.MULTILINE)


@dataclass
class Watch:
    """One run as the test sees it: what it has shown since it started."""

    project: Project
    run: Run
    before: set[Path]  # the run directory's files when the run started
    stats0: dict[str, Any]
    marks: dict[str, int] = field(default_factory=dict)

    def new_files(self, pattern: str) -> list[Path]:
        return [p for p in self.project.run_dir.glob(pattern) if p not in self.before]

    def journal(self) -> list[str] | None:
        """The lines of this run's fetch journal (None: it has none, or not yet)."""
        new = self.new_files("fetch-*.journal")
        if not new:
            return None
        try:
            return new[0].read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return None

    def stat(self, name: str) -> int:
        return int(self.project.sim.stats()[name]) - int(self.stats0[name])


# ------------------------------------------------------------------------ the stages
def at_plan(w: Watch) -> int | None:
    """The plan subprocess runs and has planned a few requests (which the fetch is
    sending meanwhile): its pid."""
    pid = plan_process(w.run)
    spool = None if pid is None else plan_spool(pid)
    if pid is None or spool is None:
        return None
    try:
        planned = spool.read_bytes().count(b"\n")
    except FileNotFoundError:
        return None
    return pid if planned >= PLANNED_BEFORE_KILL else None


def at_fetch(w: Watch) -> bool:
    """Planning is complete and the fetch has stored some of the answers, not all."""
    lines = w.journal()
    if lines is None or "C" not in lines or any(line.startswith("E ") for line in lines):
        return False
    planned = sum(line.startswith("P ") for line in lines)
    settled = sum(line.startswith("S ") for line in lines)
    return 1 <= settled < planned


def at_replay(w: Watch) -> bool:
    """A test has reported its result while no fetch runs (none was needed, or it has
    ended): the tests replay stored answers and send their dependent calls live."""
    results = len(RESULT_LINE.findall(w.run.output()))
    lines = w.journal()
    fetching = lines is not None and not any(line.startswith("E ") for line in lines)
    if fetching:
        w.marks["results"] = results
        return False
    return results > w.marks.setdefault("results", 0 if lines is None else results)


def at_upload(w: Watch) -> bool:
    """The run has uploaded its second batch input file (of several: a small split),
    so one job is created and saved, another one uploaded."""
    return w.stat("files_uploaded") >= 2


def at_polling(w: Watch) -> bool:
    """The run polls an open job (its progress line shows a status that is not final)."""
    return POLL_LINE.search(w.run.output()) is not None


@dataclass(frozen=True)
class Stage:
    name: str
    reached: Callable[[Watch], Any]
    worker: str  # which process is the stage's worker
    batch: bool = False
    sim: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()  # the command's options (default: by kind, real-time or batch)
    rerun_sim: dict[str, Any] = field(default_factory=dict)  # the simulator's, for the rerun

    def command(self) -> list[str]:
        return list(self.args or (BATCH_ARGS if self.batch else REALTIME_ARGS))


#: the Batch API stage runs before xdist starts its workers: the controller is all there is
NO_WORKER = "controller; no worker runs during the batch stage"

STAGES = {
    "plan": Stage("plan", at_plan, "the plan subprocess"),
    "fetch": Stage("fetch", at_fetch, "an xdist worker", args=FETCH_ARGS),
    "replay": Stage("replay", at_replay, "an xdist worker"),
    "batch upload": Stage(
        "batch upload",
        at_upload,
        NO_WORKER,
        batch=True,
        sim=FAST_BATCHES,
        env={"LLMBENCH_BATCH_MAX_REQUESTS": "10"},  # 8 input files, uploaded one by one
    ),
    "batch polling": Stage(
        "batch polling",
        at_polling,
        NO_WORKER,
        batch=True,
        sim=HELD_BATCH,
        rerun_sim={"batch_validating_seconds": 0.0},  # the held job goes on
    ),
}


def victim(stage: Stage, w: Watch, target: str) -> int | None:
    """The pid to kill once the stage is under way (None: not yet)."""
    reached = stage.reached(w)
    if not reached:
        return None
    if target == "controller" or stage.batch:
        return w.run.pid
    if stage.name == "plan":
        return int(reached)  # the plan subprocess is the plan stage's worker
    workers = xdist_workers(w.run)
    return workers[0] if workers else None


# ------------------------------------------------------------------------ the runs
def killed_run(project: Project, stage: Stage, target: str, args: list[str]) -> Finished | None:
    """Start the command, SIGKILL ``target`` at ``stage``; the run's end if it had one."""
    before = set(project.run_dir.glob("*"))
    run = project.start(*args)
    w = Watch(project, run, before, project.sim.stats())
    try:
        pid = wait_for(
            lambda: victim(stage, w, target) if run.alive() else -1,
            f"the {stage.name} stage of run {project.runs}",
            timeout=STAGE_TIMEOUT_S,
            interval=0.005,
        )
        assert pid != -1, f"the run ended before its {stage.name} stage:\n{run.output()[-3000:]}"
        tree = run.tree()
        sigkill(pid)
        if pid != run.pid:
            return run.wait()  # the controller carries on
        run.proc.wait()
        # a controller gone: every process it started ends too (none keeps sending)
        wait_gone([p for p in tree if p != pid], f"the processes of the killed run {project.runs}")
        return None
    finally:
        if run.alive():
            run.kill_all()


def batch_custom_ids(sim: Simulator) -> tuple[dict[str, int], int]:
    """How many created jobs each custom_id (= store key) was in, and how many jobs were
    created, from the simulator."""
    api = openai.OpenAI(api_key=FAKE_KEY, base_url=sim.base_url, max_retries=0)
    counts: dict[str, int] = {}
    jobs = api.batches.list(limit=100).data
    for b in jobs:
        for line in api.files.content(b.input_file_id).text.splitlines():
            cid = str(json.loads(line)["custom_id"])
            counts[cid] = counts.get(cid, 0) + 1
    api.close()
    return counts, len(jobs)


@dataclass
class Tally:
    """The three killed runs and the clean rerun, as figures."""

    stage: Stage
    calls: int
    stored_ever: set[str] = field(default_factory=set)  # every answer seen stored
    retries: int = 0
    problems: list[str] = field(default_factory=list)

    def killed(self, project: Project, end: Finished | None, report: Path) -> None:
        self.stored_ever |= set(project.stored_hashes())
        if end is None:
            return
        if "INTERNALERROR" in end.output or "Traceback (most recent" in end.output:
            self.problems.append(
                f"the run whose {self.stage.worker} was killed at the {self.stage.name} "
                f"stage ended with a traceback (exit {end.returncode}):\n{end.output[-2500:]}"
            )
        if report.exists():
            self.retries += int(project.report(report.name)["totals"]["retries"])


def check_account(paid: PaidTwice, account: RunAccount, killed: str) -> None:
    """A run's answers add up: none paid twice; what was not stored was cut off by the
    kill (a worker runs one test at a time: its one call at most; a run nobody killed:
    none); what was asked again had been cut off before, never more."""
    assert account.paid_twice == 0, account
    if killed != "controller":
        assert account.not_stored <= (1 if killed == "worker" else 0), account
    assert paid.asked_again <= sum(r.not_stored for r in paid.runs[:-1]), paid.runs


@pytest.mark.parametrize("name", list(STAGES))
def test_kills(name: str, tmp_path: Path, survives: Callable[..., Any]) -> None:
    stage = STAGES[name]
    items = rows(N)
    settings = {
        "seed": 5,
        "answer_key": answer_key(items, dependent=not stage.batch),
        "p_correct": 1.0,
        "latency": {"kind": "fixed", "mean": 0.05},
        **stage.sim,
    }
    with Simulator(SimConfig.model_validate(settings), port=0) as sim:
        project = Project(tmp_path / "project", sim, env_extra=dict(stage.env))
        project.dataset("data.jsonl", items)
        project.suite("test_kills", ONE_CALL if stage.batch else TWO_CALLS, "data.jsonl")
        args = stage.command()
        paid = PaidTwice(project)
        tally = Tally(stage, N if stage.batch else 2 * N)

        # Given three runs in a row, each SIGKILLed once the stage is under way
        for k, target in enumerate(TARGETS, 1):
            paid.before_run()
            end = killed_run(project, stage, target, [*args, "--llm-report", f"r{k}.json"])
            account = paid.after_run()
            tally.killed(project, end, project.path / f"r{k}.json")
            if not stage.batch:
                check_account(paid, account, target)

        # When the same command runs once more, undisturbed
        if stage.rerun_sim:
            sim.configure(**stage.rerun_sim)
        stored_before = set(project.stored_hashes())
        paid.before_run()
        sent_before = sim.stats()["chat_requests"]
        final = project.run(*args, "--llm-report", "report.json")
        rerun = paid.after_run()
        sent = sim.stats()["chat_requests"] - sent_before
        per_id, jobs = batch_custom_ids(sim) if stage.batch else ({}, 0)
        live = sim.stats()["chat_requests"]

    # Then the results are complete, from the store, and nothing stored was paid again
    check_clean(final.output)
    assert final.returncode == 0, final.output[-3000:]
    totals = project.report()["totals"]
    assert (totals["cases"], totals["passed"]) == (N, N), totals
    stored_after = project.stored_hashes()
    lost = len(tally.stored_ever - set(stored_after))
    assert lost == 0
    assert len(stored_after) == tally.calls
    assert totals["cached"] == len(stored_before)
    if stage.batch:
        assert live == 0  # nothing went to the real-time API
        # no faults are injected: a request in two jobs was sent (and paid) twice
        twice = sum(n - 1 for n in per_id.values())
        assert set(per_id) == set(stored_after.values())  # every answer from one job
    else:
        assert sent == tally.calls - len(stored_before), (sent, tally.calls, len(stored_before))
        check_account(paid, rerun, "nothing")
        twice = paid.paid_twice
    assert twice == 0
    left = litter(project)
    if stage.batch:
        paid_note = f"{jobs} job(s) created across the runs, each request in exactly one"
    else:
        paid_note = (
            f"{paid.cut_off} answer(s) cut off by a kill between server and store, "
            f"{paid.asked_again} of them asked again"
        )
    survives(
        item=f"Kills: {name}",
        cases=N,
        faults=f"3 SIGKILLs (controller, controller, {stage.worker})",
        retries=tally.retries + int(totals["retries"]),
        paid_twice=twice,
        lost=lost,
        outcome=(
            f"rerun complete ({totals['passed']}/{N} passed, {totals['cached']} of "
            f"{tally.calls} answers replayed, {sent} sent); {paid_note}"
            + (f"; left behind: {left}" if left else "")
            + ("; a worker kill ended its run with INTERNALERROR" if tally.problems else "")
        ),
    )
    if tally.problems:
        raise KnownProblem("\n".join(tally.problems))
