"""The crash-safe response store: every API response, saved the moment it arrives.

Responses are keyed by :func:`request_key`, so an interrupted run resumes without paying
twice and ``--lf`` re-grades stored answers without calling the API.

Why SQLite (WAL) rather than append-only JSONL: many writers (xdist workers, a prefetch
process with threads) need atomic appends, lookups by key, "first write wins" across
processes and records that ``kill -9`` cannot tear. SQLite has all that in the standard
library; JSONL would need a lock, a tolerant reader and an index of our own. With
``synchronous=FULL`` each put is one fsync'd WAL commit, so a put that returned survives a
crash and even power loss, at 0.4 ms per put (2,500/s, measured on an ext4 VM disk).

Every answer is filed under its **origin**, the server that gave it (``simulator`` for the
built-in one, else the API's base URL): a handle opened for one origin never sees another's
answers, so the simulator's answers can never be replayed as the real API's. Schema 1
(before origins) is migrated in place: answers whose headers show the built-in simulator
(``openai-organization: org-sim``) become ``simulator``'s, answers with OpenAI's own headers
the public API's, and the rest ``unknown`` (kept, never replayed; ``--cache-clear``
deletes them).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import StoreError, UnusableStoreError
from .store_schema import (
    COLUMNS,
    GAVE_UP,
    SCHEMA,
    SCHEMA_VERSION,
    SIM_ORIGIN,
    TABLES,
    UNKNOWN_ORIGIN,
    AnswerLike,
    Failure,
    PlannedRequest,
    StoredResponse,
    migrate_v1,
)

__all__ = [
    "DEFAULT_ORIGIN",
    "GAVE_UP",
    "SCHEMA_VERSION",
    "SIM_ORIGIN",
    "SOURCES",
    "STORE_FILENAME",
    "AnswerLike",
    "Failure",
    "PlannedRequest",
    "ResponseStore",
    "StoredResponse",
    "ensure_run_dir",
    "request_key",
]

STORE_FILENAME = "responses.sqlite3"
SOURCES = frozenset({"live", "batch", "prefetch", "cassette"})
DEFAULT_ORIGIN = UNKNOWN_ORIGIN
BUSY_TIMEOUT_S = 30.0
_CHUNK = 500  # stays under SQLite's oldest limit of 999 bound parameters


def request_key(nodeid: str, ordinal: int, endpoint: str, body: Mapping[str, Any]) -> str:
    """The store key of one request, also used as the Batch API ``custom_id``.

    The sha256 hex (64 characters) of the canonical JSON of ``[nodeid, ordinal, endpoint,
    body]``: key order inside ``body`` does not matter, but any change to the prompt or a
    parameter gives a new key, so an edited prompt never replays an old answer. Note that
    JSON tells ``1`` from ``1.0``.
    """
    canonical = json.dumps(
        [nodeid, ordinal, endpoint, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


_COLUMNS = ", ".join(field.name for field in fields(StoredResponse))  # the table's, in order
assert _COLUMNS == COLUMNS, "StoredResponse and the responses table must list one order"


def ensure_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Create ``run_dir`` with a ``.gitignore`` of ``*``, atomically (as pytest's cache dir).

    The directory is assembled under a temporary name and renamed into place, so a
    concurrent process sees either nothing or the complete directory.
    """
    path = Path(run_dir)
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}-tmp-", dir=path.parent) as tmp:
        staging = Path(tmp)
        umask = os.umask(0o022)  # no atomic way to read the umask; restored at once
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # TemporaryDirectory makes it 0o700
        staging.joinpath(".gitignore").write_text(
            "# Created by pytest-llmbench automatically.\n*\n", encoding="utf-8"
        )
        staging.joinpath("CACHEDIR.TAG").write_text(
            "Signature: 8a477f597d28d172789f06886806bc55\n"
            "# This file is a cache directory tag created by pytest-llmbench.\n",
            encoding="utf-8",
        )
        try:
            staging.rename(path)
        except OSError as exc:
            # Losing the race to another process is fine: its directory is complete.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        else:
            staging.mkdir()  # for TemporaryDirectory's cleanup to remove
    return path


def _scrub_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    # Defence in depth: response headers hold no key, but a mix-up must never store one.
    return {name: str(value) for name, value in (headers or {}).items() if _kept(name)}


@functools.lru_cache(maxsize=1024)  # a server sends the same few header names each time
def _kept(name: str) -> bool:
    secret = ("authorization", "api-key", "api_key", "cookie")  # cookie: also set-cookie
    return not any(word in name.lower() for word in secret)


_MARKS = ", ".join("?" * len(_COLUMNS.split(",")))
_INSERT = {  # replace -> the statement: the first write wins unless it replaces
    False: f"INSERT INTO responses ({_COLUMNS}) VALUES ({_MARKS}) "
    "ON CONFLICT (key, origin) DO NOTHING",
    True: f"INSERT OR REPLACE INTO responses ({_COLUMNS}) VALUES ({_MARKS})",
}


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back
    when it raises (anything: a change that fails leaves the store as it was)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ResponseStore:
    """A response store in one SQLite file, shared by every process and thread of a run.

    Each thread gets its own connection (opened lazily; a forked child opens its own).
    A put is one committed transaction, so it is durable when it returns. Errors from
    SQLite surface as :class:`StoreError` naming the file; nothing is ever deleted
    automatically.
    """

    def __init__(self, path: str | os.PathLike[str], *, origin: str = DEFAULT_ORIGIN) -> None:
        self.path = Path(path)
        self.origin = origin
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        self._closed = False
        self.migrated_from: str | None = None  # the schema this handle migrated, if any
        self._conn()  # fail now, not at the first put, when the file is unusable

    @classmethod
    def open(
        cls, run_dir: str | os.PathLike[str], *, origin: str = DEFAULT_ORIGIN
    ) -> ResponseStore:
        """Open (creating if needed) ``<run_dir>/responses.sqlite3``, seeing the answers
        of ``origin`` only (``simulator`` or the API's base URL)."""
        return cls(ensure_run_dir(run_dir) / STORE_FILENAME, origin=origin)

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return f"<ResponseStore {str(self.path)!r} origin={self.origin!r}{closed}>"

    def _conn(self, full: bool = True) -> sqlite3.Connection:
        """This thread's connection; its writes commit with ``synchronous=FULL`` (fsynced:
        durable when they return), or with ``full=False`` with ``NORMAL`` (atomic, safe
        from a crash of the process; made durable by :meth:`sync`)."""
        if self._closed:
            raise StoreError(f"{self.path}: the response store is closed")
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._connect()  # synchronous=FULL
            local.conn, local.pid, local.full = conn, os.getpid(), True
            with self._lock:
                self._connections.append((os.getpid(), conn))
        if local.full is not full:  # changed only when a write needs the other mode
            conn.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
            local.full = full
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: autocommit, so each put is exactly one transaction.
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the response store: {exc}") from None
        try:
            self._prepare_retrying(conn)
        except sqlite3.OperationalError as exc:
            conn.close()
            raise StoreError(f"{self.path}: cannot open the response store: {exc}") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise UnusableStoreError(
                f"{self.path}: not a usable response store ({exc}); move it aside or delete "
                "it (a pytest-llmbench run sets it aside itself when it starts)",
                str(exc),
            ) from None
        except StoreError:
            conn.close()
            raise
        return conn

    def _prepare_retrying(self, conn: sqlite3.Connection) -> None:
        # Switching a new file to WAL can fail with "database is locked" at once, without
        # waiting for the busy timeout, when several processes open it together.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                return self._prepare(conn)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        # journal_mode is stored in the file, so only the first connection pays for it.
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        version = self._schema_version(conn)
        if version is None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = self._schema_version(conn)
                if version is None:
                    marks = ", ".join("?" * len(TABLES))
                    foreign = conn.execute(
                        f"SELECT count(*) FROM sqlite_master WHERE name NOT IN ({marks})",
                        TABLES,
                    ).fetchone()[0]
                    if foreign:
                        raise sqlite3.DatabaseError("a SQLite file of some other program")
                    for statement in SCHEMA.split(";"):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                    version = str(SCHEMA_VERSION)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if version == "1":
            version = migrate_v1(conn)
            self.migrated_from = "1"
        if version.isdigit() and int(version) > SCHEMA_VERSION:
            # a newer pytest-llmbench's store is not broken: never set it aside
            raise StoreError(
                f"{self.path}: written by a newer pytest-llmbench (store schema {version}, "
                f"this one reads {SCHEMA_VERSION}): upgrade pytest-llmbench, or give this "
                "run another --llm-run-dir"
            )
        if version != str(SCHEMA_VERSION):
            raise sqlite3.DatabaseError(
                f"schema version {version!r}, this pytest-llmbench reads {SCHEMA_VERSION}"
            )

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> str | None:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not has_meta:
            return None
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        return "<missing>" if row is None else str(row[0])

    def _query(self, sql: str, params: Iterable[object] = ()) -> list[Any]:
        try:
            return self._conn().execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def put(
        self,
        key: str,
        *,
        nodeid: str,
        ordinal: int,
        endpoint: str,
        request: Mapping[str, Any],
        response: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
        latency_s: float,
        source: str,
        batch_id: str | None = None,
        replace: bool = False,
        attempts: int = 1,
        rate_limited: int = 0,
    ) -> bool:
        """Save one response of this handle's origin; durable when this returns. Returns
        whether it was written.

        The first write for a key wins: a later put for the same key changes nothing and
        returns False, so a duplicate fetch (a retry, two processes racing) cannot swap an
        answer that a test may already have graded. ``replace=True`` overwrites instead.
        Credential headers are dropped before writing.
        """
        row = self._row(
            key, nodeid, ordinal, endpoint, request, response, headers, latency_s, source,
            batch_id, attempts, rate_limited,
        )  # fmt: skip
        try:
            return self._conn().execute(_INSERT[replace], row).rowcount == 1
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot store {key[:16]}: {exc}") from exc

    def _row(
        self,
        key: str,
        nodeid: str,
        ordinal: int,
        endpoint: str,
        request: Mapping[str, Any],
        response: Mapping[str, Any],
        headers: Mapping[str, str] | None,
        latency_s: float,
        source: str,
        batch_id: str | None,
        attempts: int,
        rate_limited: int,
        response_text: str | None = None,
        request_text: str | None = None,
    ) -> tuple[object, ...]:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {sorted(SOURCES)}, got {source!r}")
        try:
            # the texts as they went over the wire when known (they parse to ``request``
            # and ``response``): two JSON encodings fewer per answer in a fetch
            if response_text is None:
                response_text = _dumps(dict(response))
            if request_text is None:
                request_text = _dumps(dict(request))
            texts = request_text, response_text
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{self.path}: cannot store {key[:16]}: {exc}") from None
        row: tuple[object, ...] = (key, self.origin, nodeid, ordinal, endpoint, *texts)
        row += (_dumps(_scrub_headers(headers)), float(latency_s), source, batch_id, time.time())
        return (*row, int(attempts), int(rate_limited))

    def save_many(
        self,
        answers: list[tuple[PlannedRequest, AnswerLike]],
        *,
        source: str,
        replace: bool,
        durable: bool = True,
    ) -> None:
        """Save several answers in one transaction (one fsync): durable when this returns,
        all or none. The first write for a key wins, as in :meth:`put`. ``durable=False``
        commits without the fsync (``synchronous=NORMAL``: atomic, and safe from a crash or
        ``kill -9`` of the process; a power loss may take it until the next :meth:`sync`)."""
        rows = [
            self._row(
                r.key, r.nodeid, r.ordinal, r.endpoint, r.body, a.body, a.headers, a.latency,
                source, None, a.attempts, a.rate_limited, getattr(a, "text", None),
                getattr(a, "request_text", None),
            )
            for r, a in answers
        ]  # fmt: skip
        try:
            with _immediate(self._conn(full=durable)) as conn:  # this thread's mode only
                conn.executemany(_INSERT[replace], rows)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot store {len(rows)} answer(s): {exc}") from exc

    def sync(self) -> None:
        """Make every commit so far durable, those made with ``durable=False`` too: one
        fsync of the write-ahead log, which holds them (once the log is checkpointed into
        the database file and removed, SQLite has synced that file)."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot sync the store: {exc}") from None
        try:
            os.fsync(fd)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot sync the store: {exc}") from None
        finally:
            os.close(fd)

    def save(
        self,
        request: PlannedRequest,
        answer: AnswerLike,
        *,
        source: str,
        replace: bool,
        batch_id: str | None = None,
    ) -> bool:
        """Save ``answer`` to ``request`` (the client's, prefetch's and Batch API's way)."""
        return self.put(
            request.key,
            nodeid=request.nodeid,
            ordinal=request.ordinal,
            endpoint=request.endpoint,
            request=request.body,
            response=answer.body,
            headers=answer.headers,
            latency_s=answer.latency,
            source=source,
            batch_id=batch_id,
            replace=replace,
            attempts=answer.attempts,
            rate_limited=answer.rate_limited,
        )

    def get(self, key: str) -> StoredResponse | None:
        """The stored response for ``key`` (from this handle's origin), or None."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM responses WHERE key = ? AND origin = ?", (key, self.origin)
        )
        return _decode(rows[0]) if rows else None

    def lookup(self, key: str, *, fresh_since: float | None = None) -> StoredResponse | None:
        """The answer a run may replay for ``key``: this origin's, and stored at or after
        ``fresh_since`` when that is given (``--llm-fresh``, cassette modes)."""
        stored = self.get(key)
        if stored is not None and fresh_since is not None and stored.created_at < fresh_since:
            return None
        return stored

    def get_many(self, keys: Iterable[str]) -> dict[str, StoredResponse]:
        """The stored responses among ``keys``, by key (missing keys are left out)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, StoredResponse] = {}
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            for row in self._query(
                f"SELECT {_COLUMNS} FROM responses WHERE origin = ? AND key IN ({marks})",
                [self.origin, *chunk],
            ):
                stored = _decode(row)
                if stored is not None:
                    found[stored.key] = stored
        return found

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(
            self._query("SELECT 1 FROM responses WHERE key = ? AND origin = ?", (key, self.origin))
        )

    def __len__(self) -> int:
        """Answers of this handle's origin."""
        sql = "SELECT count(*) FROM responses WHERE origin = ?"
        return int(self._query(sql, (self.origin,))[0][0])

    def nodeids(self, since: float | None = None) -> set[str]:
        """Node ids with at least one answer of this origin (created at or after ``since``)."""
        rows = self._query(
            "SELECT DISTINCT nodeid FROM responses WHERE origin = ? AND created_at >= ?",
            (self.origin, -1.0 if since is None else since),
        )
        return {row[0] for row in rows}

    def keys(self) -> list[str]:
        """Every key stored for this origin, oldest first."""
        sql = "SELECT key FROM responses WHERE origin = ? ORDER BY rowid"
        return [row[0] for row in self._query(sql, (self.origin,))]

    def origins(self) -> dict[str, int]:
        """How many answers each origin has (every origin, not only this handle's)."""
        rows = self._query("SELECT origin, count(*) FROM responses GROUP BY origin")
        return {str(origin): int(n) for origin, n in rows}

    # ------------------------------------------------------------------ failures
    def record_failures(self, failures: Mapping[str, Failure]) -> None:
        """Save why requests failed for good in this run (replacing earlier verdicts)."""
        now = time.time()
        rows = [
            (key, self.origin, f.reason, f.source, f.run, f.attempts, f.rate_limited, now)
            for key, f in failures.items()
        ]
        try:
            with _immediate(self._conn()) as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
                )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def failure(self, key: str) -> Failure | None:
        """The recorded failure of ``key`` for this origin, or None."""
        rows = self._query(
            "SELECT reason, source, run, attempts, rate_limited FROM failures "
            "WHERE key = ? AND origin = ?",
            (key, self.origin),
        )
        if not rows:
            return None
        reason, source, run, attempts, rate_limited = rows[0]
        return Failure(str(reason), str(source), str(run), int(attempts), int(rate_limited))

    def clear_failures(self, source: str | None = None) -> None:
        """Forget recorded failures (of one source, or all): they are asked again."""
        if source is None:
            self._query("DELETE FROM failures")
        else:
            self._query("DELETE FROM failures WHERE source = ?", (source,))

    def clear(self) -> None:
        """Delete every stored response and every state entry (the file stays)."""
        try:
            with _immediate(self._conn()) as conn:
                conn.execute("DELETE FROM responses")
                conn.execute("DELETE FROM state")
                conn.execute("DELETE FROM failures")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def set_state(self, name: str, value: Any) -> None:
        """Save a JSON-able value under ``name`` (batch ids, round counters ...)."""
        self._query(
            "INSERT INTO state (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) "
            "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (name, _dumps(value), time.time()),
        )

    def get_state(self, name: str) -> Any | None:
        """The value saved under ``name``, or None (also when None itself was saved)."""
        rows = self._query("SELECT value FROM state WHERE name = ?", (name,))
        return json.loads(rows[0][0]) if rows else None

    def delete_state(self, name: str) -> None:
        """Forget ``name``; no error when it is not set."""
        self._query("DELETE FROM state WHERE name = ?", (name,))

    def update_state(
        self, name: str, change: Callable[[Any | None], Any], *, durable: bool = True
    ) -> Any:
        """Read, change and write ``name`` in one ``BEGIN IMMEDIATE`` transaction, so that
        processes changing it at once lose no update (the cost cap's ledger). An exception
        raised by ``change`` leaves the value as it was and propagates. ``durable=False``
        commits without an fsync (WAL, ``synchronous=NORMAL``: atomic and safe from a
        crash of the process, not from a power loss), a tenth of the time."""
        conn = self._conn()
        if not durable:
            conn.execute("PRAGMA synchronous=NORMAL")  # this thread's connection only
        try:
            with _immediate(conn):
                row = conn.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
                value = change(None if row is None else json.loads(row[0]))
                conn.execute(
                    "INSERT INTO state (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT "
                    "(name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (name, _dumps(value), time.time()),
                )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous=FULL")
        return value

    def close(self) -> None:
        """Close this process's connections (from every thread). Idempotent."""
        with self._lock:
            self._closed = True
            mine = [conn for pid, conn in self._connections if pid == os.getpid()]
            # A connection inherited through fork() must not be touched by the child.
            self._connections = [(p, c) for p, c in self._connections if p != os.getpid()]
        for conn in mine:
            conn.close()

    def __enter__(self) -> ResponseStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _decode(row: tuple[Any, ...]) -> StoredResponse | None:
    key, origin, nodeid, ordinal, endpoint, *texts = row[:8]
    latency, source, batch_id, created_at, attempts, rate_limited = row[8:]
    try:
        request, response, headers = (json.loads(text) for text in texts)
    except (TypeError, ValueError):
        # SQLite commits are atomic, so this needs a file edited by hand; treat as absent.
        return None
    fields = (request, response, headers, latency, source, batch_id, created_at)
    return StoredResponse(
        key, origin, nodeid, ordinal, endpoint, *fields, int(attempts), int(rate_limited)
    )
