"""The aiohttp application: OpenAI-compatible routes under ``/v1`` and ``/_sim`` inspection.

Order of checks for a chat request, as the API does it: API key (401), JSON body and
parameters (400), model (404), quota mode (429 ``insufficient_quota``), storm (429), the
rate limiter (429, or "Request too large"), then a scripted or drawn fault, then the answer
after the configured latency (with ``parallelism`` set, after a wait for a free slot too).
Every chat response past the model check carries the ``x-ratelimit-*`` headers of that
model (none for unlimited limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from . import errors
from .batches import BatchManager
from .chat import answer_chat, completion_object, request_id, validate_chat
from .errors import SimAPIError
from .files import PURPOSES, FileStore
from .limits import adapt_headers, rate_limit_message, retry_after_headers
from .state import SimState

STATE: web.AppKey[SimState] = web.AppKey("state", SimState)
BATCHES: web.AppKey[BatchManager] = web.AppKey("batches", BatchManager)
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)


class Slots:
    """The server's parallelism: at most N chat answers are worked on at once, the others
    wait in FIFO order (asyncio's semaphore wakes its waiters in order); None: no limit."""

    def __init__(self) -> None:
        self._size: int | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def slot(self, parallelism: int | None) -> contextlib.AbstractAsyncContextManager[Any]:
        if parallelism is None:
            return contextlib.nullcontext()
        if self._semaphore is None or self._size != parallelism:
            # a changed setting: new arrivals queue on the new size
            self._size, self._semaphore = parallelism, asyncio.Semaphore(parallelism)
        return self._semaphore


SLOTS: web.AppKey[Slots] = web.AppKey("slots", Slots)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please "
    "contact us through our help center at help.openai.com.)"
)
MODEL_CREATED = 1_700_000_000
MAX_BODY = 512 * 1024 * 1024


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render :class:`SimAPIError`, add the common headers, count statuses."""
    started = time.monotonic()
    state = request.app[STATE]
    api = request.path.startswith("/v1")
    cfg = state.config
    if api:
        state.count("requests_total")
    try:
        missing = None if cfg.batch_api else no_batch_api(request)
        response = missing if missing is not None else await handler(request)
    except SimAPIError as exc:
        gateway = cfg.gateway and exc.status == 429 and exc.code == "rate_limit_exceeded"
        body = errors.gateway_body(exc) if gateway else exc.body()
        response = json_response(body, exc.status, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"Invalid URL ({request.method} {request.path})"
        status = 404 if exc.status in (404, 405) else exc.status
        response = json_response(errors.error_body(message, "invalid_request_error"), status)
    if api:
        state.count_status(response.status)
        response.headers.setdefault("x-request-id", request_id())
        response.headers["openai-processing-ms"] = str(int((time.monotonic() - started) * 1000))
        response.headers["openai-organization"] = state.config.organization
        response.headers["openai-version"] = "2020-10-01"
        adapt_headers(
            response.headers, gateway=cfg.gateway, rate_limit_headers=cfg.rate_limit_headers
        )
    return response


def no_batch_api(request: web.Request) -> web.Response | None:
    """``batch_api`` off: the Files and Batch APIs are missing, as on llama.cpp's server
    (FastAPI's bare 404), before the key is even looked at."""
    path = request.path
    if path.startswith(("/v1/files", "/v1/batches")):
        return json_response({"detail": "Not Found"}, 404)
    return None


def check_key(request: web.Request, state: SimState) -> None:
    cfg = state.config
    if not cfg.require_api_key:
        return
    auth = request.headers.get("Authorization", "")
    scheme, _, key = auth.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise errors.missing_key()
    ok = key in cfg.api_keys if cfg.api_keys else key.startswith("sk-")
    if not ok:
        raise errors.invalid_key(key)


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SimAPIError(400, BAD_JSON) from None


def drop_connection(request: web.Request) -> None:
    """Abort the TCP connection: the client sees a disconnect without any response."""
    if request.transport is not None:
        request.transport.abort()
    # aiohttp treats a cancelled handler as "no response to send"
    raise asyncio.CancelledError


def rate_limited(
    model: str, state: SimState, retry_ms: int, headers: dict[str, str]
) -> SimAPIError:
    """An injected or storm 429, worded like the limiter's own."""
    cfg = state.config
    limit = cfg.rpm or 10_000
    message = (
        f"Rate limit reached for {model} in organization {cfg.organization} on requests per "
        f"min (RPM): Limit {limit}, Used {limit}, Requested 1. Please try again in "
        f"{retry_ms}ms. Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    state.count("rate_limit_429")
    return SimAPIError(
        429,
        message,
        "requests",
        None,
        "rate_limit_exceeded",
        headers=headers | retry_after_headers(retry_ms / 1000),
    )


async def serve(request: web.Request, state: SimState, parallelism: int | None) -> None:
    """The answer's latency, in one of the server's ``parallelism`` slots (waited for in
    FIFO order, so a queued request's latency includes its wait, as with llama.cpp)."""
    async with request.app[SLOTS].slot(parallelism):
        with state.serving():
            delay = state.latency()
            if delay > 0:
                await asyncio.sleep(delay)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    with state.chat_in_flight():
        check_key(request, state)
        req = validate_chat(await read_json(request), state.config)
        cfg = state.config
        if cfg.quota_exceeded:
            state.count("quota_429")
            raise SimAPIError(
                429,
                errors.QUOTA,
                "insufficient_quota",
                None,
                "insufficient_quota",
                headers=state.headers_for(req.model),
            )
        storm_ms = state.storm_hit()
        if storm_ms is not None:
            raise rate_limited(req.model, state, storm_ms, state.headers_for(req.model))
        decision, headers = state.admit(req.model, req.rate_tokens)
        if not decision.admitted:
            state.count("rate_limit_429")
            if not decision.too_large:
                headers |= retry_after_headers(decision.retry_after)
            message = rate_limit_message(req.model, cfg.organization, decision)
            raise SimAPIError(
                429,
                message,
                decision.kind or "requests",
                None,
                "rate_limit_exceeded",
                headers=headers,
            )
        fault = state.next_fault()
        if fault == "drop":
            drop_connection(request)
        if fault == "500":
            raise SimAPIError(500, errors.SERVER_ERROR, "server_error", headers=headers)
        if fault == "503":
            raise SimAPIError(503, errors.OVERLOADED, "server_error", headers=headers)
        if fault == "429":
            raise rate_limited(req.model, state, cfg.fault_retry_after_ms, headers)
        if fault == "hang":
            closing = request.app[CLOSING]
            try:
                await asyncio.wait_for(closing.wait(), cfg.hang_seconds)
            except asyncio.TimeoutError:
                pass  # hung long enough: answer late
            else:
                drop_connection(request)  # the server is stopping
        answer = answer_chat(req, state.index, cfg, state.next_draw(req.hash))
        body = completion_object(req, answer, int(time.time()))
        await serve(request, state, cfg.parallelism)
        if fault == "malformed":
            text = json.dumps(body)
            return web.Response(
                body=text[: len(text) // 2].encode(),
                headers=headers,
                content_type="application/json",
            )
        if cfg.tpm_refund_unused:
            reserved = req.rate_tokens - req.prompt_tokens
            state.limits_for(req.model).refund_tokens(reserved - answer.completion_tokens)
        transport = request.transport
        if transport is None or transport.is_closing():
            # The client went away during the latency (killed, timed out): the answer is
            # never delivered, so it must not count as answered; a later identical request
            # is then no duplicate of anything the client received.
            state.record_undelivered()
            return json_response(body, headers=headers)
        state.record_answer(req.hash, answer.prompt_tokens, answer.completion_tokens)
        return json_response(body, headers=headers)


def model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": "system"}


async def list_models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_key(request, state)
    data = [model_object(m) for m in state.config.models]
    return json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_key(request, state)
    model = request.match_info["model"]
    if model not in state.config.models and not state.config.accept_any_model:
        raise SimAPIError(
            404, f"The model '{model}' does not exist", param="model", code="model_not_found"
        )
    return json_response(model_object(model))


async def upload_file(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_key(request, state)
    if not request.content_type.startswith("multipart/"):
        raise SimAPIError(400, "Expected a multipart/form-data body with 'file' and 'purpose'.")
    form = await request.post()
    purpose = form.get("purpose")
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        raise errors.missing_param("file")
    if not isinstance(purpose, str):
        raise errors.missing_param("purpose")
    if purpose not in PURPOSES:
        raise errors.invalid_value("purpose", purpose, PURPOSES)
    stored = request.app[BATCHES].files.add(upload.filename, purpose, upload.file.read())
    state.count("files_uploaded")
    return json_response(stored.to_json())


async def list_files(request: web.Request) -> web.StreamResponse:
    check_key(request, request.app[STATE])
    files = request.app[BATCHES].files.files.values()
    return json_response(
        {"object": "list", "data": [f.to_json() for f in files], "has_more": False}
    )


async def get_file(request: web.Request) -> web.StreamResponse:
    check_key(request, request.app[STATE])
    return json_response(request.app[BATCHES].files.get(request.match_info["file_id"]).to_json())


async def file_content(request: web.Request) -> web.StreamResponse:
    check_key(request, request.app[STATE])
    stored = request.app[BATCHES].files.get(request.match_info["file_id"])
    return web.Response(body=stored.data, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.StreamResponse:
    check_key(request, request.app[STATE])
    store = request.app[BATCHES].files
    stored = store.get(request.match_info["file_id"])
    del store.files[stored.id]
    return json_response({"id": stored.id, "object": "file", "deleted": True})


async def create_batch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_key(request, state)
    if state.config.quota_exceeded:  # a job is refused at creation, as a chat call is
        state.count("quota_429")
        raise SimAPIError(429, errors.QUOTA, "insufficient_quota", None, "insufficient_quota")
    manager = request.app[BATCHES]
    batch = manager.create(await read_json(request))
    return json_response(manager.to_json(batch))


async def get_batch(request: web.Request) -> web.StreamResponse:
    check_key(request, request.app[STATE])
    manager = request.app[BATCHES]
    return json_response(manager.to_json(manager.get(request.match_info["batch_id"])))


async def cancel_batch(request: web.Request) -> web.StreamResponse:
    check_key(request, request.app[STATE])
    manager = request.app[BATCHES]
    return json_response(manager.to_json(manager.cancel(request.match_info["batch_id"])))


async def list_batches(request: web.Request) -> web.StreamResponse:
    check_key(request, request.app[STATE])
    raw = request.query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise SimAPIError(400, f"Invalid 'limit': {raw!r}; expected 1 to 100.", param="limit")
    after = request.query.get("after")
    return json_response(request.app[BATCHES].listing(int(raw), after))


async def sim_stats(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[STATE].snapshot())


async def sim_reset(request: web.Request) -> web.StreamResponse:
    request.app[STATE].reset()
    return json_response({"ok": True})


async def sim_get_config(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[STATE].config_json())


async def sim_patch_config(request: web.Request) -> web.StreamResponse:
    patch = await read_json(request)
    if not isinstance(patch, dict):
        raise SimAPIError(400, "The config patch must be a JSON object.")
    try:
        request.app[STATE].configure(patch)
    except (ValidationError, ValueError, OSError) as exc:
        raise SimAPIError(400, f"Invalid simulator config: {exc}") from None
    return json_response(request.app[STATE].config_json())


async def _close_batches(app: web.Application) -> None:
    app[CLOSING].set()
    await app[BATCHES].close()


def make_app(state: SimState) -> web.Application:
    """The aiohttp application serving ``state``."""
    app = web.Application(middlewares=[api_middleware], client_max_size=MAX_BODY)
    app[STATE] = state
    app[BATCHES] = BatchManager(state, FileStore())
    app[CLOSING] = asyncio.Event()
    app[SLOTS] = Slots()
    app.on_shutdown.append(_close_batches)
    r = app.router
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model}", get_model)
    r.add_post("/v1/files", upload_file)
    r.add_get("/v1/files", list_files)
    r.add_get("/v1/files/{file_id}", get_file)
    r.add_delete("/v1/files/{file_id}", delete_file)
    r.add_get("/v1/files/{file_id}/content", file_content)
    r.add_post("/v1/batches", create_batch)
    r.add_get("/v1/batches", list_batches)
    r.add_get("/v1/batches/{batch_id}", get_batch)
    r.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    r.add_get("/_sim/stats", sim_stats)
    r.add_post("/_sim/reset", sim_reset)
    r.add_get("/_sim/config", sim_get_config)
    r.add_post("/_sim/config", sim_patch_config)
    return app
