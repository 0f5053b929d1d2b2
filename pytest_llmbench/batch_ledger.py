"""The job ledger: what a ``--batch-api`` run keeps in the store, so no job is ever lost.

A Batch API job outlives the process that submits it: it may take hours, and pytest may
be stopped by Ctrl-C, ``kill -9``, ``--llm-batch-timeout`` or ``--llm-batch-detach``
meanwhile. Everything needed to find a job again and to store its results is therefore
saved in the response store's state table *before* the step that could lose it, and read
back only here. The rest of the batch code asks this ledger; it never spells a state key.

State entries (``ResponseStore.set_state``):

``batch:jobs``
    a list of small job records (batch id, input file id, model, status, collected ...).
    A record without a batch id is an upload whose ``batches.create`` may or may not have
    happened (a crash between the two): :meth:`JobLedger.resume` looks it up by input file
    id among the account's batches before anything is planned again.
``batch:requests:<input_file_id>``
    ``{key: [nodeid, ordinal, endpoint, body]}`` of one job, written once before the job
    is created, so results can be stored with their request.

Why a request failed for good is kept in the store's failures table (source ``batch``,
with the run token): the replay fails the call with it (unless ``--llm-batch-fallback
live``). Failures are cleared when the next invocation starts: like a live API error, a
batch error is never an answer, and the next run asks again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .store import PlannedRequest  # not plan's: that one imports pytest

if TYPE_CHECKING:
    from .store import ResponseStore

JOBS_STATE = "batch:jobs"
REQUESTS_PREFIX = "batch:requests:"

#: a saved job record (JSON in the state table)
Job = dict[str, Any]
#: a job's requests as saved: ``{key: [nodeid, ordinal, endpoint, body]}``
Requests = dict[str, list[Any]]


def model_of(req: PlannedRequest) -> str:
    return str(req.body.get("model"))


def planned(key: str, row: list[Any]) -> PlannedRequest:
    """A saved request row back as the request the plan made."""
    nodeid, ordinal, endpoint, body = row
    return PlannedRequest(key, nodeid, int(ordinal), endpoint, body)


class JobLedger:
    """The saved job records of a run directory: read, save, update and resume them."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store

    def jobs(self) -> list[Job]:
        return list(self.store.get_state(JOBS_STATE) or [])

    def save(self, jobs: list[Job]) -> None:
        self.store.set_state(JOBS_STATE, jobs)

    def update(self, input_file_id: str, **changes: Any) -> None:
        jobs = self.jobs()
        for job in jobs:
            if job["input_file_id"] == input_file_id:
                job.update(changes)
        self.save(jobs)

    def forget(self, input_file_id: str) -> None:
        self.save([j for j in self.jobs() if j["input_file_id"] != input_file_id])
        self.store.delete_state(REQUESTS_PREFIX + input_file_id)

    def open_jobs(self) -> list[Job]:
        return [j for j in self.jobs() if j.get("batch_id") and not j.get("collected")]

    def job_of(self, batch_id: str) -> Job:
        return next(j for j in self.jobs() if j.get("batch_id") == batch_id)

    def requests_of(self, job: Job) -> Requests:
        return dict(self.store.get_state(REQUESTS_PREFIX + job["input_file_id"]) or {})

    def planned_of(self, job: Job) -> list[PlannedRequest]:
        return [planned(k, row) for k, row in self.requests_of(job).items()]

    def pending_keys(self) -> set[str]:
        """The keys of every request in a job not collected yet."""
        return {k for j in self.open_jobs() for k in self.requests_of(j)}

    def uploaded(
        self, input_file_id: str, chunk: Sequence[PlannedRequest], base_url: str | None
    ) -> None:
        """Save an uploaded file's requests and job record, before the job is created: a
        crash between upload and ``batches.create`` is found again by :meth:`resume`."""
        self.store.set_state(
            REQUESTS_PREFIX + input_file_id,
            {r.key: [r.nodeid, r.ordinal, r.endpoint, r.body] for r in chunk},
        )
        job: Job = {
            "batch_id": None,
            "input_file_id": input_file_id,
            "model": model_of(chunk[0]),
            "endpoint": chunk[0].endpoint,
            "count": len(chunk),
            "created_at": time.time(),
            "base_url": base_url,
            "status": "uploaded",
            "collected": False,
        }
        self.save([*self.jobs(), job])

    def resume(self, find_created: Callable[[Job], Any | None]) -> list[str]:
        """Settle interrupted submissions; returns the ids of the jobs still open.

        ``find_created`` looks up the batch created from a record's input file, if any.
        """
        for job in self.jobs():
            if job.get("batch_id") or job.get("collected"):
                continue
            found = find_created(job)
            if found is None:
                # the upload never became a batch: its requests are simply planned again
                self.forget(job["input_file_id"])
            else:
                self.update(job["input_file_id"], batch_id=found.id, status=found.status)
        return [j["batch_id"] for j in self.open_jobs()]


def record_errors(store: ResponseStore, errors: dict[str, str], run: str) -> None:
    """Save why requests failed for good; the replay fails their calls with it."""
    from .store import Failure

    if errors:
        store.record_failures({key: Failure(r, "batch", run) for key, r in errors.items()})


def clear_errors(store: ResponseStore) -> None:
    """Forget the failures of earlier invocations: they are asked again."""
    store.clear_failures("batch")
