"""How the processes of a run learn that an answer has arrived, or that the run stops.

While the controller fetches ahead, the tests already run (``engine.py``). A test whose
answer is not stored yet must wait for *its* answer, without asking SQLite again and
again. The controller keeps a **fetch journal**, an append-only file of short lines:

``P <key>``  planned: the fetch will send this request (it is not stored yet)
``S <key>``  settled: its answer is stored, or it failed (then the store says why)
``C``        planning is complete: a key not planned by now never will be
``E {json}`` the fetch ended: ``{"status": "done" | "fatal" | "stopped" | "interrupted",
           "reason": ...}`` (stopped: the cost cap, ``spend.py``)

A waiting test checks the file's size (one ``stat`` call) every millisecond at first,
backing off to every 10 ms, and reads only the bytes added since its last look. The same
holds in the controlling process itself (``-n 0``): it shares no lock with the fetch
thread, so an interrupt there can never leave the fetch waiting on the tests.

A **stop file** tells every process of the run that the run stops: the first process to
meet a fatal refusal (a wrong key, no quota...) writes the reason; every other process
sees it before its next request and sends nothing more.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

POLL_MIN_S = 0.001
POLL_MAX_S = 0.01
#: the reason of a stop file published without one (no room on the run directory's disk)
UNWRITTEN_REASON = (
    "another process stopped the run and had no room to say why (is the run directory's disk full?)"
)


def journal_path(run_dir: Path, run_token: str) -> Path:
    return run_dir / f"fetch-{run_token}.journal"


def stop_path(run_dir: Path, run_token: str) -> Path:
    return run_dir / f"stop-{run_token}.json"


class Verdict(Enum):
    SETTLED = "settled"  # look the answer (or its failure) up again
    UNPLANNED = "unplanned"  # the fetch will not send it: send it live


@dataclass(frozen=True)
class FetchEnd:
    status: str  # done | fatal | stopped (the cost cap) | interrupted
    reason: str = ""


class JournalWriter:
    """The controller's side: one writer, lines appended with one ``write`` each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        self._fd = os.open(path, flags, 0o600)
        self.ended = False

    def _write(self, text: str) -> None:
        if self._fd < 0:
            return
        data = text.encode("utf-8")
        try:
            written = os.write(self._fd, data)  # O_APPEND: one write, one piece
        except OSError:
            written = -1
        if written != len(data):
            # no room (a full disk): a journal missing lines would keep tests waiting for
            # them forever; without one, each test looks up or asks for its own answer
            # (and sees the stop file first when the run stops)
            self.close()

    def planned(self, keys: Iterable[str]) -> None:
        lines = "".join(f"P {k}\n" for k in keys)
        if lines:
            self._write(lines)

    def settled(self, key: str) -> None:
        self._write(f"S {key}\n")

    def settled_many(self, keys: list[str]) -> None:
        """Several answers stored at once: one write."""
        if keys:
            self._write("".join(f"S {k}\n" for k in keys))

    def planning_done(self) -> None:
        self._write("C\n")

    def end(self, status: str, reason: str = "") -> None:
        if not self.ended:
            self.ended = True
            self._write("E " + json.dumps({"status": status, "reason": reason}) + "\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


class JournalReader:
    """A process's view of the journal, read incrementally and shared by its tests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.planned: set[str] = set()
        self.settled: set[str] = set()
        self.plan_done = False
        self.end: FetchEnd | None = None
        self._offset = 0
        self._size = -1
        self._partial = b""
        self._lock = threading.Lock()

    def _read_new(self) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            # removed at the end of the run: nothing more will come
            self.end = self.end or FetchEnd("done")
            return
        if size == self._size:
            return
        self._size = size
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        for line in data[:cut].decode("utf-8").splitlines():
            self._apply(line)

    def _apply(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "P":
            self.planned.add(rest)
        elif kind == "S":
            self.settled.add(rest)
        elif kind == "C":
            self.plan_done = True
        elif kind == "E":
            data = json.loads(rest)
            self.end = FetchEnd(str(data.get("status", "done")), str(data.get("reason", "")))

    def _decide(self, key: str) -> Verdict | FetchEnd | None:
        if key in self.settled:
            return Verdict.SETTLED
        if self.end is not None:
            return self.end if self.end.status != "done" else Verdict.UNPLANNED
        if self.plan_done and key not in self.planned:
            return Verdict.UNPLANNED
        return None

    def wait(self, key: str) -> Verdict | FetchEnd:
        """Block until ``key`` is settled, known to be unplanned, or the fetch ended
        without it (then the :class:`FetchEnd` says why: fatal or interrupted)."""
        delay = POLL_MIN_S
        while True:
            with self._lock:
                self._read_new()
                verdict = self._decide(key)
            if verdict is not None:
                return verdict
            time.sleep(delay)  # between two stat() calls of the journal: a cheap wait
            delay = min(POLL_MAX_S, delay * 2)


class RunStop:
    """The run's stop file: written once, by the first process that meets a fatal error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reason: str | None = None

    def trip(self, reason: str) -> None:
        if self._reason is not None:
            return
        self._reason = reason
        try:
            first = self._publish(json.dumps({"reason": reason}).encode("utf-8"))
        except OSError:
            return  # no run directory: this process still stops
        if not first:
            self._reason = None  # another process was first: its reason stands
            self.reason()

    def _publish(self, data: bytes) -> bool:
        """Create the stop file whole (written aside, then linked into place, so a reader
        never sees it half written); False when another process was first. On a full
        disk it is published empty: its existence alone stops the run."""
        aside = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            try:
                aside.write_bytes(data)
            except OSError:
                aside.write_bytes(b"")  # no room for the reason: truncated, it takes none
            os.link(aside, self.path)
        except FileExistsError:
            return False
        except OSError:
            return self._create(data)  # no hard links here (some network filesystems)
        finally:
            aside.unlink(missing_ok=True)
        return True

    def _create(self, data: bytes) -> bool:
        """Create the stop file in place (a reader may see it empty for a moment)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
        except OSError:
            pass  # no room for the reason: the file alone stops the run
        finally:
            os.close(fd)
        return True

    def reason(self) -> str | None:
        """Why the run stops, or None (one ``stat`` while nothing has stopped it)."""
        if self._reason is None and os.path.exists(self.path):
            try:
                text = self.path.read_text(encoding="utf-8")
            except OSError:
                return None  # seen at the next look
            if not text:
                self._reason = UNWRITTEN_REASON
                return self._reason
            try:
                self._reason = str(json.loads(text)["reason"])
            except (ValueError, KeyError, TypeError):
                return None
        return self._reason

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
