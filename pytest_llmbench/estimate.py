"""``--llm-estimate``: what a run would send and cost, without sending anything.

The controlling process runs the plan subprocess as the prefetch does (``plan.py``: the same
arguments, so ``-k``, ``-m``, ``--lf`` and ``--llm-limit`` select what the real run would),
then counts every planned request: its prompt tokens (exact with the ``tokens`` extra,
``tokens.py``), its output bound (``n`` x ``max_completion_tokens`` or ``max_tokens``;
"unbounded" when it sets neither) and its cost range at the price table's prices: at least
the prompt alone, at most the prompt and the whole output bound; real-time and through the
Batch API (half price). Answers already stored are not counted: the run replays them.

Not plannable, so not counted: a call after a test's first unanswered call (the plan stops
a test there; a second call that depends on the first answer cannot be known before that
answer exists). The prefetch makes the same cut: such calls are sent live during the run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .plan import PlannedRequest, run_plan
from .pricing import BATCH_DISCOUNT
from .tokens import describe, output_bound, request_prompt_tokens

if TYPE_CHECKING:
    import pytest

    from .pricing import PriceTable
    from .runtime import RunState

NOT_PLANNABLE = (
    "llmbench estimate: a test's calls after its first unanswered one (e.g. a call that "
    "depends on an answer) cannot be planned and are not counted; the run sends them live"
)


@dataclass
class SuiteEstimate:
    """The planned requests of one suite (``module::test``), added up."""

    suite: str
    requests: int = 0
    prompt_tokens: int = 0
    output_bound: int | None = 0  # None: a request sets no bound
    min_usd: float | None = 0.0  # None: a model without a price
    max_usd: float | None = 0.0

    def add(self, req: PlannedRequest, prices: PriceTable) -> None:
        prompt, bound = request_prompt_tokens(req.body), output_bound(req.body)
        model = str(req.body.get("model") or "")
        self.requests += 1
        self.prompt_tokens += prompt
        low = prices.cost(model, prompt, 0)
        self.min_usd = None if low is None or self.min_usd is None else self.min_usd + low
        if bound is None or self.output_bound is None:
            self.output_bound = self.max_usd = None
            return
        self.output_bound += bound
        high = prices.cost(model, prompt, bound)
        self.max_usd = None if high is None or self.max_usd is None else self.max_usd + high

    def merge(self, other: SuiteEstimate) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        a, b = self.output_bound, other.output_bound
        self.output_bound = None if a is None or b is None else a + b
        self.min_usd = _sum(self.min_usd, other.min_usd)
        self.max_usd = _sum(self.max_usd, other.max_usd)


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def suite_of(nodeid: str) -> str:
    """``test_x.py::test_qa`` of ``test_x.py::test_qa[q1-T0]``."""
    return nodeid.split("[", 1)[0]


def estimate(
    planned: Iterable[PlannedRequest], prices: PriceTable
) -> tuple[list[SuiteEstimate], SuiteEstimate]:
    """One row per suite (sorted) and the total."""
    rows: dict[str, SuiteEstimate] = {}
    for req in planned:
        suite = suite_of(req.nodeid)
        rows.setdefault(suite, SuiteEstimate(suite)).add(req, prices)
    total = SuiteEstimate("TOTAL")
    for row in rows.values():
        total.merge(row)
    return sorted(rows.values(), key=lambda r: r.suite), total


def _usd(value: float | None) -> str:
    if value is None:
        return "?"
    return f"${value:,.4f}" if value >= 0.01 else f"${value:.6f}"


def _range(low: float | None, high: float | None, bounded: bool, factor: float) -> str:
    top = _usd(None if high is None else high * factor) if bounded else "unbounded"
    return f"{_usd(None if low is None else low * factor)} - {top}"


HEADERS = ("suite", "requests", "prompt tokens", "output bound", "real-time USD", "Batch API USD")


def format_estimate(rows: list[SuiteEstimate], total: SuiteEstimate) -> list[str]:
    """The estimate as aligned text lines: a header, one line per suite, the total."""
    cells = []
    for row in [*rows, total] if len(rows) > 1 else rows:
        bounded = row.output_bound is not None
        cells.append(
            [
                row.suite,
                f"{row.requests:,}",
                f"{row.prompt_tokens:,}",
                f"{row.output_bound:,}" if bounded else "unbounded",
                _range(row.min_usd, row.max_usd, bounded, 1.0),
                _range(row.min_usd, row.max_usd, bounded, BATCH_DISCOUNT),
            ]
        )
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]

    def line(values: list[str] | tuple[str, ...]) -> str:
        first = values[0].ljust(widths[0])
        rest = (v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return [line(HEADERS), *(line(c) for c in cells)]


def run_estimate(config: pytest.Config, state: RunState, prices: PriceTable) -> list[str]:
    """Plan the run (nothing is sent) and return the lines that describe it."""
    workdir = Path(tempfile.mkdtemp(prefix="llmbench-estimate-"))
    try:
        planned, _ = run_plan(config, state, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows, total = estimate(planned, prices)
    counts = describe(state.llm_config.model).removeprefix("llmbench tokens: ")
    head = (
        f"llmbench estimate: {total.requests:,} request(s) would be sent, nothing was; "
        f"prompt tokens {counts}; answers already stored are not counted"
    )
    lines = [head, *format_estimate(rows, total)] if rows else [head]
    if total.min_usd is None:
        lines.append("llmbench estimate: '?': a model has no price; add it with --llm-prices")
    return [*lines, NOT_PLANNABLE]


__all__ = ["SuiteEstimate", "estimate", "format_estimate", "run_estimate", "suite_of"]
