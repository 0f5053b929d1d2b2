"""The Batch API calls of a ``--batch-api`` run, each with the one retry policy.

Batch calls are few (an upload, a create, a poll every few seconds, two downloads per
job) and are not paced by the shared request budget: the Batch API has its own pool. A
transient error (429, 5xx, a dropped connection) is retried with backoff here, so the
ledger, the waiter and the collector see either a result or an :class:`LLMCallError`
that ends the run with its reason.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .budget import mask_url
from .errors import LLMCallError
from .retry import BackoffPolicy, describe, is_retryable

if TYPE_CHECKING:
    import openai

    from .batch_ledger import Job

T = TypeVar("T")
#: tries per call, the first included
ATTEMPTS = 6
#: ``batches.list`` pages searched for a job lost between upload and create (100 each)
LIST_PAGES = 20


class NoBatchApi(LLMCallError):
    """The server has no Files or Batch API: an endpoint answered 404 (llama.cpp's
    server, most local servers). The run stops at once, naming the server and the
    endpoint, before anything is sent to ``/chat/completions``."""

    def __init__(self, base_url: str, endpoint: str) -> None:
        self.base_url = base_url
        self.endpoint = endpoint
        super().__init__(
            f"--batch-api: {base_url} has no Batch API ({endpoint} answered 404); "
            "run without --batch-api",
            status=404,
            fatal=True,
        )


class BatchApi:
    """Files and batches of one OpenAI client; ``model`` only names errors."""

    def __init__(self, client: openai.OpenAI, model: str) -> None:
        self.client = client
        self.model = model
        self.policy = BackoffPolicy(base=0.5, cap=10.0)

    def call(self, fn: Callable[[], T]) -> T:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fn()
            except Exception as exc:
                if not is_retryable(exc) or attempt == ATTEMPTS:
                    raise describe(exc, model=self.model, attempts=attempt) from None
                time.sleep(self.policy.wait(exc, attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def endpoint_call(self, endpoint: str, fn: Callable[[], T], object_id: str = "") -> T:
        """:meth:`call` for a call whose 404 means the endpoint is missing (not an object
        of it: a 404 that names ``object_id`` is about that object)."""
        try:
            return self.call(fn)
        except LLMCallError as exc:
            if exc.status != 404 or (object_id and object_id in str(exc)):
                raise
            base = mask_url(str(self.client.base_url).rstrip("/"))
            raise NoBatchApi(base, endpoint) from None

    def upload(self, data: bytes) -> str:
        """Upload a JSONL input file; returns its file id."""
        upload = self.endpoint_call(
            "POST /files",
            lambda: self.client.files.create(
                file=("llmbench-batch.jsonl", io.BytesIO(data)), purpose="batch"
            ),
        )
        return str(upload.id)

    def create(self, input_file_id: str, endpoint: str, window: Literal["24h"], count: int) -> Any:
        return self.endpoint_call(
            "POST /batches",
            lambda: self.client.batches.create(
                input_file_id=input_file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=window,
                metadata={"created_by": "pytest-llmbench", "requests": str(count)},
            ),
            input_file_id,
        )

    def retrieve(self, batch_id: str) -> Any | None:
        """The batch object, or None when the API does not know the id (404)."""
        try:
            return self.call(lambda: self.client.batches.retrieve(batch_id))
        except LLMCallError as exc:
            if exc.status == 404:
                return None
            raise

    def text(self, file_id: str) -> str:
        return self.call(lambda: self.client.files.content(file_id).text)

    def find_created(self, job: Job) -> Any | None:
        """A batch created from ``job``'s input file before a crash, if any."""
        after: str | None = None
        oldest = float(job.get("created_at", 0.0)) - 3600.0
        for _ in range(LIST_PAGES):  # the newest 2,000 batches at most
            page = self.endpoint_call("GET /batches", partial(self._page_after, after))
            data = list(page.data)
            for b in data:
                if b.input_file_id == job["input_file_id"]:
                    return b
            if not data or not page.has_more or data[-1].created_at < oldest:
                return None
            after = data[-1].id
        return None

    def _page_after(self, after: str | None) -> Any:
        if after is None:
            return self.client.batches.list(limit=100)
        return self.client.batches.list(limit=100, after=after)
