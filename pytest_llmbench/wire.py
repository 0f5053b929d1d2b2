"""How the concurrent path puts a chat request on the wire: through aiohttp for the bodies
``chat.completions.create()`` would send unchanged, through the SDK for the rest.

Why not the SDK for every request (README, "Why the fetch sends with aiohttp"): the SDK
recommends aiohttp as its transport for concurrency (``openai[aiohttp]``,
``DefaultAioHttpClient``), and aiohttp is already this package's dependency (the
simulator). Measured with ``benchmarks/cpu_ceiling.py``, the SDK's object layer on top of
that transport still costs about three times the CPU of the request itself: request
options, the httpx2 request and response objects, the transport adapter. With the
network not the bottleneck, that CPU is the fetch's ceiling. So the fetch sends what the
SDK would send itself:

* the same URL (``base_url`` + ``/chat/completions``, the SDK's default base URL and
  ``OPENAI_BASE_URL`` when none is configured), the same JSON body (keys in the caller's
  order), the same ``Authorization``, ``OpenAI-Organization`` and ``OpenAI-Project``
  headers, ``Accept``/``Content-Type: application/json``, and a ``User-Agent`` naming this
  package and the SDK's version; the SDK's ``X-Stainless-*`` telemetry headers are left
  out;
* the same time-out (``timeout`` seconds to connect and between reads), the proxy the
  environment names (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), read
  once;
* an answer other than 2xx becomes the SDK's own exception (``RateLimitError``,
  ``AuthenticationError``...), with the same message, body and an ``httpx2.Response``
  carrying the status and headers, and a connection failure or time-out the SDK's
  ``APIConnectionError``/``APITimeoutError``; retries, fatal errors and messages are
  therefore the same on both paths (the SDK is imported at the first such error, not
  before: the fetch starts without its 0.7 s import).

A body with a parameter this SDK version does not know, an SDK option, a stream, or a
value JSON cannot encode goes through ``AsyncOpenAI`` as before, so what ``create()``
refuses is still refused, unsent. ``transport="sdk"`` (``--llm-transport sdk``) sends every
request through the SDK; cassettes always do (vcrpy records the SDK's httpx2 traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import os
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

from .config import LLMConfig
from .options import DEFAULT_BASE_URL

if TYPE_CHECKING:
    import aiohttp
    import openai

#: the JSON parameters of ``chat.completions.create()`` a body may use and still go
#: through aiohttp; a test checks each is a parameter of the installed SDK's create()
WIRE_PARAMETERS = frozenset(
    {
        "messages", "model", "audio", "frequency_penalty", "function_call", "functions",
        "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
        "modalities", "n", "parallel_tool_calls", "prediction", "presence_penalty",
        "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier",
        "seed", "service_tier", "stop", "store", "temperature", "tool_choice", "tools",
        "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
    }
)  # fmt: skip


class RawAnswer(Protocol):
    """What a sender hands back: the answer's headers and its body as text."""

    @property
    def headers(self) -> Any: ...

    @property
    def text(self) -> str: ...


class Sender(Protocol):
    """Sends one chat request; raises the SDK's exceptions for what is not answered."""

    async def send_chat(self, body: dict[str, Any]) -> RawAnswer: ...

    async def close(self) -> None: ...


class WireAnswer:
    """A 2xx answer read off aiohttp: its headers (case-insensitive) and text, and the
    JSON text of the request it answers (the store keeps it instead of encoding the
    request again)."""

    __slots__ = ("headers", "request_text", "text")

    def __init__(self, headers: Any, text: str, request_text: str | None = None) -> None:
        self.headers, self.text, self.request_text = headers, text, request_text


class SdkSender:
    """Every request through ``AsyncOpenAI`` (cassettes, ``--llm-transport sdk``, and the
    bodies aiohttp does not take)."""

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self.client = client

    async def send_chat(self, body: dict[str, Any]) -> RawAnswer:
        if plain_body(body):
            # the SDK's public lower-level post: the same JSON, headers, auth and error
            # classes as create(), without walking the parameters through its TypedDicts
            return await self.client.post(
                "/chat/completions", body=body, cast_to=_http_response(), options=_OPTIONS
            )
        created = await self.client.chat.completions.with_raw_response.create(**body)
        answer: RawAnswer = created.http_response
        return answer

    async def close(self) -> None:
        await self.client.close()


class AioSender:
    """Plain bodies through one aiohttp session; the rest through a lazily made SDK client."""

    def __init__(self, config: LLMConfig, sdk_kwargs: dict[str, Any], limit: int) -> None:
        self.config, self.sdk_kwargs, self.limit = config, sdk_kwargs, limit
        self.url = chat_url(config)
        self.headers = wire_headers(config, sdk_kwargs["api_key"])
        self.proxy = env_proxy(self.url)
        # imported now (0.3 s), while the plan subprocess starts, not at the first request
        import aiohttp

        self._client_error = aiohttp.ClientError
        self._session: aiohttp.ClientSession | None = None
        self._sdk: SdkSender | None = None
        self._sdk_imported: asyncio.Future[Any] | None = None

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        t = self.config.timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.limit),
            timeout=aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t),
            headers=self.headers,
            # the proxy comes from env_proxy, once; trust_env would also look up ~/.netrc
            # for every request (in a thread), for auth the Authorization header overrides
            trust_env=False,
            skip_auto_headers=("Accept-Encoding",),
        )
        return self._session

    async def send_chat(self, body: dict[str, Any]) -> RawAnswer:
        data = wire_json(body)
        if data is None:
            return await self._sdk_sender().send_chat(body)
        session = self._session or self._open()
        try:
            async with session.post(self.url, data=data, proxy=self.proxy) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except asyncio.TimeoutError:  # aiohttp's time-outs (3.10: not the builtin's)
            await self._import_sdk()
            raise sdk_error("timeout", self.url) from None
        except (self._client_error, OSError) as exc:
            await self._import_sdk()
            raise sdk_error("connection", self.url, detail=exc) from None
        text = raw.decode("utf-8", "replace")
        if 200 <= status < 300:
            return WireAnswer(headers, text, data.decode())
        await self._import_sdk()
        raise status_error(self.url, status, headers, text)

    async def _import_sdk(self) -> None:
        """Import the SDK, whose exceptions every error becomes, in a thread the first
        time one needs it (a run without errors never imports it). Importing it costs
        0.6 s of CPU, and 2-3 s while xdist starts its workers on 2 cores: on the event
        loop, the first 429 held up every other request's answer and reservation for that
        long (the fetch then paused as if rate-limited). In a thread, the loop goes on;
        every error meanwhile waits for the same import."""
        if self._sdk_imported is None:
            self._sdk_imported = asyncio.ensure_future(
                asyncio.to_thread(importlib.import_module, "openai")
            )
        await asyncio.shield(self._sdk_imported)

    def _sdk_sender(self) -> SdkSender:
        if self._sdk is None:
            import openai

            self._sdk = SdkSender(openai.AsyncOpenAI(**self.sdk_kwargs))
        return self._sdk

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._sdk is not None:
            await self._sdk.close()
            self._sdk = None


def make_sender(config: LLMConfig, sdk_kwargs: dict[str, Any], *, sdk_only: bool) -> Sender:
    """The sender of one concurrent run (one event loop)."""
    if sdk_only or config.transport == "sdk":
        import openai

        return SdkSender(openai.AsyncOpenAI(**sdk_kwargs))
    return AioSender(config, sdk_kwargs, config.max_concurrency)


# ------------------------------------------------------------------------------ requests
def chat_url(config: LLMConfig) -> str:
    base = config.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    return base.rstrip("/") + "/chat/completions"


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``ALL_PROXY``, ``NO_PROXY``), as httpx2's ``trust_env`` reads them; None for none."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def wire_headers(config: LLMConfig, api_key: str) -> dict[str, str]:
    """The headers ``AsyncOpenAI`` sends with a chat request, its telemetry left out."""
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Accept": "application/json",
        "Content-Type": "application/json",
        "User-Agent": f"pytest-llmbench (AsyncOpenAI/Python {_sdk_version()}; aiohttp)",
    }
    organization = config.organization or os.environ.get("OPENAI_ORG_ID")
    project = config.project or os.environ.get("OPENAI_PROJECT_ID")
    if organization:
        headers["OpenAI-Organization"] = organization
    if project:
        headers["OpenAI-Project"] = project
    return headers


def _sdk_version() -> str:
    try:
        return metadata.version("openai")
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        return "unknown"


def wire_json(body: Mapping[str, Any]) -> bytes | None:
    """``body`` as the SDK would encode it, or None when aiohttp must not take it."""
    if (
        "model" not in body
        or "messages" not in body
        or not body.keys() <= WIRE_PARAMETERS
        or isinstance(body.get("response_format"), type)
    ):
        return None
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError):
        return None  # a value JSON cannot encode: the SDK says what is wrong with it


# ------------------------------------------------------------------------------ errors
def sdk_error(kind: str, url: str, detail: BaseException | None = None) -> Exception:
    """The SDK's exception for a request that got no answer."""
    import httpx2
    import openai

    request = httpx2.Request("POST", url)
    if kind == "timeout":
        return openai.APITimeoutError(request=request)
    error = openai.APIConnectionError(request=request)
    if detail is not None:
        error.__cause__ = detail
    return error


def status_error(url: str, status: int, headers: Any, text: str) -> Exception:
    """The SDK's exception for an answer other than 2xx: the class, message and body
    ``AsyncOpenAI`` would raise for it."""
    import httpx2
    import openai

    response = httpx2.Response(
        status,
        headers=list(headers.items()),
        content=text.encode(),
        request=httpx2.Request("POST", url),
    )
    body: object = text.strip()
    with contextlib.suppress(ValueError):  # not JSON: the text is the body
        body = json.loads(text)
    data = body.get("error", body) if isinstance(body, dict) else body
    said = data.get("message") if isinstance(data, dict) else None
    message = f"Error code: {status}" + (f" - {said}" if isinstance(said, str) and said else "")
    cls = _STATUS_ERRORS.get(status)
    if cls is None:
        cls = "InternalServerError" if status >= 500 else "APIStatusError"
    error_cls: type[openai.APIStatusError] = getattr(openai, cls)
    return error_cls(message, response=response, body=data)


_STATUS_ERRORS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}


# ------------------------------------------------------------------------------ the SDK path
#: what ``chat.completions.create()`` sends for the body: bearer auth only
_OPTIONS: openai.RequestOptions = {"security": {"bearer_auth": True}}
#: create()'s arguments that are SDK options, not JSON parameters of the request
_SDK_OPTIONS = frozenset({"self", "extra_headers", "extra_query", "extra_body", "timeout"})


@functools.cache
def create_parameters() -> frozenset[str]:
    """The JSON parameters ``chat.completions.create()`` takes (this SDK version's)."""
    import inspect

    from openai.resources.chat import AsyncCompletions

    return frozenset(inspect.signature(AsyncCompletions.create).parameters) - _SDK_OPTIONS


def _http_response() -> type[Any]:
    # looked up each time (a dict lookup): the SDK checks the class it imported itself,
    # and a re-import of httpx2 (pytester's in-process runs restore sys.modules) makes a
    # new one
    import httpx2

    return httpx2.Response


def plain_body(body: Mapping[str, Any]) -> bool:
    """Whether ``create(**body)`` would send ``body`` as it is: only parameters it knows,
    the two it requires, no stream, no pydantic class as ``response_format`` (create()
    refuses one). Its transform changes nothing in such a body: no chat parameter has an
    alias or a format, and JSON values pass through."""
    return (
        "model" in body
        and "messages" in body
        and body.keys() <= create_parameters()
        and not body.get("stream")
        and not isinstance(body.get("response_format"), type)
    )
