"""``--llm-max-cost USD``: what this run has spent, shared by every process, and its cap.

Before a request is sent, its **worst case** is reserved: its prompt tokens (counted as
the API counts them, ``tokens.py``) and its output bound (``n`` x ``max_completion_tokens``
or ``max_tokens``; ``--llm-max-tokens`` when it sets neither) at the price table's
prices. When an answer arrives, its reservation becomes its real cost, from the answer's
``usage`` (Batch API answers at half price). A request whose worst case does not fit
under the cap beside what is spent and what is in flight waits for the requests in flight
to settle; when it still does not fit, the run stops like a fatal refusal: the reason goes
to the run's stop file (every process sends nothing more), the answers stored so far are
kept, and the session exits with status 6. So a run spends at most the cap, and stops less
than one request's worst case below it.

**Where the spend lives**: in the response store's ``state`` table, one row per run
(``spend-<run token>``), changed in one ``BEGIN IMMEDIATE`` transaction per reservation or
answer. The store is the one shared thing every process of a run opens (the controller,
its fetch thread, every xdist worker) and the place the answers whose usage is the spend
are saved. The rate-limit budget is not: it may be ``none`` (nothing shared), it is kept
per model while the cap is per run, and with Redis it is shared by other machines' runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import RunStopped
from .tokens import output_bound, request_prompt_tokens

if TYPE_CHECKING:
    from .pricing import PriceTable
    from .store import ResponseStore

#: how often a request that does not fit checks whether those in flight have settled
POLL_S = 0.02


def ledger_name(run_token: str) -> str:
    return f"spend-{run_token}"


def usd(value: float) -> str:
    """A cap as people write it: ``0.50``, ``12``, ``0.005``."""
    if value >= 0.01 and round(value, 2) == value:
        return f"{value:.2f}"
    return f"{value:g}"


class _Over(Exception):
    """Raised inside the ledger's transaction: nothing is written."""

    def __init__(self, spent: float, reserved: float) -> None:
        super().__init__()
        self.spent, self.reserved = spent, reserved


@dataclass
class Spend:
    """The run's ledger as stored: USD settled and USD reserved by requests in flight."""

    spent: float = 0.0
    reserved: float = 0.0
    answers: int = 0

    @classmethod
    def of(cls, value: Any) -> Spend:
        if not isinstance(value, Mapping):
            return cls()
        return cls(
            float(value.get("spent", 0.0)),
            max(0.0, float(value.get("reserved", 0.0))),
            int(value.get("answers", 0)),
        )

    def dump(self) -> dict[str, Any]:
        return {"spent": self.spent, "reserved": self.reserved, "answers": self.answers}


class CostCap:
    """The cap of one process, on the ledger every process of the run shares.

    ``on_stop(reason)`` runs once when a request does not fit (trip the run's stop file,
    stop the fetch); the request then raises :class:`RunStopped` unsent.
    """

    def __init__(
        self,
        cap: float,
        prices: PriceTable,
        store: ResponseStore,
        run_token: str,
        *,
        default_max_tokens: int,
        on_stop: Callable[[str], None],
        wait_s: float = 90.0,
    ) -> None:
        self.cap, self.prices, self.store = cap, prices, store
        self.name = ledger_name(run_token)
        self.default_max_tokens = default_max_tokens
        self.on_stop = on_stop
        self.wait_s = wait_s  # longest wait for requests in flight (a crashed process's)

    def worst_case(self, body: Mapping[str, Any], prompt_tokens: int | None = None) -> float:
        """The most ``body`` can cost, or stop the run when its model has no price."""
        model = str(body.get("model") or "")
        bound = output_bound(body)
        if bound is None:
            bound = int(body.get("n") or 1) * self.default_max_tokens
        if prompt_tokens is None:
            prompt_tokens = request_prompt_tokens(body)
        cost = self.prices.cost(model, prompt_tokens, bound)
        if cost is None:
            self._stop(
                f"--llm-max-cost {usd(self.cap)}: the price table has no price for model "
                f"{model!r}; add it with --llm-prices FILE and run the same command"
            )
        assert cost is not None
        return cost

    # ------------------------------------------------------------------ reserving
    def reserve(self, body: Mapping[str, Any], prompt_tokens: int | None = None) -> float:
        """Reserve ``body``'s worst case (USD, returned); waits for requests in flight
        when it does not fit, and stops the run when it still does not."""
        worst = self.worst_case(body, prompt_tokens)
        deadline = time.monotonic() + self.wait_s
        while (over := self._try(worst)) is not None:
            self._give_up_unless_waiting(over, worst, deadline)
            time.sleep(POLL_S)
        return worst

    async def areserve(self, body: Mapping[str, Any], prompt_tokens: int | None = None) -> float:
        """The async twin of :meth:`reserve` (the wait lets the requests in flight of this
        event loop finish)."""
        worst = self.worst_case(body, prompt_tokens)
        deadline = time.monotonic() + self.wait_s
        while (over := self._try(worst)) is not None:
            self._give_up_unless_waiting(over, worst, deadline)
            await asyncio.sleep(POLL_S)
        return worst

    def _try(self, worst: float) -> _Over | None:
        def change(value: Any) -> dict[str, Any]:
            spend = Spend.of(value)
            if spend.spent + spend.reserved + worst > self.cap:
                raise _Over(spend.spent, spend.reserved)
            spend.reserved += worst
            return spend.dump()

        try:
            self.store.update_state(self.name, change, durable=False)
        except _Over as over:
            return over
        return None

    def _give_up_unless_waiting(self, over: _Over, worst: float, deadline: float) -> None:
        if over.reserved > 1e-12 and time.monotonic() < deadline:
            return  # what is in flight may cost less than reserved: wait for it
        self._stop(
            f"--llm-max-cost {usd(self.cap)}: spent ${over.spent:.4f} of ${usd(self.cap)} "
            f"(the next request may cost up to ${worst:.4f}); stored answers are kept: "
            "raise the cap and run the same command"
        )

    def _stop(self, reason: str) -> None:
        self.on_stop(reason)
        raise RunStopped(reason)

    # ------------------------------------------------------------------ settling
    def settle(self, worst: float, model: str, usage: Mapping[str, Any]) -> None:
        """An answer arrived: its reservation becomes its cost (from ``usage``)."""
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        cost = self.prices.cost(model, prompt, completion) or 0.0
        self._change(-worst, cost, 1)

    def release(self, worst: float) -> None:
        """A request that was not answered (refused, failed, not sent) costs nothing."""
        self._change(-worst, 0.0, 0)

    def add(self, cost: float) -> None:
        """An answer that had no reservation (the Batch API's)."""
        self._change(0.0, cost, 1)

    def add_batch_answer(self, request: Mapping[str, Any], answer: Mapping[str, Any]) -> None:
        """A Batch API answer arrived: its cost (half price) counts toward the cap."""
        usage = answer.get("usage") or {}
        p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.add(self.prices.cost(str(request.get("model") or ""), p, c, batch=True) or 0.0)

    def _change(self, reserved: float, spent: float, answers: int) -> None:
        def change(value: Any) -> dict[str, Any]:
            spend = Spend.of(value)
            spend.reserved = max(0.0, spend.reserved + reserved)
            spend.spent += spent
            spend.answers += answers
            return spend.dump()

        self.store.update_state(self.name, change, durable=False)

    def spend(self) -> Spend:
        return Spend.of(self.store.get_state(self.name))

    def forget(self) -> None:
        self.store.delete_state(self.name)


def summary_line(cap: float, spend: Spend) -> str:
    """The line under the summary table of a run with a cap."""
    return (
        f"llmbench cost cap: spent ${spend.spent:.4f} of ${usd(cap)} on {spend.answers} "
        "answer(s) received in this run (the price table's prices)"
    )


__all__ = ["CostCap", "Spend", "ledger_name", "summary_line", "usd"]
