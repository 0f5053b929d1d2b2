"""Group commit for the concurrent fetch: the answers that arrive in one turn of the event
loop are saved in one transaction, then handed on.

A store write is one fsync'd SQLite commit (``store.py``). One per answer costs the fetch
more CPU and waiting than the request itself once the server answers fast (measured with
``benchmarks/cpu_ceiling.py``). Here an answer is queued the moment it arrives, and the
queue is written at the end of the current turn of the event loop (``call_soon``): within
that turn, before the next request's bookkeeping, in one ``BEGIN IMMEDIATE`` ... ``COMMIT``
with one fsync. Only then does ``saved`` run (the journal line that wakes a waiting test,
the progress), so nothing reads an answer before it is durable. A batch that cannot be
written goes to ``unsaved`` with the store's error, all of it: none of it was written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .errors import StoreError
from .store import AnswerLike, PlannedRequest, ResponseStore

Pair = tuple[PlannedRequest, AnswerLike]


class GroupSaver:
    """Queue answers, commit each turn's queue once (see the module's docstring)."""

    def __init__(
        self,
        store: ResponseStore,
        *,
        source: str,
        replace: bool,
        saved: Callable[[list[Pair]], None],
        unsaved: Callable[[list[Pair], StoreError], None],
    ) -> None:
        self.store, self.source, self.replace = store, source, replace
        self.saved, self.unsaved = saved, unsaved
        self._queue: list[Pair] = []
        self._scheduled = False
        self.commits = 0  # transactions written (for the benchmark and tests)

    def add(self, request: PlannedRequest, answer: AnswerLike) -> None:
        """Queue one answer; it is written at the end of this turn of the running loop
        (at once when no loop runs)."""
        self._queue.append((request, answer))
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued, then hand it on (idempotent when nothing is)."""
        self._scheduled = False
        batch, self._queue = self._queue, []
        if not batch:
            return
        try:
            self.store.save_many(batch, source=self.source, replace=self.replace)
        except StoreError as exc:
            self.unsaved(batch, exc)
            return
        self.commits += 1
        self.saved(batch)
