"""The rate-limit budget shared by every process of a run (RPM and TPM per model).

``open_budget`` picks the backend: a JSON file under the run directory guarded by a
file lock (the default; one machine), or a Redis hash updated by a Lua script
(``redis://``; several machines). Both run the algorithm in :mod:`.base`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BudgetError
from .base import (
    BaseBudget,
    Budget,
    BudgetState,
    Limits,
    MemoryBudget,
    NullBudget,
    RateLimitSnapshot,
    Ticket,
    mask_url,
    parse_duration,
)
from .file import FileBudget, safe_name
from .redis import RedisBudget

__all__ = [
    "BaseBudget",
    "Budget",
    "BudgetState",
    "FileBudget",
    "Limits",
    "MemoryBudget",
    "NullBudget",
    "RateLimitSnapshot",
    "RedisBudget",
    "Ticket",
    "mask_url",
    "open_budget",
    "parse_duration",
]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_budget(
    url: str | None,
    *,
    run_dir: Path,
    key: str,
    rpm: int | None,
    tpm: int | None,
    burst_seconds: float = 1.0,
    opening_burst: bool = False,
) -> Budget:
    """Open the shared budget for ``key`` (the model name).

    ``url`` None, ``""`` or ``"file"`` gives a :class:`FileBudget` at
    ``run_dir/budget-<key>.json``; ``redis://host:port/db`` (also ``rediss://``,
    ``unix://``) a :class:`RedisBudget`. With ``rpm`` and ``tpm`` both None the budget
    starts unlimited and learns the limits from the response headers. ``"none"`` paces
    nothing (a cassette replay, a server without limits). ``opening_burst`` lets the first
    answer's advertised ``remaining`` be spent at once (see :mod:`.base`).
    """
    if url == "none":
        return NullBudget()
    if url in (None, "", "file"):
        path = Path(run_dir) / f"budget-{safe_name(key)}.json"
        return FileBudget(
            path, rpm=rpm, tpm=tpm, burst_seconds=burst_seconds, opening_burst=opening_burst
        )
    assert url is not None
    if url.startswith(_REDIS_SCHEMES):
        return RedisBudget(
            url,
            key=key,
            rpm=rpm,
            tpm=tpm,
            burst_seconds=burst_seconds,
            opening_burst=opening_burst,
        )
    raise BudgetError(
        f"unknown budget {mask_url(url)!r}: use 'file', 'none' or a redis://host:port/db URL"
    )
