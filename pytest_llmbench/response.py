"""What a call returns: :class:`Response` (live or replayed), its :class:`Usage`, the raw
:class:`Answer` as it arrived, and the counters a client keeps per model."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .tokens import output_bound, request_prompt_tokens

if TYPE_CHECKING:
    from .store import StoredResponse


@dataclass(frozen=True)
class Usage:
    """Token counts of one response (or a sum of them).

    ``reasoning_tokens`` (``usage.completion_tokens_details.reasoning_tokens``, 0 when
    absent) are a reasoning model's hidden tokens: already part of ``completion_tokens``.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    reasoning_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Usage:
        u = body.get("usage") or {}
        p, c = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
        details = u.get("completion_tokens_details") or {}
        reasoning = int(details.get("reasoning_tokens") or 0) if isinstance(details, Mapping) else 0
        return cls(p, c, int(u.get("total_tokens") or p + c), reasoning)


@dataclass(frozen=True)
class Response:
    """One chat completion, live or replayed from the store.

    ``text`` is the first choice's content; ``choices`` every choice's. ``error`` is set
    (and ``ok`` False) only for items of :meth:`LLMClient.batch_generate` that failed.
    """

    text: str
    choices: tuple[str, ...]
    finish_reason: str | None
    usage: Usage
    latency: float
    model: str
    request_id: str | None
    params: dict[str, Any]
    cached: bool = False
    attempts: int = 1
    rate_limited: int = 0
    source: str = "live"
    key: str | None = None
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_body(
        cls,
        body: Mapping[str, Any],
        *,
        request: Mapping[str, Any],
        latency: float,
        request_id: str | None = None,
        cached: bool = False,
        attempts: int = 1,
        rate_limited: int = 0,
        source: str = "live",
        key: str | None = None,
    ) -> Response:
        choices = body.get("choices") or []
        texts = tuple(str((c.get("message") or {}).get("content") or "") for c in choices)
        params = {k: v for k, v in request.items() if k != "messages"}
        return cls(
            text=texts[0] if texts else "",
            choices=texts,
            finish_reason=(choices[0].get("finish_reason") if choices else None),
            usage=Usage.from_body(body),
            latency=latency,
            model=str(body.get("model") or request.get("model") or ""),
            request_id=request_id or body.get("_request_id"),
            params=params,
            cached=cached,
            attempts=attempts,
            rate_limited=rate_limited,
            source=source,
            key=key,
            raw=dict(body),
        )

    @classmethod
    def from_stored(cls, stored: StoredResponse, *, cached: bool = True) -> Response:
        """A stored answer. ``cached`` is False for answers fetched ahead by this very run
        (prefetch or Batch API), which then report the attempts it took to get them."""
        headers = stored.headers or {}
        return cls.from_body(
            stored.response,
            request=stored.request,
            latency=stored.latency_s,
            request_id=headers.get("x-request-id"),
            cached=cached,
            attempts=0 if cached else stored.attempts,
            rate_limited=0 if cached else stored.rate_limited,
            source=stored.source,
            key=stored.key,
        )

    @classmethod
    def failed(cls, request: Mapping[str, Any], error: str, key: str | None = None) -> Response:
        params = {k: v for k, v in request.items() if k != "messages"}
        return cls(
            "",
            (),
            None,
            Usage(),
            0.0,
            str(request.get("model", "")),
            None,
            params,
            key=key,
            error=error,
        )


@dataclass
class ModelStats:
    calls: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: int = 0
    cached: int = 0
    usage: Usage = Usage()


class ClientStats:
    """Counters summed per model, shared by every view of one client (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_model: dict[str, ModelStats] = {}

    def add(self, model: str, **deltas: Any) -> None:
        with self._lock:
            stats = self.by_model.setdefault(model, ModelStats())
            for name, value in deltas.items():
                setattr(stats, name, getattr(stats, name) + value)

    def total(self) -> ModelStats:
        with self._lock:
            out = ModelStats()
            for s in self.by_model.values():
                for name in ("calls", "requests", "retries", "rate_limited", "errors", "cached"):
                    setattr(out, name, getattr(out, name) + getattr(s, name))
                out.usage = out.usage + s.usage
            return out


def estimate_tokens(
    body: Mapping[str, Any], default_max_tokens: int, prompt_tokens: int | None = None
) -> int:
    """What a request counts toward TPM, before it is sent: its prompt tokens (exact with
    the ``tokens`` extra, else ~chars/4 + per-message overhead: ``tokens.py``; pass them
    when already counted) plus n x max_tokens. The real ``usage`` corrects it afterwards."""
    bound = output_bound(body)
    if bound is None:
        bound = int(body.get("n") or 1) * default_max_tokens
    prompt = request_prompt_tokens(body) if prompt_tokens is None else prompt_tokens
    return prompt + bound


@dataclass
class Answer:
    """A raw answer as it arrived: the JSON body, the response headers, and what it took.
    ``text`` is the body as the server sent it, when known (the store keeps it as it is
    instead of encoding ``body`` again); it must parse to ``body``. ``request_text`` is
    likewise the request's JSON as sent, when known; it must parse to the request body."""

    body: dict[str, Any]
    headers: dict[str, str]
    latency: float
    attempts: int
    rate_limited: int = 0
    text: str | None = field(default=None, repr=False, compare=False)
    request_text: str | None = field(default=None, repr=False, compare=False)


__all__ = ["Answer", "ClientStats", "ModelStats", "Response", "Usage", "estimate_tokens"]
