"""The response store's SQL schema, its version, and the migration of older stores.

Schema 2 files every answer under its origin (the server that gave it) with the attempts
and 429s it took as columns, and keeps failures in their own table. Schema 1 stores are
migrated in place on first open, in one transaction (see :func:`migrate_v1`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

SCHEMA_VERSION = 2
#: the origin of the built-in simulator's answers, whatever port it listened on
SIM_ORIGIN = "simulator"
#: the origin of a handle opened without one, and of schema-1 answers of unknown origin
UNKNOWN_ORIGIN = "unknown"
OPENAI_ORIGIN = "https://api.openai.com/v1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    key TEXT NOT NULL,
    origin TEXT NOT NULL,
    nodeid TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    headers TEXT NOT NULL,
    latency_s REAL NOT NULL,
    source TEXT NOT NULL,
    batch_id TEXT,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, origin)
);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT NOT NULL,
    origin TEXT NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    run TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    rate_limited INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (key, origin)
);
"""
#: every name a store may hold; ``responses_nodeid``, an index on (origin, nodeid), is
#: only in stores made before it was dropped: it cost every answer's insert about 3 us
#: of a fetch's CPU, and the one query by node id (``nodeids``) reads the whole table
TABLES = ("meta", "responses", "responses_nodeid", "state", "failures")


@dataclass(frozen=True)
class StoredResponse:
    """One stored API response: the raw JSON body, what produced it and where from."""

    key: str
    origin: str
    nodeid: str
    ordinal: int
    endpoint: str
    request: dict[str, Any]
    response: dict[str, Any]
    headers: dict[str, str]
    latency_s: float
    source: str
    batch_id: str | None
    created_at: float
    attempts: int = 1  # HTTP requests it took (retries included)
    rate_limited: int = 0  # 429s on the way


@dataclass(frozen=True)
class Failure:
    """Why a request failed for good in one run (the Batch API's or the prefetch's
    verdict); the run's tests fail that call with it instead of sending it again."""

    reason: str
    source: str  # "batch", "prefetch", or GAVE_UP (the prefetch gave up: tried again live)
    run: str  # the run token of the run that recorded it
    attempts: int = 0
    rate_limited: int = 0


#: a request the prefetch gave up on after its retries (5xx, timeouts, 429s): its test
#: sends it again live, and that call's figures include the prefetch's attempts
GAVE_UP = "prefetch-gave-up"


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a test case: its store key (also the Batch API ``custom_id``), the
    case, the call's ordinal in it, the endpoint and the body; and the prompt's tokens
    when the plan counted them (``tokens.request_prompt_tokens``, in the plan subprocess:
    not in the fetch's loop), else None (not part of the request's identity)."""

    key: str
    nodeid: str
    ordinal: int
    endpoint: str
    body: dict[str, Any]
    prompt_tokens: int | None = field(default=None, compare=False)


class AnswerLike(Protocol):
    """What an answer brings to the store (``response.Answer`` is one)."""

    @property
    def body(self) -> dict[str, Any]: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def latency(self) -> float: ...
    @property
    def attempts(self) -> int: ...
    @property
    def rate_limited(self) -> int: ...


#: the responses table's columns, in order (StoredResponse's fields, checked in store.py)
COLUMNS = (
    "key, origin, nodeid, ordinal, endpoint, request, response, headers, latency_s, source, "
    "batch_id, created_at, attempts, rate_limited"
)


# ---------------------------------------------------------------------- migration
_V1_COLUMNS = "key, nodeid, ordinal, endpoint, request, response, headers, latency_s, source, "
_V1_COLUMNS += "batch_id, created_at"
#: what schema 1 kept in fake headers, now real columns
_V1_ATTEMPTS, _V1_LIMITED = "x-llmbench-attempts", "x-llmbench-rate-limited"


def legacy_origin(headers: Mapping[str, Any]) -> str:
    """Where a schema-1 answer came from, as far as its response headers tell."""
    organization = str(headers.get("openai-organization", ""))
    if organization == "org-sim":
        return SIM_ORIGIN  # the built-in simulator names itself so
    if "openai-version" in headers or "cf-ray" in headers:
        return OPENAI_ORIGIN
    return UNKNOWN_ORIGIN


def migrate_v1(conn: sqlite3.Connection) -> str:
    """Schema 1 -> 2 in one transaction: origins, attempts and 429s as columns, failures
    in their own table (schema 1 kept the Batch API's in ``state``)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        if current is not None and str(current[0]) != "1":  # another process migrated it
            conn.execute("COMMIT")
            return str(current[0])
        conn.execute("ALTER TABLE responses RENAME TO responses_v1")
        conn.execute("DROP INDEX IF EXISTS responses_nodeid")
        for statement in SCHEMA.split(";"):
            conn.execute(statement)
        insert = f"INSERT OR IGNORE INTO responses ({COLUMNS}) VALUES ({', '.join('?' * 14)})"
        for row in conn.execute(f"SELECT {_V1_COLUMNS} FROM responses_v1 ORDER BY rowid"):
            conn.execute(insert, _v1_row(row))
        conn.execute("DROP TABLE responses_v1")
        conn.execute("DELETE FROM state WHERE name LIKE 'batch:error%'")
        conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", ("2",))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return "2"


def _v1_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    key, nodeid, ordinal, endpoint, request, response, headers_text = row[:7]
    try:
        headers = json.loads(headers_text)
    except (TypeError, ValueError):
        headers = {}
    headers = headers if isinstance(headers, dict) else {}
    attempts = int(headers.pop(_V1_ATTEMPTS, 1) or 1)
    limited = int(headers.pop(_V1_LIMITED, 0) or 0)
    origin = legacy_origin(headers)
    head = (
        key,
        origin,
        nodeid,
        ordinal,
        endpoint,
        request,
        response,
        json.dumps(headers, ensure_ascii=False, separators=(",", ":")),
    )
    return (*head, *row[7:], attempts, limited)
