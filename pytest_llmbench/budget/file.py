"""The default budget: a JSON state file guarded by a kernel file lock.

Every operation is one locked read-modify-write of ``budget-<model>.json`` (well under a
millisecond); callers sleep outside the lock. Why it survives crashes:

* the lock is ``flock(2)`` on a separate ``.lock`` file, which the kernel releases when
  the holder dies, so a SIGKILLed process never leaves the pool locked (the soft-lock
  fallback of filelock is turned off because its marker files outlive their holder);
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

No fsync: the state is a rate budget; losing it in a power cut costs one burst.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from ..errors import BudgetError
from . import base
from .base import BaseBudget, BudgetState, Clock, Limits, RateLimitSnapshot, Sleep

FORMAT_VERSION = 1
RECORD_SIZE = 512  # the JSON is padded to this; longer records are written whole
_O_BINARY = getattr(os, "O_BINARY", 0)

# filelock retries a busy lock by sleeping poll_interval (default 0.05 s, no FIFO). With 8
# processes hammering (benchmarks/budget_lock.py, 2 vCPU) 0.05 s gave p99 50-100 ms and a
# max near 1 s per reservation; 0.002 s gave p99 ~35 ms and a max ~150 ms.
DEFAULT_POLL_INTERVAL = 0.002

T = TypeVar("T")


def safe_name(key: str) -> str:
    """A file-name-safe form of ``key``; altered or long names get a crc32 suffix."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.") or "default"
    if cleaned != key or len(cleaned) > 80:
        cleaned = f"{cleaned[:64]}-{zlib.crc32(key.encode()):08x}"
    return cleaned


def _file_lock(path: Path, timeout: float) -> FileLock:
    try:
        # filelock 4 would silently degrade to a soft lock where flock is missing, and a
        # soft lock's marker file outlives a killed holder: fail loudly instead
        return FileLock(path, timeout=timeout, thread_local=False, fallback_to_soft=False)
    except TypeError:  # filelock 3 has no soft fallback (it raises), nor the flag
        return FileLock(path, timeout=timeout, thread_local=False)


class FileBudget(BaseBudget):
    """A requests + tokens bucket shared by every process that opens the same ``path``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        burst_seconds: float = 1.0,
        clock: Clock = time.time,
        sleep: Sleep = time.sleep,
        lock_timeout: float = 30.0,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        super().__init__(sleep=sleep)
        self.limits = Limits(rpm, tpm, burst_seconds)
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
        self._flock = _file_lock(self.lock_path, lock_timeout)
        # threads of one process queue here (blocking, FIFO-ish) instead of polling flock
        self._thread_lock = threading.Lock()

    # -- the Budget protocol

    def reserve(self, tokens: int) -> float:
        return self._update(lambda s, now: base.reserve(s, self.limits, tokens, now))

    def correct(self, reserved_tokens: int, actual_tokens: int) -> None:
        self._update(
            lambda s, now: base.correct(s, self.limits, reserved_tokens, actual_tokens, now)
        )

    def observe(self, snapshot: RateLimitSnapshot) -> None:
        self._update(lambda s, now: base.observe(s, self.limits, snapshot, now))

    def pause(self, seconds: float) -> None:
        self._update(lambda s, now: base.pause(s, self.limits, seconds, now))

    def state(self) -> BudgetState:
        """The shared state as stored (for diagnostics and tests); changes nothing."""
        with self._locked():
            return self._read()

    def __repr__(self) -> str:
        lim = self.limits
        return (
            f"FileBudget({str(self.path)!r}, rpm={lim.rpm}, tpm={lim.tpm}, "
            f"burst_seconds={lim.burst_seconds})"
        )

    # -- the locked read-modify-write

    def _update(self, change: Callable[[BudgetState, float], T]) -> T:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
            except OSError as exc:
                raise BudgetError(f"cannot open the budget state {self.path}: {exc}") from None
            with os.fdopen(fd, "r+b", buffering=0) as f:
                state = _parse(self._io(f.read, "read"))
                # read the clock inside the lock so the stored ts only moves forward
                result = change(state, self._clock())
                record = _serialize(state)
                self._io(lambda: f.seek(0), "write")
                self._io(lambda: f.write(record), "write")
                if self._io(lambda: os.fstat(fd).st_size, "write") > len(record):
                    self._io(lambda: f.truncate(len(record)), "write")
            return result

    def _io(self, op: Callable[[], T], what: str) -> T:
        try:
            return op()
        except OSError as exc:
            raise BudgetError(f"cannot {what} the budget state {self.path}: {exc}") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            try:
                self._flock.acquire(poll_interval=self._poll_interval)
            except Timeout:
                raise BudgetError(
                    f"could not lock the budget {self.lock_path} within {self._lock_timeout:g} s"
                    " (is a process holding it stopped?)"
                ) from None
            except (OSError, NotImplementedError) as exc:  # e.g. no flock on this filesystem
                raise BudgetError(f"cannot lock the budget {self.lock_path}: {exc}") from None
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
