"""Group commit for the concurrent fetch: the answers that arrive in one turn of the event
loop are saved in one transaction, then handed on; an fsync makes them durable at most
``SYNC_EVERY_S`` later.

A store write with an fsync (``store.py``, ``synchronous=FULL``) blocks the event loop for
0.5-3 ms on this machine's disk, mostly waiting; against a server that answers at once
(``benchmarks/cpu_ceiling.py``) one such commit per turn of the loop took a fifth of the
fetch's time. So an answer is queued the moment it arrives, and the queue is written at
the end of the current turn of the event loop (``call_soon``): within that turn, before
the next request's bookkeeping, in one ``BEGIN IMMEDIATE`` ... ``COMMIT`` without an fsync
(``synchronous=NORMAL``: the commit is atomic and in the operating system's hands, so a
crash, a ``kill -9`` or an interrupt of the process loses nothing). The write-ahead log is
then fsynced (``ResponseStore.sync``) once ``SYNC_EVERY_S`` has passed since the last
time, in a thread of the saver's own (the loop goes on while the disk works: on this
machine a fetch against a fast server went 9-12% faster so), and always by ``flush`` at
the end of the fetch, which waits for it: a power loss or a kernel crash costs at most the
answers of the last ``SYNC_EVERY_S`` or so, which the next run asks for again. A failed
fsync is told to ``unsaved`` (an empty batch) at the next write or at ``flush``.
Only after its commit does ``saved`` run (the journal line that wakes a waiting test, the
progress), so nothing reads an answer before the store has it. A batch that cannot be
written goes to ``unsaved`` with the store's error, all of it: none of it was written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import StoreError
from .store import AnswerLike, PlannedRequest, ResponseStore

Pair = tuple[PlannedRequest, AnswerLike]

#: the longest a committed answer waits for the fsync that makes it survive a power loss
SYNC_EVERY_S = 0.1


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
        self._unsynced = False  # a commit since the last fsync
        self._synced = time.monotonic()  # when the last fsync was
        self._syncing: Future[None] | None = None  # the fsync under way, in the thread
        self._sync_thread: ThreadPoolExecutor | None = None

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
        loop.call_soon(self._write)

    def flush(self) -> None:
        """Write what is queued and fsync: every answer added so far is durable (or handed
        to ``unsaved``) when this returns. Idempotent."""
        self._write(final=True)

    def _write(self, *, final: bool = False) -> None:
        """Write what is queued, hand it on; fsync when it is time (or ``final``)."""
        self._scheduled = False
        batch, self._queue = self._queue, []
        if batch:
            try:
                self.store.save_many(batch, source=self.source, replace=self.replace, durable=False)
            except StoreError as exc:
                self.unsaved(batch, exc)  # none of it written
            else:
                self.commits += 1
                self._unsynced = True
                self.saved(batch)  # in the store: readable, safe from a crash of the process
        self._synced_yet(wait=final)
        if final:
            if self._unsynced:
                self._unsynced = False
                self._sync()
            if self._sync_thread is not None:
                self._sync_thread.shutdown()
                self._sync_thread = None
        elif (
            self._unsynced
            and self._syncing is None
            and time.monotonic() - self._synced >= SYNC_EVERY_S
        ):
            # the fsync waits for the disk in a thread, not on the event loop
            self._unsynced, self._synced = False, time.monotonic()
            self._syncing = self._syncer().submit(self.store.sync)

    def _synced_yet(self, *, wait: bool) -> None:
        """Whether the fsync under way in the thread is done (``wait``: wait for it); if
        it failed, say so: the answers are stored, but a disk that cannot sync will not
        keep the next ones either, so an empty batch to ``unsaved`` stops the run."""
        syncing = self._syncing
        if syncing is None or not (wait or syncing.done()):
            return
        self._syncing = None
        exc = syncing.exception()
        if isinstance(exc, StoreError):
            self.unsaved([], exc)
        elif exc is not None:
            raise exc

    def _sync(self) -> None:
        self._synced = time.monotonic()
        try:
            self.store.sync()
        except StoreError as exc:
            self.unsaved([], exc)

    def _syncer(self) -> ThreadPoolExecutor:
        if self._sync_thread is None:
            self._sync_thread = ThreadPoolExecutor(1, thread_name_prefix="llmbench-fsync")
        return self._sync_thread
