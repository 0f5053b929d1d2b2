"""The run directory's check when a run starts: what a crash, a full disk, a bad copy or an
older version left there is found before any other process of the run opens it.

The controller runs :func:`check_run_dir` once, at configure time, before the xdist
workers, the plan subprocess and the fetch exist, and prints what it did once. A store of
schema 1 is migrated in place. A store file that is not usable (truncated, not SQLite,
another program's database) is **set aside**, renamed with its ``-wal`` and ``-shm`` to
``responses.sqlite3.unusable-<time>``, never deleted: the run starts a new store and asks
its answers again (``sqlite3 <file> .recover`` may get some of them back). A store of a
newer pytest-llmbench is not broken, so it is left alone and the run stops. A torn budget
record is read as a full bucket (``budget/file.py``) and said once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import StoreError, UnusableStoreError
from .store import SCHEMA_VERSION, STORE_FILENAME, ResponseStore

SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def check_run_dir(run_dir: Path) -> list[str]:
    """The store (migrated, or set aside when unusable) and the budget records (a torn one
    noticed); one line for each thing found. Raises :class:`StoreError` when the run
    cannot go on (a newer store, a file that cannot be set aside)."""
    found = check_store(run_dir)
    lines = [found] if found else []
    records = sorted(run_dir.glob("budget-*.json")) if run_dir.is_dir() else []
    if records:  # the budget's module (and its file lock) only when there is one to check
        from .budget.file import torn_record
    for path in records:
        why = torn_record(path)
        if why is not None:
            lines.append(
                f"llmbench: {path} held a torn rate budget record ({why}): the budget "
                "starts again from a full bucket (nothing to do)"
            )
    return lines


def check_store(run_dir: str | os.PathLike[str]) -> str | None:
    """Open the run directory's store before any other process of the run does: an older
    schema is migrated in place, and a file that is not a usable store is set aside.
    Returns the one line that says what was done, or None when there was nothing to do."""
    path = Path(run_dir) / STORE_FILENAME
    try:
        with path.open("rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError:
        return None  # no store yet (or unreadable: opening it says why)
    if header and header != SQLITE_HEADER[: len(header)]:
        # not SQLite at all: set aside before SQLite could write its -wal pages into it
        return _set_aside_line(path, "not an SQLite file")
    try:
        with ResponseStore(path) as store:
            migrated = store.migrated_from
            kept = sum(store.origins().values()) if migrated else 0
    except UnusableStoreError as exc:
        return _set_aside_line(path, exc.reason)
    if not header:
        return f"llmbench: {path} was empty (0 bytes, no answers): a new store was made in it"
    if migrated:
        return (
            f"llmbench: {path} migrated from store schema {migrated} to {SCHEMA_VERSION}: "
            f"its {kept} answer(s) are kept"
        )
    return None


def set_aside(path: Path) -> Path:
    """Rename the store file ``path`` (with its ``-wal`` and ``-shm``, first, so a new store
    never pairs with them) to ``<name>.unusable-<time>``; returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.unusable-{stamp}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.unusable-{stamp}-{n}"), n + 1
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            os.replace(companion, aside.with_name(aside.name + suffix))
    os.replace(path, aside)
    return aside


def _set_aside_line(path: Path, reason: str) -> str:
    try:
        aside = set_aside(path)
    except OSError as exc:
        raise StoreError(
            f"{path}: not a usable response store ({reason}), and setting it aside failed "
            f"({exc.strerror}): move it aside or delete it"
        ) from None
    return (
        f"llmbench: {path} is not a usable response store ({reason}): set aside as "
        f"{aside.name} (delete it once you no longer need it); a new store is started, "
        "and its answers are asked again"
    )


__all__ = ["SQLITE_HEADER", "check_run_dir", "check_store", "set_aside"]
