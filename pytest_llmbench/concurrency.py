"""How many requests one run keeps in flight: an adaptive limit that raises the number
while throughput rises and brings it down when only latency does, or a fixed one
(``--llm-concurrency-fixed``).

Some servers refuse what they cannot serve (429, which the budget handles); others queue
it. llama.cpp's server answers one request at a time (or ``--parallel N``) and queues the
rest without a word: at 64 in flight every request waits behind the others, so the
latency figures measure the queue (SmolLM2 on 2 threads: p50 3.3 s where one request
alone takes 0.2 s) and a slower model times out in it, while throughput is no better
than at one or two in flight. Latency alone cannot tell that queue from other causes: on
a busy 2-core machine the client's own CPU makes latency grow with the load against a
server that does not queue at all, and a limit that followed latency alone (the first
version of this module) settled at 40 of 64 there, costing throughput where nothing
queued. So the limit follows throughput, and latency only says which way to step down.

**A sample** is one answer: its latency, the mean number of requests at the server while
it was out (the gate keeps the integral of that count over time; the count when it was
sent would say 1 for the first of two requests sent and answered together), and how long
it held its slot before the budget let it go. By Little's law (in flight = throughput x
latency) a set of answers saw ``mean in flight / mean latency`` answers per second: a
server that does not queue gives more of them with more in flight, a FIFO queue with N
slots gives ``N / service time`` whatever the count, since each request then waits for
the ones ahead of it. That is a rate with no edge effects of counting answers over a
short wall-clock window. Only requests sent under the current limit once it had been
filled count (the burst sent the moment a limit rises may find an empty server, whose
first answers come back unqueued and look faster than the limit is), first attempts
only; failures give no sample.

**A window** is ``max(3, limit / 4)`` samples while the limit doubles, ``max(3, limit)``
(a whole round) once it has come down. After each (limit ``L``, mean latency ``m``,
throughput ``T``):

* the **baseline** is the no-load latency: the first window runs one request at a time
  and sets it, a lower mean replaces it, and it may rise 5 % a window (answers that are
  slower for a while, longer prompts, are not taken for a queue forever);
* a window **paced** by the budget (median wait over ``PACED`` (0.1) of the latency: a
  rate limit in force and binding) says nothing about the server: the limit stays, and
  never shrinks; concurrency is not what bounds such a run;
* it is compared with the window just before when that one ran at a lower limit ``L'``
  (only that one: the load of the machine and the server drifts, and an older window
  may have seen another): it **gained** when ``T >= T' x (1 + MARGIN x min(1, L/L' - 1))``,
  20 % more throughput for a doubling, 5 % for a step of a quarter;
* gained (or nothing to compare with): the limit doubles, until it first comes down;
  then it is held ``HOLD`` (3) windows and grows by a quarter (at least 1) up to where
  the queue showed, and doubles again past it while no queue shows;
* not gained, ``m`` beyond ``TOLERANCE`` (1.3) x the baseline: latency rose without
  throughput, a queue. The limit **backs off** to ``round(T x baseline)``, what that
  throughput needs at no-load latency (Little's law again): N against N slots;
* not gained, latency within the tolerance: back to ``L'`` (sitting a little into a
  queue would let the baseline drift into it, and the queue grow unseen);
* a window that gained nothing runs on to twice its size before the limit comes down,
  so one slow stretch does not bring it down; and when the first window after a step
  down has lost over ``LOST`` (40 %) of the throughput of the one that made it, what
  made it was no queue (the machine got busier): the step is undone, to what the lost
  throughput needs at the latency seen now, at most where it came from.

**A 429** while no rate limit is known (none configured, none in the server's headers)
halves the limit, once per generation (the refusals of requests granted before a change
are the overload already answered), and it grows back as after a step down. A request
refused while more are in flight than the new limit gives its slot up and queues for one
again before it retries, first come first served: a server that refuses without saying
its rate (llama.cpp's behind a proxy, a gateway) otherwise sees the whole flight come
back together after each ``retry-after``, of which one or two get through, and a request
can lose that draw until it runs out of retries.

Against a server with 2 slots the limit goes 1, 2, 4 (latency 2x, no more throughput than
at 2), back to 2, and probes 3 every few windows (latency 1.5x, nothing gained: back to 2).
A server that does not queue gains at every doubling, so the limit reaches the maximum
(``--llm-concurrency``) in about 2 round trips a doubling, however the client's CPU load
stretches latency, as long as more in flight still buys throughput. That ramp is what the
adaptive limit costs: about 2.7 s at 0.2 s latency, 0.86-0.89 of a fixed 64's fetch rate
over 3,000 requests on this 2-core machine (``benchmarks/concurrency.py``), nothing on a
run paced by a rate limit: with one known (``--llm-rpm``, or the first answer's
``x-ratelimit-limit-requests``) the first answer alone decides, and the limit starts at
twice what the rate needs by Little's law (``rate x latency``).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

TOLERANCE = 1.3  # a mean latency beyond this multiple of the baseline: latency rose
MARGIN = 0.2  # the throughput gain a doubling (or more) must show to count as a gain
PACED = 0.1  # median wait in the budget beyond this share of the latency: it paces
MIN_WINDOW = 3  # answers per window at least
DRIFT = 1.05  # the baseline may rise by this factor per window
LOST = 0.4  # a step down that lost this share of the throughput is undone
HOLD = 3  # windows after a step down without growing
HEADROOM = 2.0  # with a known rate limit: start at this multiple of what it needs


@dataclass(frozen=True)
class Sample:
    """One answer: its latency, the mean number of requests in flight at the server
    while it was out (itself included), and the seconds it held its slot before it
    could be sent."""

    latency: float
    in_flight: float
    wait: float = 0.0

    @property
    def throughput(self) -> float:
        """Answers per second, by Little's law."""
        return self.in_flight / self.latency if self.latency > 0 else math.inf


@dataclass(frozen=True)
class Window:
    """What the answers of one window add up to."""

    limit: int
    latency: float  # the mean
    throughput: float  # by Little's law: mean in flight / mean latency
    wait: float  # the median
    answers: int

    @classmethod
    def of(cls, limit: int, samples: list[Sample]) -> Window:
        latency = statistics.fmean(s.latency for s in samples)
        in_flight = statistics.fmean(s.in_flight for s in samples)
        throughput = in_flight / latency if latency > 0 else math.inf
        wait = statistics.median(s.wait for s in samples)
        return cls(limit, latency, throughput, wait, len(samples))

    @property
    def paced(self) -> bool:
        """Its requests waited in the budget: a rate limit, not the limit, paced them."""
        return self.wait > PACED * self.latency

    def gained(self, reference: Window) -> bool:
        """Whether it gave more throughput than ``reference``, at a lower limit, did."""
        step = self.limit / reference.limit - 1
        return self.throughput >= reference.throughput * (1 + MARGIN * min(1.0, step))


class AdaptiveLimit:
    """The rule of the module docstring, with neither asyncio nor a clock: samples in
    (:meth:`add`), a limit out (:attr:`limit`)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = 1
        self.baseline = math.inf
        self.slow_start = True
        self.queue_at = 0  # the limit of the last step down: growth is careful up to it
        self.hold = 0  # windows left without growing
        self.rate: float | None = None  # requests per second a known rate limit allows
        self.windows: list[tuple[int, int]] = []  # (limit, answers) of every window
        self.previous: Window | None = None  # the last window that was not paced
        self.stepped_down: Window | None = None  # the window that made the last step down
        self.samples: list[Sample] = []  # the current window's
        self._extended = False  # the window runs on to twice its size before a step down

    def __repr__(self) -> str:
        return (
            f"AdaptiveLimit(limit={self.limit}, maximum={self.maximum}, "
            f"baseline={self.baseline:.3f}, slow_start={self.slow_start}, hold={self.hold})"
        )

    @property
    def window_size(self) -> int:
        if self.limit == 1 and self.rate is not None:
            return 1  # the start is the rate limit's (see start())
        if self.slow_start:
            return max(MIN_WINDOW, math.ceil(self.limit / 4))
        return max(MIN_WINDOW, self.limit)  # a whole round: precision over speed

    @property
    def settled(self) -> int:
        """The limit the run settled on: the median limit of the later half of the
        answers counted, past the first probing ones (the current limit before any)."""
        if not self.windows:
            return self.limit
        total = sum(n for _, n in self.windows)
        later: list[tuple[int, int]] = []
        left = total - total // 2  # the later half, the middle answer included
        for limit, n in reversed(self.windows):
            later.append((limit, min(n, left)))
            left -= n
            if left <= 0:
                break
        return _weighted_median(later)

    def add(self, sample: Sample) -> bool:
        """One answer of a request that filled the current limit; True when it closed a
        window (the limit may have changed)."""
        self.samples.append(sample)
        if len(self.samples) < self.window_size * (2 if self._extended else 1):
            return False
        window = Window.of(self.limit, self.samples)
        limit = self.decide(window)
        if limit is None:
            self._extended = True
            return False
        self.samples, self._extended = [], False
        self.windows.append((window.limit, window.answers))
        self.limit = max(1, min(self.maximum, limit))
        return True

    def decide(self, w: Window) -> int | None:
        """The limit after window ``w``; None: run the window on to twice its size first
        (a step down, or the undoing of one, is decided on twice the answers)."""
        base = w.latency if w.limit == 1 else min(self.baseline, w.latency)
        if w.paced:
            limit: int | None = w.limit  # the budget paced it: no evidence either way
        else:
            limit = self.judge(w, base)
            if limit is None:
                return None
            self.previous = w
        self.baseline = min(w.latency, base * DRIFT)
        return limit

    def judge(self, w: Window, base: float) -> int | None:
        # only the window just before is compared with: the load of the machine and of the
        # server drifts, and a window from a while ago may have seen another one
        previous = self.previous
        reference = previous if previous is not None and previous.limit < w.limit else None
        stepped_down = self.stepped_down
        lost = stepped_down is not None and w.throughput < stepped_down.throughput * (1 - LOST)
        gained = reference is None or w.gained(reference)
        if (lost or not gained) and not self._extended:
            return None
        self.stepped_down = None
        if stepped_down is not None and lost:
            return self.revert(w, stepped_down)
        if reference is not None and not gained:
            if w.latency > TOLERANCE * base:
                return self.back_off(w, reference, base)
            return self.step_down(w, reference.limit)
        return self.grow(w, base)

    def grow(self, w: Window, base: float) -> int:
        if self.hold:
            self.hold -= 1
            return w.limit
        if not self.slow_start and w.limit > self.queue_at and w.latency <= TOLERANCE * base:
            self.slow_start = True  # past where the queue showed, and none shows now
        if self.slow_start:
            return self.start(w) if w.limit == 1 else w.limit * 2
        return w.limit + max(1, w.limit // 4)

    def start(self, w: Window) -> int:
        """The limit after the first window (one in flight). With a rate limit known, the
        budget paces the run and the limit only needs to keep up with it: by Little's
        law ``rate x latency`` in flight, taken twice over so the budget, not the limit,
        binds (a limit too high for a server that queues comes down as usual)."""
        if self.rate is None:
            return 2
        return max(2, math.ceil(HEADROOM * self.rate * w.latency))

    def back_off(self, w: Window, reference: Window, base: float) -> int:
        """Latency rose without throughput: a queue. Back to what that throughput needs
        at no-load latency (Little's law)."""
        best = max(w.throughput, reference.throughput)
        return self.step_down(w, round(best * base))

    def step_down(self, w: Window, limit: int) -> int:
        """Down to ``limit`` (below ``w``'s): the step up to ``w`` bought nothing. With
        latency within the tolerance too, it goes back to the reference's limit: sitting
        a little into a queue would let the baseline drift into it, and the queue grow
        unseen."""
        self.slow_start, self.hold, self.queue_at = False, HOLD, w.limit
        self.stepped_down = w
        return max(1, min(w.limit - 1, limit))

    def refused(self) -> None:
        """A 429 while no rate limit is known: the server refuses, rather than queues,
        what it cannot serve, and nothing says at what rate. Halve the limit (the
        multiplicative decrease of TCP's congestion control), held, then grown by
        quarters as after any step down; the window under way is dropped."""
        self.queue_at = self.limit
        self.limit = max(1, self.limit // 2)
        self.slow_start, self.hold, self.stepped_down = False, HOLD, None
        self.samples, self._extended = [], False

    def revert(self, w: Window, stepped_down: Window) -> int:
        """The step down cost throughput: what made it was no queue (the load on the
        machine changed, say). Back up to what the throughput lost needs at the latency
        seen now (Little's law), at most where it came from, held there a while."""
        self.slow_start, self.hold, self.queue_at = False, HOLD, 0
        needed = round(stepped_down.throughput * w.latency)
        return max(w.limit + 1, min(stepped_down.limit, needed))


def _weighted_median(pairs: list[tuple[int, int]]) -> int:
    ordered = sorted(pairs)
    half = sum(n for _, n in ordered) / 2
    seen = 0
    for value, n in ordered:
        seen += n
        if seen >= half:
            return value
    return ordered[-1][0]


@dataclass
class Slot:
    """One request's place under the limit, from :meth:`Concurrency.acquire` to
    :meth:`Concurrency.release`."""

    generation: int
    acquired: float
    counts: bool  # sent once the limit had been filled: its answer is a sample
    sent_at: float | None = None
    area: float = 0.0  # the gate's in-flight-seconds when it was sent


class Concurrency:
    """The gate every request of a run passes: :meth:`acquire` before it is sent,
    :meth:`sent` once the budget lets it go, :meth:`release` with its answer's latency
    (None: no answer, or one that took retries) when it is done.

    It keeps the integral of the requests at the server over time (in-flight-seconds), so
    each answer's sample carries the mean number in flight while it was out: the count
    at its sending alone would say 1 for the first of two requests sent and answered
    together, and halve the throughput it saw."""

    def __init__(
        self,
        maximum: int,
        *,
        adaptive: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.maximum = maximum
        self.adaptive = adaptive
        self.rule = AdaptiveLimit(maximum)
        self.in_flight = 0  # slots held
        self.at_server = 0  # of those, sent
        self._clock = clock
        self._area = 0.0  # in-flight-seconds at the server, up to _area_at
        self._area_at = clock()
        self._generation = 0
        self._filled = False  # the current limit has been filled since it was set
        self._started = False  # a request has been sent
        self._waiters: deque[asyncio.Future[tuple[int, bool]]] = deque()

    def __repr__(self) -> str:
        kind = "adaptive" if self.adaptive else "fixed"
        return f"Concurrency({kind}, limit={self.limit}, in_flight={self.in_flight})"

    @property
    def limit(self) -> int:
        return self.rule.limit if self.adaptive else self.maximum

    @property
    def settled(self) -> int:
        """The limit the run settled on (the maximum when fixed)."""
        return self.rule.settled if self.adaptive else self.maximum

    async def acquire(self) -> Slot:
        """Wait for a free slot, first come first served: while anyone waits, a newcomer
        queues behind them even if a slot is free at this instant (that slot is already
        handed to the first waiter, who has not run yet). Without this, a request that
        once had to wait could be overtaken again and again by workers coming back for
        their next request, and its test would wait until the end of the fetch."""
        if self.in_flight < self.limit and not self._waiters:
            generation, counts = self._grant()
        else:
            waiter: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                generation, counts = await waiter  # _wake granted it (see _grant)
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self.in_flight -= 1  # handed a slot, then cancelled: the next one's
                    self._wake()
                raise
        return Slot(generation, self._clock(), counts)

    def _grant(self) -> tuple[int, bool]:
        """Take a slot: the generation it is granted in, and whether the limit had been
        filled by then. Decided at the grant, in grant order: slots handed to several
        waiters at once (a limit that rose) resume later, when the count is already
        full, and the first of them must not count (the queue ahead of it is the old,
        shorter one; its short latency against the new count would overstate the
        throughput, Little's law holding only once the queue has built up)."""
        self.in_flight += 1
        self._filled = self._filled or self.in_flight >= self.limit
        return self._generation, self._filled

    @property
    def wants_rate(self) -> bool:
        """Whether a rate limit would still change anything: it sets where the limit goes
        after the first window (unknown yet, and that window still open)."""
        return self.adaptive and self.rule.rate is None and not self.rule.windows

    def rate_limit(self, rpm: float) -> None:
        """A rate limit in force, in requests per minute (configured, or a server's
        ``x-ratelimit-limit-requests``): the lowest one given counts."""
        rate = rpm / 60.0
        self.rule.rate = rate if self.rule.rate is None else min(self.rule.rate, rate)
        if self.adaptive and not self._started and self.rule.limit == 1:
            # known before the first request (--llm-rpm): start at a second's worth, what
            # the budget lets go at once anyway, instead of a round trip with one in
            # flight; the first windows then grow or hold it as usual
            self.rule.limit = min(self.maximum, max(2, math.ceil(rate)))
        self._wake()  # the limit may have risen

    def refused(self, slot: Slot) -> None:
        """The request of ``slot`` got a 429 that is retried. With no rate limit known
        (none configured, no ``x-ratelimit-*`` header) the limit halves, once per
        generation: the refusals of requests granted before the last change are the same
        overload, already answered."""
        if not self.adaptive or self.rule.rate is not None or slot.generation != self._generation:
            return
        self.rule.refused()
        self._generation += 1
        self._filled = self.in_flight >= self.limit

    def sent(self, slot: Slot) -> None:
        """The budget let the request go (its first attempt)."""
        if slot.sent_at is None:
            now = self._advance()
            if not self._started:
                # the run's first request pays for starting up (the budget's file and
                # thread, the event loop's first connection), not for a rate limit
                self._started, slot.acquired = True, now
            self.at_server += 1
            slot.sent_at, slot.area = now, self._area

    def release(self, slot: Slot, latency: float | None) -> None:
        """The request is done; ``latency`` is its answer's (None: no sample)."""
        self.in_flight -= 1
        sent_at = slot.sent_at
        if sent_at is not None:
            now = self._advance()
            self.at_server -= 1
            counts = slot.counts and slot.generation == self._generation and now > sent_at
            if self.adaptive and latency is not None and counts:
                mean = (self._area - slot.area) / (now - sent_at)
                if self.rule.add(Sample(latency, mean, sent_at - slot.acquired)):
                    self._generation += 1
                    self._filled = self.in_flight >= self.limit
        self._wake()

    def _advance(self) -> float:
        now = self._clock()
        self._area += self.at_server * (now - self._area_at)
        self._area_at = now
        return now

    def _wake(self) -> None:
        """Hand the free slots to the waiters, first come first served."""
        while self.in_flight < self.limit and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._grant())
