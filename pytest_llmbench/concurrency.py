"""How many requests one run keeps in flight: an adaptive limit (a latency gradient in the
spirit of TCP Vegas and Netflix's concurrency-limits "Gradient2"), or a fixed one.

Some servers refuse what they cannot serve (429, which the budget handles); others queue
it. llama.cpp's server answers one request at a time (or ``--parallel N``) and queues the
rest without a word: at 64 in flight every request waits behind 63 others, so latency
grows 64-fold and a slow model times out in the queue, while throughput is no better
than at one or two in flight. Latency is the only sign of such a queue, so the limit
follows it:

* the **baseline** is the no-load latency: the lowest median of a window seen so far, a
  window run at one in flight replaces it (one in flight is unloaded by definition), and
  it may rise by 10 % a window, so answers that are slower for a while (longer prompts)
  are not taken for a queue forever;
* a **window** is ``max(3, limit / 2)`` answers of requests sent under the current limit
  (answers of requests sent before a change are not counted);
* after a window whose median latency is within ``TOLERANCE`` (1.5x) of the baseline, the
  limit grows, but only if the window used it (in flight reached the limit): it doubles
  until the first decrease (slow start), then grows by ``sqrt(limit) / 2`` (at least 1),
  and not in the ``HOLD`` (3) windows after a decrease: a server with N slots shows a
  queue as soon as N + 1 are in flight, so probing upward at every window would keep a
  request waiting much of the time;
* after a window beyond the tolerance the limit becomes ``limit * baseline / median``
  (rounded, at least 1): against a server queueing its N slots, latency is
  ``limit / N`` times the baseline, so this lands on N;
* the limit starts at 1 for one window (the baseline must be measured unloaded), then
  jumps to ``min(maximum, 8)``, and stays within 1 .. ``maximum`` (``--llm-concurrency``).

A server that does not queue (the OpenAI API) keeps its latency whatever the load, so the
limit doubles to the maximum within a few round trips. ``--llm-concurrency-fixed`` keeps
``maximum`` in flight from the start, as before. Failures give no sample (a 429 is the
budget's business; a timeout is retried).
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections import deque

TOLERANCE = 1.5  # a window's median latency beyond this multiple of the baseline: a queue
START = 8  # the limit after the first (unloaded) window, at most the maximum
MIN_WINDOW = 3  # answers per window at least
DRIFT = 1.1  # the baseline may rise by this factor per window
HISTORY = 8  # windows the settled figure is the median of (at most)
HOLD = 3  # windows after a decrease without growing


class Concurrency:
    """The gate every request of a run passes: :meth:`acquire` before sending, and
    :meth:`release` with the answer's latency (None: no answer) once it is done."""

    def __init__(self, maximum: int, *, adaptive: bool = True) -> None:
        self.maximum = maximum
        self.adaptive = adaptive
        self.limit = 1 if self.adaptive else maximum
        self.in_flight = 0
        self.baseline = math.inf
        self.slow_start = True
        self.hold = 0  # windows left without growing
        self.history: list[int] = []  # the limit after each window
        self._generation = 0
        self._samples: list[float] = []
        self._used = False  # in flight reached the limit during this window
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def settled(self) -> int:
        """The limit the run settled on: the median limit of the later half of the
        windows (the last ``HISTORY`` at most), past the first probing ones."""
        if not self.adaptive or not self.history:
            return self.limit
        recent = self.history[-min(HISTORY, (len(self.history) + 1) // 2) :]
        return round(statistics.median(recent))

    async def acquire(self) -> int:
        """Wait for a free slot; returns the token to hand back to :meth:`release`."""
        loop = asyncio.get_running_loop()
        while self.in_flight >= self.limit:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake()  # woken, then cancelled: the slot goes to the next one
                raise
        self.in_flight += 1
        if self.in_flight >= self.limit:
            self._used = True
        return self._generation

    def release(self, token: int, latency: float | None) -> None:
        """A request is done; ``latency`` is its answer's (None: it has none)."""
        self.in_flight -= 1
        if self.adaptive and latency is not None and token == self._generation:
            self._samples.append(latency)
            if len(self._samples) >= max(MIN_WINDOW, math.ceil(self.limit / 2)):
                self._close_window()
        self._wake()

    def _close_window(self) -> None:
        median = statistics.median(self._samples)
        limit = self.limit
        if limit == 1:
            self.baseline = median  # one in flight: unloaded by definition
        baseline = min(self.baseline, median)
        if median > baseline * TOLERANCE:
            self.slow_start, self.hold = False, HOLD
            limit = max(1, round(limit * baseline / median))
        elif limit == 1 and self.slow_start:
            limit = START
        elif self.hold:
            self.hold -= 1
        elif self._used:
            limit = limit * 2 if self.slow_start else limit + max(1, math.isqrt(limit) // 2)
        self.baseline = min(median, baseline * DRIFT)
        self._set(min(self.maximum, limit))

    def _set(self, limit: int) -> None:
        self.history.append(limit)
        self.limit = limit
        self._generation += 1
        self._samples = []
        self._used = self.in_flight >= limit

    def _wake(self) -> None:
        """Wake as many waiters as there are free slots, first come first served."""
        free = self.limit - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
