"""The default budget: a JSON state file guarded by a kernel file lock.

Every operation is one locked read-modify-write of ``budget-<model>.json`` (about 30 us,
most of it JSON: an ``flock`` on a descriptor the process keeps open, one ``pread``, one
``pwrite``; 37 us since the record holds the opening burst's six counters too, 31 us
before, best of 7 x 5000 reserves in one process); callers sleep outside the lock. Why it
survives crashes:

* the lock is ``flock(2)`` on a separate ``.lock`` file, which the kernel releases when
  the holder dies, so a SIGKILLed process never leaves the pool locked. Each process opens
  the lock file once (again after a fork: a child never shares its parent's lock) and
  polls a busy lock every ``poll_interval``. A lock file removed while open is noticed
  (no links left once locked) and opened anew, so every process locks the same file.
  Where ``flock`` is missing (Windows) filelock takes its place, with its soft-lock
  fallback turned off because its marker files outlive their holder. filelock's own
  ``flock`` path was measured and replaced: it opens, checks and closes the lock file on
  every acquisition (with fork and thread bookkeeping), 135 us per operation against 30 us
  here (``benchmarks/cpu_ceiling.py``: a request takes two operations);
* the state is rewritten in place, under the lock, as one ``write`` of a fixed-size
  record (JSON padded with spaces to 512 bytes, so no truncate is ever needed). A
  write that small lands in one page and a signal cannot split it, so a killed
  process leaves the old or the new record. Temp file + ``os.replace`` was measured
  and rejected: on ext4 a rename over an existing file flushes the data
  (``auto_da_alloc``) and cost 250-650 us per operation against 7 us in place, which
  lengthens the time the lock is held 50-fold. A record that is garbage anyway (power
  loss, edited by hand) is read as fresh state: a full bucket, never a failure;
* reservations are debt, so a process that dies after reserving has only used
  capacity, which refills at the normal rate.

An async reservation (``aacquire``) runs inline when the lock is free at once and goes
to a thread only when it is busy, so a reservation never holds up the event loop while
another process has the lock (the thread hop cost more than the reservation itself); the
feedback after an answer (``settle``: the headers, then the token correction) is one
operation instead of two.

No fsync: the state is a rate budget; losing it in a power cut costs one burst.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from ..errors import BudgetError
from . import base
from .base import (
    BaseBudget,
    BudgetState,
    Clock,
    Limits,
    RateLimitSnapshot,
    Sleep,
    Ticket,
    describe_limits,
)

FORMAT_VERSION = 1
RECORD_SIZE = 512  # the JSON is padded to this; longer records are written whole
_O_BINARY = getattr(os, "O_BINARY", 0)

# a busy lock is retried every poll_interval (filelock's default is 0.05 s, no FIFO). With
# 8 processes hammering (benchmarks/budget_lock.py, 2 vCPU) 0.05 s gave p99 50-100 ms and
# a max near 1 s per reservation; 0.002 s gave p99 ~35 ms and a max ~150 ms.
DEFAULT_POLL_INTERVAL = 0.002

T = TypeVar("T")


def safe_name(key: str) -> str:
    """A file-name-safe form of ``key``; altered or long names get a crc32 suffix."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.") or "default"
    if cleaned != key or len(cleaned) > 80:
        cleaned = f"{cleaned[:64]}-{zlib.crc32(key.encode()):08x}"
    return cleaned


class _LockTimeout(Exception):
    """The lock stayed busy for the whole timeout."""


class _FileLockLock:
    """filelock's lock, where there is no ``flock`` (Windows); never tried without
    blocking, so every async reservation there goes to a thread."""

    def __init__(self, path: Path, timeout: float, poll_interval: float) -> None:
        self._poll_interval = poll_interval
        try:
            # filelock 4 would silently degrade to a soft lock where flock is missing, and a
            # soft lock's marker file outlives a killed holder: fail loudly instead
            self._lock = FileLock(path, timeout=timeout, thread_local=False, fallback_to_soft=False)
        except TypeError:  # filelock 3 has no soft fallback (it raises), nor the flag
            self._lock = FileLock(path, timeout=timeout, thread_local=False)

    def acquire(self, blocking: bool) -> bool:
        if not blocking:
            return False
        try:
            self._lock.acquire(poll_interval=self._poll_interval)
        except Timeout:
            raise _LockTimeout from None
        return True

    def release(self) -> None:
        self._lock.release()

    def close(self) -> None:
        pass


class _FlockLock:
    """``flock(2)`` on the lock file, opened once per process and kept open."""

    def __init__(self, path: Path, timeout: float, poll_interval: float) -> None:
        self.path, self._timeout, self._poll_interval = path, timeout, poll_interval
        self._fd = -1
        self._pid = 0

    def _open(self) -> int:
        if self._fd >= 0 and self._pid == os.getpid():
            return self._fd
        self.close()  # a forked child's copy: the parent's lock must stay the parent's
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the run directory was removed: made again (as filelock)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._pid = os.getpid()
        return self._fd

    def acquire(self, blocking: bool) -> bool:
        import fcntl

        deadline = time.monotonic() + self._timeout if self._timeout >= 0 else None
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    return False
                if deadline is not None and time.monotonic() >= deadline:
                    raise _LockTimeout from None
                time.sleep(self._poll_interval)
                continue
            try:
                linked = os.fstat(fd).st_nlink > 0
            except OSError:
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise
            if linked:
                return True
            self.close()  # the file was removed meanwhile: lock the one at the path now

    def release(self) -> None:
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close this process's descriptor (a parent's lock survives a child's close)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        with suppress(Exception):  # late in interpreter shutdown, os may be gone
            self.close()


class FileBudget(BaseBudget):
    """A requests + tokens bucket shared by every process that opens the same ``path``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        burst_seconds: float = 1.0,
        opening_burst: bool = False,
        clock: Clock = time.time,
        sleep: Sleep = time.sleep,
        lock_timeout: float = 30.0,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        super().__init__(sleep=sleep)
        self.limits = Limits(rpm, tpm, burst_seconds, opening_burst)
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._clock = clock
        self._lock_timeout = lock_timeout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BudgetError(
                f"cannot create the budget directory {self.path.parent}: {exc}"
            ) from None
        self._poll_interval = poll_interval
        kind = _FileLockLock if sys.platform == "win32" else _FlockLock
        self._flock: _FlockLock | _FileLockLock = kind(self.lock_path, lock_timeout, poll_interval)
        # threads of one process queue here (blocking, FIFO-ish) instead of polling flock
        self._thread_lock = threading.Lock()
        # settle_later's changes, applied by the next locked operation (deque: appends
        # and pops are atomic across threads)
        self._pending: deque[Callable[[BudgetState, float], None]] = deque()
        # aacquire_ticket's reservations of this turn of each event loop, made together
        self._asked: dict[asyncio.AbstractEventLoop, list[tuple[Reservation, Waiter]]] = {}

    # -- the Budget protocol

    def reserve(self, tokens: int) -> float:
        return self.reserve_ticket(tokens)[0]

    def reserve_ticket(self, tokens: int) -> tuple[float, Ticket]:
        return self._update(self._reservation(tokens))

    def _reservation(self, tokens: int) -> Callable[[BudgetState, float], tuple[float, Ticket]]:
        def change(s: BudgetState, now: float) -> tuple[float, Ticket]:
            return base.reserve(s, self.limits, tokens, now), base.ticket_of(s, tokens)

        return change

    async def aacquire_ticket(self, tokens: int) -> tuple[float, Ticket | None]:
        """Reserve without blocking the event loop. The reservations asked for in one turn
        of the event loop are made together, in order, at the start of the next: one
        locked read-modify-write for all of them (inline when the lock is free at once,
        in a thread when another holder has it). Each gets the wait and ticket it would
        have got alone a few microseconds later; a fetch whose answers come back in
        groups (a fast server: 10-20 an event-loop turn) pays one operation a group
        instead of one a request."""
        loop = asyncio.get_running_loop()
        waiter: Waiter = loop.create_future()
        asked = self._asked.setdefault(loop, [])
        asked.append((self._reservation(tokens), waiter))
        if len(asked) == 1:
            loop.call_soon(self._reserve_asked, loop)
        reserved = await waiter
        if reserved[0] > 0:
            await asyncio.sleep(reserved[0])
        return reserved

    def _reserve_asked(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make the reservations asked for on ``loop`` since the last call, in one
        operation."""
        asked = self._asked.pop(loop, [])
        changes = [change for change, _ in asked]
        waiters = [waiter for _, waiter in asked]

        def reserve_all(s: BudgetState, now: float) -> list[tuple[float, Ticket] | BudgetError]:
            out: list[tuple[float, Ticket] | BudgetError] = []
            for change in changes:
                try:
                    out.append(change(s, now))
                except BudgetError as exc:  # this one can never fit; it changed nothing
                    out.append(exc)
            return out

        try:
            done = self._try_update(reserve_all)
        except BudgetError as exc:
            _hand_out(waiters, exc)
            return
        if done is not None:
            _hand_out(waiters, done)
            return
        # the lock is busy (another process): wait for it in a thread
        later = asyncio.ensure_future(asyncio.to_thread(self._update, reserve_all))
        later.add_done_callback(functools.partial(_hand_out_when_done, waiters))

    def correct(self, reserved_tokens: int, actual_tokens: int) -> None:
        self._update(
            lambda s, now: base.correct(s, self.limits, reserved_tokens, actual_tokens, now)
        )

    def observe(self, snapshot: RateLimitSnapshot) -> None:
        self._update(lambda s, now: base.observe(s, self.limits, snapshot, now))

    def settle(self, snapshot: RateLimitSnapshot, reserved_tokens: int, actual_tokens: int) -> None:
        """``observe`` then ``correct``, in one locked operation."""
        self._update(self._settlement(snapshot, reserved_tokens, actual_tokens))

    def settle_later(
        self, snapshot: RateLimitSnapshot, reserved_tokens: int, actual_tokens: int
    ) -> None:
        """``settle`` as part of this process's next locked operation (in a fetch, the
        next request's reservation), which applies it before its own change: one lock,
        read and write instead of two per request. The reservation sees every answer
        this process had before it, as with ``settle``; other processes see them one
        reservation later. ``flush`` (at the end of a fetch), ``state`` and ``close``
        write what is still pending."""
        self._pending.append(self._settlement(snapshot, reserved_tokens, actual_tokens))

    def flush(self) -> None:
        if self._pending:
            self._update(_nothing)

    def _settlement(
        self, snapshot: RateLimitSnapshot, reserved_tokens: int, actual_tokens: int
    ) -> Callable[[BudgetState, float], None]:
        def change(s: BudgetState, now: float) -> None:
            base.observe(s, self.limits, snapshot, now)
            base.correct(s, self.limits, reserved_tokens, actual_tokens, now)

        return change

    def pause(self, seconds: float) -> None:
        self._update(lambda s, now: base.pause(s, self.limits, seconds, now))

    def state(self) -> BudgetState:
        """The shared state as stored (for diagnostics and tests); changes nothing but
        writing what ``settle_later`` deferred."""
        self.flush()
        with self._locked():
            return self._read()

    def learned_limits(self) -> bool:
        return base.learned(self.state())

    def opening_granted(self) -> float:
        return self.state().opening_granted

    def close(self) -> None:
        """Close the lock file (it is opened again if the budget is used again)."""
        self.flush()
        with self._thread_lock:
            self._flock.close()

    def __repr__(self) -> str:
        return f"FileBudget({str(self.path)!r}, {describe_limits(self.limits)})"

    # -- the locked read-modify-write

    def _update(self, change: Callable[[BudgetState, float], T]) -> T:
        with self._locked():
            return self._rewrite(change)

    def _try_update(self, change: Callable[[BudgetState, float], T]) -> T | None:
        """``_update`` if the lock can be had without waiting, else None (nothing done)."""
        if not self._thread_lock.acquire(blocking=False):
            return None
        try:
            if not self._acquire(blocking=False):
                return None
            try:
                return self._rewrite(change)
            finally:
                self._flock.release()
        finally:
            self._thread_lock.release()

    def _rewrite(self, change: Callable[[BudgetState, float], T]) -> T:
        """Read, change and write the state back; the caller holds the lock."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
        except OSError as exc:
            raise BudgetError(f"cannot open the budget state {self.path}: {exc}") from None
        try:
            size = self._io(lambda: os.fstat(fd).st_size, "read")
            state = _parse(self._io(lambda: os.pread(fd, max(size, RECORD_SIZE), 0), "read"))
            # read the clock inside the lock so the stored ts only moves forward
            now = self._clock()
            pending = self._pending
            while pending:  # settlements deferred by settle_later, in their order
                pending.popleft()(state, now)
            result = change(state, now)
            record = _serialize(state)
            self._io(lambda: os.pwrite(fd, record, 0), "write")  # one write, in place
            if size > len(record):
                self._io(lambda: os.ftruncate(fd, len(record)), "write")
        finally:
            os.close(fd)
        return result

    def _io(self, op: Callable[[], T], what: str) -> T:
        try:
            return op()
        except OSError as exc:
            raise BudgetError(f"cannot {what} the budget state {self.path}: {exc}") from None

    def _acquire(self, *, blocking: bool) -> bool:
        try:
            return self._flock.acquire(blocking)
        except _LockTimeout:
            raise BudgetError(
                f"could not lock the budget {self.lock_path} within {self._lock_timeout:g} s"
                " (is a process holding it stopped?)"
            ) from None
        except (OSError, NotImplementedError) as exc:  # e.g. no flock on this filesystem
            raise BudgetError(f"cannot lock the budget {self.lock_path}: {exc}") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self._acquire(blocking=True)
            try:
                yield
            finally:
                self._flock.release()

    def _read(self) -> BudgetState:
        try:
            return _parse(self.path.read_bytes())
        except FileNotFoundError:
            return BudgetState()
        except OSError as exc:
            raise BudgetError(f"cannot read the budget state {self.path}: {exc}") from None


Reservation = Callable[[BudgetState, float], tuple[float, Ticket]]
Waiter = asyncio.Future[tuple[float, Ticket]]


def _hand_out(
    waiters: list[Waiter],
    outcome: list[tuple[float, Ticket] | BudgetError] | BaseException | None,
) -> None:
    """Give each waiter its reservation (or the error that stopped them all; None: the
    operation was cancelled). A waiter cancelled meanwhile is skipped: what it reserved
    stays reserved, as a request that was never sent (debt that refills)."""
    for i, waiter in enumerate(waiters):
        if waiter.done():
            continue
        got = outcome[i] if isinstance(outcome, list) else outcome
        if got is None:
            waiter.cancel()
        elif isinstance(got, BaseException):
            waiter.set_exception(got)
        else:
            waiter.set_result(got)


def _hand_out_when_done(
    waiters: list[Waiter], done: asyncio.Future[list[tuple[float, Ticket] | BudgetError]]
) -> None:
    """``_hand_out`` for reservations made in a thread."""
    if done.cancelled():
        _hand_out(waiters, None)
    elif (exc := done.exception()) is not None:
        _hand_out(waiters, exc)
    else:
        _hand_out(waiters, done.result())


def _nothing(state: BudgetState, now: float) -> None:
    """A locked operation that only writes what is pending."""


def _parse(raw: bytes | None) -> BudgetState:
    """The state in a record; empty, torn or foreign records are fresh state."""
    try:
        data = json.loads(raw or b"")
    except ValueError:
        return BudgetState()
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        return BudgetState()
    return BudgetState.from_fields(data)


def _serialize(state: BudgetState) -> bytes:
    data = json.dumps({"version": FORMAT_VERSION, **state.to_fields()}, separators=(",", ":"))
    return data.encode().ljust(RECORD_SIZE, b" ")


def torn_record(path: Path) -> str | None:
    """What is wrong with the budget record at ``path`` (torn by a power loss, edited by
    hand, another program's), or None when it is fine, empty or absent. Such a record is
    read as fresh state (:func:`_parse`) and overwritten by the next reservation: the
    controller reports it once when a run starts, so it never goes unnoticed."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if not raw.strip():
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return f"not JSON: {exc}"
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        return f"not a version {FORMAT_VERSION} budget record"
    return None
