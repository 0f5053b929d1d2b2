"""The one retry policy: what is retried, how long to wait, and the messages for what is not.

The SDK's own retries are off (``max_retries=0``) so that every attempt passes through
the shared budget; tenacity runs the attempts. The wait honours, in this order:
``x-should-retry``, ``retry-after-ms``, ``retry-after`` (seconds or HTTP date), the
``x-ratelimit-reset-*`` header of the exhausted limit, then exponential backoff with
full jitter, capped. A gateway (LiteLLM) that passes these on only as
``llm_provider-retry-after-ms`` and the like is honoured too; the plain headers win when
both are there. Its 429 body (``type: throttling_error``, ``code: "429"``) is a rate
limit like ``rate_limit_exceeded``: only the quota codes make a 429 final.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState

from .budget.base import parse_duration
from .errors import LLMCallError

#: Quota and billing errors: a 429 that waiting never fixes.
QUOTA_CODES = frozenset(
    {"insufficient_quota", "credit_balance_exhausted", "billing_hard_limit_reached"}
)
#: 400 codes naming a parameter or value the model does not accept: every request has it
UNSUPPORTED_CODES = frozenset({"unsupported_parameter", "unsupported_value"})
#: HTTP statuses that are retried (besides timeouts and dropped connections).
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
#: how a LiteLLM-style gateway passes on the upstream's retry and reset headers
GATEWAY_PREFIX = "llm_provider-"


def retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait, from ``retry-after-ms`` or ``retry-after``;
    a gateway's ``llm_provider-`` copies of them when neither is there."""
    if not headers:
        return None
    plain = _retry_after(headers, "", now)
    return plain if plain is not None else _retry_after(headers, GATEWAY_PREFIX, now)


def _retry_after(headers: Mapping[str, str], prefix: str, now: float | None) -> float | None:
    raw_ms = headers.get(prefix + "retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get(prefix + "retry-after")
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(raw) if raw else None
            if parsed is not None:
                return max(0.0, parsed.timestamp() - (time.time() if now is None else now))
    return None


def reset_wait(headers: Mapping[str, str] | None, tokens_needed: int = 1) -> float | None:
    """Estimate the wait from ``x-ratelimit-*`` when a limit is exhausted.

    Reset headers give the time to a *full* reset, not to the next free slot, so the
    wait for ``n`` units is ``reset * n / (limit - remaining)`` (linear refill).
    """
    if not headers:
        return None
    waits = []
    for dim, need in (("requests", 1), ("tokens", max(1, tokens_needed))):
        try:
            remaining = int(headers[f"x-ratelimit-remaining-{dim}"])
            limit = int(headers[f"x-ratelimit-limit-{dim}"])
        except (KeyError, ValueError):
            continue
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{dim}"))
        if reset is None:  # a gateway passes it on only under its prefix
            reset = parse_duration(headers.get(f"{GATEWAY_PREFIX}x-ratelimit-reset-{dim}"))
        if reset is None or remaining >= need:
            continue
        used = max(1, limit - remaining)
        waits.append(reset * min(need, used) / used)
    return max(waits) if waits else None


def _headers(exc: BaseException) -> Mapping[str, str] | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    return headers if headers is not None else None


def error_code(exc: BaseException) -> tuple[str | None, str | None]:
    """The API's ``(code, type)`` of an SDK error, if it carried an error body."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            code, typ = inner.get("code"), inner.get("type")
            return (str(code) if code else None, str(typ) if typ else None)
    return getattr(exc, "code", None), getattr(exc, "type", None)


def is_quota(exc: BaseException) -> bool:
    code, typ = error_code(exc)
    return typ in QUOTA_CODES or code in QUOTA_CODES


def is_too_large(exc: BaseException) -> bool:
    """A 429 for one request larger than the whole per-minute limit can never succeed."""
    import openai

    if not isinstance(exc, openai.RateLimitError):
        return False
    message = str(getattr(exc, "message", "") or exc)
    return "Request too large" in message


def is_fatal(exc: BaseException) -> bool:
    """Whether every other request of the run would get the same refusal: a wrong key
    (401), no permission (403), no quota or credit, a model or path that does not exist
    (404), a parameter or value the model does not accept (400 ``unsupported_*``)."""
    if isinstance(exc, LLMCallError):
        return exc.fatal
    status = getattr(exc, "status_code", None)
    if status in (401, 403, 404) or is_quota(exc):
        return True
    code, _ = error_code(exc)
    return status == 400 and code in UNSUPPORTED_CODES


def is_retryable(exc: BaseException) -> bool:
    """The single decision of what to retry."""
    import openai

    if isinstance(exc, LLMCallError):
        return exc.retryable
    headers = _headers(exc)
    if headers is not None:
        should = headers.get("x-should-retry")
        if should == "true":
            return not is_quota(exc)
        if should == "false":
            return False
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429:
            return not (is_quota(exc) or is_too_large(exc))
        return exc.status_code in RETRY_STATUSES
    # a 200 whose body was not valid JSON: a broken answer, worth another try
    return isinstance(exc, openai.APIResponseValidationError) or _is_decode_error(exc)


def _is_decode_error(exc: BaseException) -> bool:
    import json

    return isinstance(exc, json.JSONDecodeError)


@dataclass
class BackoffPolicy:
    """Exponential backoff with full jitter, capped; server hints win when present."""

    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 120.0
    rng: Callable[[], float] = random.random

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
        return float(self.rng() * min(self.cap, self.base * (2 ** max(0, attempt - 1))))

    def server_wait(self, exc: BaseException, tokens_needed: int = 1) -> float | None:
        import openai

        headers = _headers(exc)
        hinted = retry_after(headers)
        if hinted is None and isinstance(exc, openai.RateLimitError):
            hinted = reset_wait(headers, tokens_needed)
        return hinted

    def wait(self, exc: BaseException, attempt: int, tokens_needed: int = 1) -> float:
        hinted = self.server_wait(exc, tokens_needed)
        if hinted is not None:
            # a little jitter on top so that a pool told the same time does not stampede
            return min(hinted, self.max_retry_after) * (1.0 + 0.1 * self.rng())
        return self.backoff(attempt)

    def tenacity_wait(
        self, tokens_needed: int = 1, first_attempt: int = 1
    ) -> Callable[[RetryCallState], float]:
        """tenacity's ``wait``; ``first_attempt`` is the call's number of tenacity's first
        attempt (2 when the first attempt ran before tenacity was built)."""

        def _wait(state: RetryCallState) -> float:
            attempt = state.attempt_number + first_attempt - 1
            exc = state.outcome.exception() if state.outcome else None
            if exc is None:
                return self.backoff(attempt)
            return self.wait(exc, attempt, tokens_needed)

        return _wait


def describe(exc: BaseException, *, model: str, attempts: int) -> LLMCallError:
    """Turn an SDK error into an :class:`LLMCallError` whose message says what to fix."""
    import openai

    code, typ = error_code(exc)
    status = getattr(exc, "status_code", None)
    raw = str(getattr(exc, "message", "") or exc).strip()
    raw = raw.splitlines()[0][:300] if raw else type(exc).__name__
    tries = f" (after {attempts} attempt{'s' if attempts != 1 else ''})"
    if is_quota(exc):
        msg = (
            "OpenAI quota exhausted (insufficient_quota): the account has no credit left; "
            "check plan and billing. Not retried."
        )
    elif is_too_large(exc):
        msg = (
            f"request too large for the {model} tokens-per-minute limit: shorten the prompt "
            f"or lower max_tokens. Not retried. Server said: {raw}"
        )
    elif status == 401:
        msg = "authentication failed (401): check OPENAI_API_KEY. " + _no_key(raw)
    elif status == 403:
        msg = f"permission denied (403): the key's project cannot use {model}. {_no_key(raw)}"
    elif status == 404:
        msg = f"not found (404): check --llm-model and --llm-base-url. {_no_key(raw)}"
    elif status in (400, 422):
        msg = _invalid_request(exc, code, model, raw)
    elif isinstance(exc, openai.APITimeoutError):
        msg = f"request timed out{tries}; raise --llm-timeout if the model is slow"
    elif isinstance(exc, openai.APIConnectionError):
        msg = f"could not connect to the API{tries}: {_no_key(raw)}"
    elif status == 429:
        msg = f"rate limited{tries}: {_no_key(raw)}"
    else:
        label = f"HTTP {status}" if status else type(exc).__name__
        msg = f"{label}{tries}: {_no_key(raw)}"
    return LLMCallError(
        msg,
        status=status,
        code=code,
        error_type=typ,
        attempts=attempts,
        retryable=is_retryable(exc),
        fatal=is_fatal(exc),
    )


def _invalid_request(exc: BaseException, code: str | None, model: str, raw: str) -> str:
    param = None
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            param = inner.get("param")
    if code in UNSUPPORTED_CODES:
        return (
            f"{model} does not accept parameter {param!r} ({code}): {_no_key(raw)} "
            f"Drop it from the suite's calls, or choose another model."
        )
    where = f" (parameter {param!r})" if param else ""
    return f"invalid request{where}: {_no_key(raw)}"


_KEYLIKE = re.compile(r"sk-[A-Za-z0-9_\-*]{4,}")


def _no_key(text: str) -> str:
    """Mask anything shaped like an API key that a server echoed back."""
    return _KEYLIKE.sub("sk-***", text)


def as_mapping(headers: Any) -> dict[str, str]:
    """Lower-cased plain dict of response headers (httpx2 headers are case-insensitive)."""
    if headers is None:
        return {}
    return {str(k).lower(): str(v) for k, v in headers.items()}
