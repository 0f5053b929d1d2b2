"""Collecting a finished Batch API job: every request settled once, by the job's own files.

A finished job (completed, expired, cancelled or failed) says what became of its requests
in three places, read in this order, and a request settled by an earlier one is not
settled again:

1. the output file: one line per request that ran, an answer (stored at once) or an
   HTTP error;
2. the error file: requests that could not run, with an error code;
3. neither: the requests the job never reached, settled by how the job ended (an expired
   or completed job's are worth another job, a cancelled or failed job's fail with its
   reason, a ``token_limit_exceeded`` job's are resubmitted in smaller jobs).

Whether a failed line is resubmitted or fails for good is :func:`line_verdict`, a pure
function of the line and its attempt count, so the retry rules are unit-tested row by
row (tests/test_batch.py) instead of only through multi-second end-to-end runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .batch_ledger import Requests, planned
from .retry import QUOTA_CODES, UNSUPPORTED_CODES

if TYPE_CHECKING:
    from .plan import PlannedRequest

#: per-line error codes without an HTTP response that are worth another job
RETRY_CODES = frozenset(
    {"batch_expired", "missing_result", "server_error", "rate_limit_exceeded", "timeout"}
)
RETRY_STATUSES = frozenset({408, 409, 429})
#: how many of a failed job's error lines are shown
SHOWN_ERRORS = 5


# ------------------------------------------------------------------ the per-line verdict
@dataclass(frozen=True)
class Verdict:
    """What becomes of one failed line: another job, or failure for good with a reason."""

    resubmit: bool
    reason: str = ""
    fatal: bool = False  # every other request would get it too (a wrong key, no quota...)

    @classmethod
    def failed(cls, reason: str, fatal: bool = False) -> Verdict:
        return cls(resubmit=False, reason=reason, fatal=fatal)


RESUBMIT = Verdict(resubmit=True)


def line_verdict(
    response: Any, error: Any, attempts: int, *, max_attempts: int, live: bool
) -> Verdict:
    """Resubmit a failed line, or fail it for good.

    ``response`` is the line's HTTP response (a dict), or anything else when the line
    has none; ``error`` its error object. ``attempts`` counts this one. Retryable are
    429/408/409/5xx responses and the :data:`RETRY_CODES`, up to ``max_attempts``; with
    the live fallback (``live``) a line fails here at once, to be called in real time in
    the run, except an expired one (it never ran: the next job is still half price).
    """
    fatal = False
    if isinstance(response, dict):
        reason, retryable = _http_reason(response)
        fatal = _fatal_response(response)
        expired = False
    else:
        reason, retryable, expired = _code_reason(error if isinstance(error, dict) else {})
    to_live = live and not expired
    if retryable and not to_live and attempts < max_attempts and not fatal:
        return RESUBMIT
    plural = "s" if attempts != 1 else ""
    return Verdict.failed(f"Batch API error: {reason} (after {attempts} attempt{plural})", fatal)


def _fatal_response(response: dict[str, Any]) -> bool:
    """A line refused for a reason every request shares (see ``retry.is_fatal``)."""
    status = int(response.get("status_code") or 0)
    body = response.get("body")
    err = (body.get("error") if isinstance(body, dict) else None) or {}
    code, typ = err.get("code"), err.get("type")
    if status in (401, 403, 404) or typ in QUOTA_CODES or code in QUOTA_CODES:
        return True
    return status == 400 and code in UNSUPPORTED_CODES


def _http_reason(response: dict[str, Any]) -> tuple[str, bool]:
    status = int(response.get("status_code") or 0)
    body = response.get("body")
    err = (body.get("error") if isinstance(body, dict) else None) or {}
    label = err.get("code") or err.get("type") or ""
    reason = f"HTTP {status} {label}: {err.get('message', '')}".strip()
    return reason, status in RETRY_STATUSES or status >= 500


def _code_reason(error: dict[str, Any]) -> tuple[str, bool, bool]:
    code = str(error.get("code") or "error")
    reason = f"{code}: {error.get('message', '')}".strip()
    return reason, code in RETRY_CODES, code == "batch_expired"


# ------------------------------------------------------------------ one job's lines
@dataclass
class Collected:
    """What collecting one finished job gave."""

    stored: int = 0
    resubmit: list[PlannedRequest] = field(default_factory=list)
    failed: int = 0  # requests that failed for good
    token_limit: bool = False
    line: str = ""


class JobLines:
    """The requests of one finished job as they are settled: stored, resubmitted, failed.

    ``judge(key, response, error)`` gives a failed line's verdict (and counts the
    attempt); the rest is bookkeeping.
    """

    def __init__(self, requests: Requests, judge: Callable[[str, Any, Any], Verdict]) -> None:
        self.requests = requests
        self.judge = judge
        self.seen: set[str] = set()
        self.stored = 0
        self.retry: list[str] = []
        self.errors: dict[str, str] = {}  # failed for good: key -> reason
        self.token_limit = False
        self.reason = ""  # why a failed job failed
        self.problem: str | None = None  # a failed or cancelled job, for the summary
        self.fatal: str | None = None  # the first refusal every other request shares

    def answered(self, key: str) -> None:
        self.seen.add(key)
        self.stored += 1

    def failed_line(self, key: str, response: Any, error: Any) -> None:
        self.seen.add(key)
        verdict = self.judge(key, response, error)
        if verdict.resubmit:
            self.retry.append(key)
        else:
            self.errors[key] = verdict.reason
            if verdict.fatal and self.fatal is None:
                self.fatal = verdict.reason

    def unseen(self) -> list[str]:
        return [k for k in self.requests if k not in self.seen]

    def collected(self, batch_id: str, status: str, *, live: bool) -> Collected:
        return Collected(
            stored=self.stored,
            resubmit=[planned(k, self.requests[k]) for k in self.retry],
            failed=len(self.errors),
            token_limit=self.token_limit,
            line=self._line(batch_id, status, live),
        )

    def _line(self, batch_id: str, status: str, live: bool) -> str:
        detail = f"{self.stored} stored"
        if self.retry:
            detail += f", {len(self.retry)} to resubmit"
        if self.errors:
            detail += f", {len(self.errors)} failed" + (" (left to the live API)" if live else "")
        line = f"llmbench batch: job {batch_id} {status}: {detail}"
        return line + f" -- {self.reason}" if status == "failed" else line


# ------------------------------------------------------------------ the three places
def read_output(lines: JobLines, text: str, store: Callable[[str, dict[str, Any]], None]) -> None:
    """The output file: ``store(key, response)`` each answer; judge each HTTP error."""
    for key, response, error in _rows(text, lines.requests):
        if key in lines.seen:
            continue
        response = response or {}  # an output line without a response: HTTP 0, for good
        if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
            store(key, response)
            lines.answered(key)
        else:
            lines.failed_line(key, response, error)


def read_errors(lines: JobLines, text: str) -> None:
    """The error file: judge each line not settled by the output file."""
    for key, response, error in _rows(text, lines.requests):
        if key not in lines.seen:
            lines.failed_line(key, response, error)


def settle_unseen(lines: JobLines, batch: Any, may_split: Callable[[int], bool]) -> None:
    """The requests in neither file, by how the job ended.

    ``may_split(size)`` is asked when the job failed with ``token_limit_exceeded``:
    whether a job of ``size`` requests of its model can be made smaller.
    """
    unseen = lines.unseen()
    if batch.status == "failed":
        _settle_failed(lines, batch, unseen, may_split)
    elif batch.status == "cancelled":
        for key in unseen:
            lines.errors[key] = f"Batch API job {batch.id} was cancelled before this request ran"
        lines.problem = f"job {batch.id} was cancelled (not by pytest-llmbench)"
    else:
        # expired: lines never run; completed: a line missing from both files (should
        # not happen) -- both are worth another job
        code = "batch_expired" if batch.status == "expired" else "missing_result"
        for key in unseen:
            lines.failed_line(key, None, {"code": code, "message": f"not run (job {batch.status})"})


def _settle_failed(
    lines: JobLines, batch: Any, unseen: list[str], may_split: Callable[[int], bool]
) -> None:
    found = getattr(getattr(batch, "errors", None), "data", None) or []
    lines.reason = reason = failure_reason(found)
    if any(getattr(e, "code", None) == "token_limit_exceeded" for e in found):
        lines.token_limit = True
        if may_split(len(lines.requests)):
            lines.retry += unseen
            return
        for key in unseen:
            lines.errors[key] = f"Batch API: {reason} (even as the only request of a job)"
        return
    for key in unseen:
        lines.errors[key] = f"Batch API rejected job {batch.id}: {reason}"
    lines.problem = f"job {batch.id} failed validation: {reason}"


def failure_reason(found: list[Any]) -> str:
    """A failed job's errors (``batch.errors.data``), the first few, as one line."""
    shown = [_api_error_line(e) for e in found[:SHOWN_ERRORS]]
    if len(found) > SHOWN_ERRORS:
        shown.append(f"... and {len(found) - SHOWN_ERRORS} more")
    return "; ".join(shown) or "no reason given"


def _api_error_line(e: Any) -> str:
    code = getattr(e, "code", None) or "error"
    text = f"{code}: {getattr(e, 'message', '') or ''}".strip()
    line = getattr(e, "line", None)
    return f"{text} (line {line})" if line else text


def _rows(text: str, requests: Requests) -> Iterator[tuple[str, Any, Any]]:
    """(key, response, error) of each line of a job file that is one of its requests."""
    for row in jsonl(text):
        key = row.get("custom_id")
        if isinstance(key, str) and key in requests:
            yield key, row.get("response"), row.get("error")


def jsonl(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row
