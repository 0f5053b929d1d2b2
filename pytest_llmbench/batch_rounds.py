"""Rounds of dependent calls, and what the batch stage of a run came to.

The plan subprocess only finds the calls a test makes before it needs an answer; a call
built from an earlier answer shows up when the plan runs again with that answer stored.
So a ``--batch-api`` run plans and batches in rounds, one per level of dependent calls.
:class:`Rounds` is the bookkeeping across those rounds, kept apart from the API so its
rules can be read and tested on their own: a request is asked at most once per
invocation, a call whose request changes between rounds (a timestamp or randomness in
the prompt) fails instead of being resubmitted forever, and ``--llm-batch-max-rounds``
bounds the depth.

:class:`BatchStats` is the stage's result: the fetchers fill a :class:`FetchLog`, the
rounds add theirs, and the summary adds the cost. Its :meth:`BatchStats.to_report` is the
one place that spells the keys of the report's ``run.batch``; the summary lines are read
back from that same record, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plan import PlannedRequest
    from .pricing import PriceTable
    from .results import CaseResult

LIVE_NOTE = "; left to the live API"


@dataclass
class FetchLog:
    """What the Batch API fetchers of one invocation did, across every round."""

    submitted: list[str] = field(default_factory=list)  # job ids submitted by this run
    resumed: list[str] = field(default_factory=list)  # found open at the start of a round
    lost: list[str] = field(default_factory=list)  # saved jobs the API does not know
    problems: list[str] = field(default_factory=list)  # failed / cancelled jobs
    failed: set[str] = field(default_factory=set)  # requests that failed for good
    waited_s: float = 0.0

    def jobs(self) -> list[str]:
        """The jobs whose results this invocation collected (or is waiting for)."""
        return [i for i in [*self.resumed, *self.submitted] if i not in self.lost]


class Rounds:
    """The rounds of dependent calls of one invocation: what was asked, and what fails."""

    def __init__(self, max_rounds: int) -> None:
        self.max_rounds = max_rounds
        self.count = 0  # rounds batched
        self.plan_s = 0.0  # every plan subprocess, summed
        self.only: set[str] | None = None  # the node ids the next plan runs (None: all)
        self.asked: set[str] = set()
        self.slots: dict[tuple[str, int], str] = {}  # (node id, call ordinal) -> key asked
        self.changed: dict[str, str] = {}  # key -> reason: request changed between rounds
        self.too_deep: dict[str, str] = {}  # key -> reason: beyond --llm-batch-max-rounds

    def plan(
        self,
        planned: Sequence[PlannedRequest],
        plan_s: float,
        is_answered: Callable[[str], bool],
    ) -> list[PlannedRequest]:
        """The requests of one plan to batch: not answered, not asked before, not changed."""
        self.plan_s += plan_s
        # only a test that stopped at an unanswered call can ask something new
        self.only = {p.nodeid for p in planned}
        fresh: list[PlannedRequest] = []
        for p in planned:
            if p.key in self.asked or is_answered(p.key):
                continue  # answered, or failed in this invocation (left to live)
            earlier = self.slots.get((p.nodeid, p.ordinal))
            if earlier is not None and earlier != p.key:
                self.changed[p.key] = (
                    f"call {p.ordinal} of this test sent a different request in plan round "
                    f"{self.count + 1} than before: a prompt that changes from run to run "
                    "(time, randomness) cannot be answered through the Batch API"
                )
                continue
            fresh.append(p)
        return fresh

    def exhausted(self, fresh: Sequence[PlannedRequest]) -> bool:
        """Whether the round limit is reached; then each of ``fresh`` fails with that."""
        if self.count < self.max_rounds:
            return False
        for p in fresh:
            self.too_deep[p.key] = (
                f"not answered: this test needs more than --llm-batch-max-rounds "
                f"{self.max_rounds} round(s) of dependent calls"
            )
        return True

    def start(self, fresh: Sequence[PlannedRequest]) -> None:
        """A round batches ``fresh``: none of them is asked again in this invocation."""
        self.count += 1
        for p in fresh:
            self.asked.add(p.key)
            self.slots[(p.nodeid, p.ordinal)] = p.key

    @property
    def errors(self) -> dict[str, str]:
        """The requests that fail for good without being sent: key -> reason."""
        return {**self.changed, **self.too_deep}

    def notes(self, live: bool) -> list[str]:
        errors = self.errors
        deep = sum(1 for k in errors if k in self.too_deep)
        notes: list[str] = []
        if deep:
            notes.append(
                f"{deep} request(s) still unanswered after {self.count} round(s) (raise "
                "--llm-batch-max-rounds)" + (LIVE_NOTE if live else "")
            )
        if len(errors) > deep:
            notes.append(f"{len(errors) - deep} request(s) changed between plan rounds")
        return notes


@dataclass(frozen=True)
class BatchCost:
    """The batch-answered cases' tokens at batch prices and at real-time prices."""

    batch_usd: float = 0.0
    realtime_usd: float = 0.0
    priced: bool = True  # False: a model has no price

    @classmethod
    def of(cls, cases: Sequence[CaseResult], prices: PriceTable) -> BatchCost:
        batch = realtime = 0.0
        priced = True
        for c in cases:
            if not c.batch or (c.prompt_tokens == 0 and c.completion_tokens == 0):
                continue
            half = prices.cost(c.model, c.prompt_tokens, c.completion_tokens, batch=True)
            full = prices.cost(c.model, c.prompt_tokens, c.completion_tokens)
            if half is None or full is None:
                priced = False
                continue
            batch += half
            realtime += full
        return cls(batch, realtime, priced)

    def to_report(self) -> dict[str, float | None]:
        def usd(value: float) -> float | None:
            return round(value, 6) if self.priced else None

        return {
            "cost_usd": usd(self.batch_usd),
            "realtime_cost_usd": usd(self.realtime_usd),
            "saved_usd": usd(self.realtime_usd - self.batch_usd),
        }

    def line(self) -> str:
        from .results import format_cost

        if not self.priced:
            return "llmbench batch: saving unknown (a model has no price; see --llm-prices)"
        saved = self.realtime_usd - self.batch_usd
        pct = f" ({saved / self.realtime_usd:.0%})" if self.realtime_usd > 0 else ""
        return (
            f"llmbench batch: estimated cost {format_cost(self.batch_usd)} at batch prices vs "
            f"{format_cost(self.realtime_usd)} for the same tokens in real time: saved "
            f"{format_cost(saved)}{pct}"
        )


@dataclass
class BatchStats:
    """What the batch stage of a run came to (the report's ``run.batch``).

    ``plan_s`` is None when no plan ran (the stage did not run); ``settled`` is False
    when the stage stopped early (timeout, detach, an API error): then the failure
    figures are not known and not reported.
    """

    jobs: list[str] = field(default_factory=list)
    waited_s: float = 0.0
    rounds: int = 0
    plan_s: float | None = None
    failed: int = 0  # requests that failed in the Batch API
    unanswered: int = 0  # those, and the requests never sent (round limit, changed)
    notes: list[str] = field(default_factory=list)
    settled: bool = False
    cost: BatchCost | None = None  # added by the summary, once the cases are known

    @classmethod
    def of(cls, rounds: Rounds, log: FetchLog) -> BatchStats:
        """The figures known however the stage ended."""
        return cls(log.jobs(), log.waited_s, rounds.count, rounds.plan_s)

    def settle(self, rounds: Rounds, log: FetchLog, live: bool) -> BatchStats:
        """Add the figures of a stage that ran to its end."""
        self.failed = len(log.failed)
        self.unanswered = self.failed + len(rounds.errors)
        self.notes = list(log.problems)
        if self.failed:
            self.notes.append(
                f"{self.failed} request(s) failed in the Batch API" + (LIVE_NOTE if live else "")
            )
        if log.lost:
            self.notes.append(f"job(s) unknown to the API, submitted again: {', '.join(log.lost)}")
        self.notes += rounds.notes(live)
        self.settled = True
        return self

    def to_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobs": list(self.jobs),
            "waited_s": round(self.waited_s, 3),
            "rounds": self.rounds,
        }
        if self.plan_s is not None:
            out["plan_s"] = round(self.plan_s, 3)
        if self.settled:
            out.update(failed=self.failed, unanswered=self.unanswered, notes=list(self.notes))
        if self.cost is not None:
            out.update(self.cost.to_report())
        return out

    @classmethod
    def from_report(cls, data: dict[str, Any] | None) -> BatchStats:
        """The figures :meth:`to_report` wrote (the cost is not read back)."""
        data = data or {}
        return cls(
            jobs=list(data.get("jobs", [])),
            waited_s=float(data.get("waited_s", 0.0)),
            rounds=int(data.get("rounds", 0)),
            plan_s=data.get("plan_s"),
            failed=int(data.get("failed", 0)),
            unanswered=int(data.get("unanswered", 0)),
            notes=list(data.get("notes", [])),
            settled="notes" in data,
        )

    def summary_lines(self, answered: bool) -> list[str]:
        """The summary's batch lines; the cost line only when a case was ``answered``
        through the Batch API (in this run or an earlier one)."""
        jobs = f" ({', '.join(self.jobs)})" if self.jobs else " (every answer was stored already)"
        lines = [
            f"llmbench batch: {self.rounds} round(s), {len(self.jobs)} job(s){jobs}"
            f", waited {self.waited_s:.1f}s for the Batch API"
        ]
        if answered and self.cost is not None:
            lines.append(self.cost.line())
        return lines + [f"llmbench batch: {note}" for note in self.notes]
