"""The fetch's aiohttp path sends what the SDK sends and raises what the SDK raises.

Each test runs a small aiohttp server on loopback that records what it receives and
answers as told, and sends the same body through both senders of ``wire.py``: the SDK
(``AsyncOpenAI``, the reference) and aiohttp. Nothing is patched.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web

from pytest_llmbench.config import LLMConfig
from pytest_llmbench.transport import Shared
from pytest_llmbench.wire import WIRE_PARAMETERS, AioSender, SdkSender, create_parameters

FAKE_KEY = "sk-test-fake-key-wire-0000"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "What is 2 + 2? ünïcode"}],
    "temperature": 0.5,
    "max_completion_tokens": 8,
}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(handler: Handler) -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": request.headers.copy(),  # case-insensitive
                "json": json.loads(await request.read()),
            }
        )
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1", seen


def config(base_url: str, **extra: Any) -> LLMConfig:
    data = {"api_key": FAKE_KEY, "base_url": base_url, "timeout": 1.0, **extra}
    return LLMConfig.model_validate(data, context={"env": {}})


async def both(cfg: LLMConfig, body: dict[str, Any]) -> list[Any]:
    """Send ``body`` through the SDK, then through aiohttp: each one's answer or error."""
    shared = Shared(cfg, None)
    out: list[Any] = []
    for sender in (SdkSender(openai.AsyncOpenAI(**shared.client_kwargs())), shared.sender()):
        try:
            out.append(await sender.send_chat(body))
        except Exception as exc:  # the error is what is compared
            out.append(exc)
        finally:
            await sender.close()
    return out


def test_every_wire_parameter_is_one_create_takes() -> None:
    assert create_parameters() >= WIRE_PARAMETERS
    assert "stream" not in WIRE_PARAMETERS and "extra_body" not in WIRE_PARAMETERS


def test_the_same_request_and_answer() -> None:
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response(ANSWER, headers={"x-ratelimit-limit-requests": "500"})

    async def main() -> tuple[list[Any], list[dict[str, Any]]]:
        runner, url, seen = await serve(ok)
        try:
            cfg = config(url, organization="org-wire", project="proj-wire")
            return await both(cfg, dict(BODY)), seen
        finally:
            await runner.cleanup()

    (sdk, ours), seen = asyncio.run(main())
    assert [s["path"] for s in seen] == ["/v1/chat/completions"] * 2
    assert [s["method"] for s in seen] == ["POST", "POST"]
    assert seen[0]["json"] == seen[1]["json"] == BODY
    assert list(seen[1]["json"]) == list(BODY)  # the caller's key order
    for name in ("Authorization", "OpenAI-Organization", "OpenAI-Project", "Content-Type"):
        assert seen[0]["headers"][name] == seen[1]["headers"][name], name
    assert seen[1]["headers"]["Accept"] == "application/json"
    assert json.loads(sdk.text) == json.loads(ours.text) == ANSWER
    assert sdk.headers["x-ratelimit-limit-requests"] == ours.headers["x-ratelimit-limit-requests"]


def _refusal(message: str, **fields: str) -> dict[str, Any]:
    return {"error": {"message": message, **fields}}


@pytest.mark.parametrize(
    ("status", "payload", "cls"),
    [
        (429, _refusal("Rate limit reached", code="rate_limit_exceeded"), "RateLimitError"),
        (401, _refusal("Incorrect API key", code="invalid_api_key"), "AuthenticationError"),
        (400, _refusal("Unsupported value: 'temperature'", param="temperature"), "BadRequestError"),
        (404, _refusal("The model does not exist", code="model_not_found"), "NotFoundError"),
        (503, "upstream unavailable", "InternalServerError"),
        (418, {"detail": "teapot"}, "APIStatusError"),
    ],
)
def test_the_same_error(status: int, payload: Any, cls: str) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        headers = {"retry-after-ms": "250", "x-request-id": "req-1"}
        if isinstance(payload, str):
            return web.Response(status=status, text=payload, headers=headers)
        return web.json_response(payload, status=status, headers=headers)

    async def main() -> list[Any]:
        runner, url, _ = await serve(refuse)
        try:
            return await both(config(url), dict(BODY))
        finally:
            await runner.cleanup()

    sdk, ours = asyncio.run(main())
    assert type(sdk) is type(ours) is getattr(openai, cls)
    assert str(sdk) == str(ours)
    assert sdk.body == ours.body
    assert sdk.status_code == ours.status_code == status
    assert sdk.response.headers["retry-after-ms"] == ours.response.headers["retry-after-ms"]
    assert getattr(sdk, "code", None) == getattr(ours, "code", None)


def test_the_same_time_out_and_connection_error() -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response(ANSWER)

    async def main() -> tuple[list[Any], list[Any]]:
        runner, url, _ = await serve(hang)
        try:
            slow = await both(config(url), dict(BODY))
        finally:
            await runner.cleanup()
        gone = await both(config(url), dict(BODY))  # nothing listens there any more
        return slow, gone

    slow, gone = asyncio.run(main())
    assert [type(e) for e in slow] == [openai.APITimeoutError] * 2
    assert [type(e) for e in gone] == [openai.APIConnectionError] * 2


def test_a_body_aiohttp_does_not_take_goes_through_the_sdk() -> None:
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response(ANSWER)

    async def main() -> tuple[Any, list[dict[str, Any]]]:
        runner, url, seen = await serve(ok)
        sender = Shared(config(url), None).sender()
        assert isinstance(sender, AioSender)
        try:
            body = {**BODY, "extra_body": {"custom": 1}}  # an SDK option
            return await sender.send_chat(body), seen
        finally:
            await sender.close()
            await runner.cleanup()

    answer, seen = asyncio.run(main())
    assert json.loads(answer.text) == ANSWER
    assert seen[0]["json"]["custom"] == 1  # the SDK merged it, as create() does
    assert seen[0]["headers"]["User-Agent"].startswith("AsyncOpenAI/")


def test_transport_sdk_sends_everything_through_the_sdk() -> None:
    sender = Shared(config("http://127.0.0.1:9/v1", transport="sdk"), None).sender()
    assert isinstance(sender, SdkSender)
    asyncio.run(sender.close())


FIRST_ERROR = """
import asyncio, sys, threading

from aiohttp import web

from pytest_llmbench.config import LLMConfig
from pytest_llmbench.transport import Shared

IMPORTED_ON = []


class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "openai":
            IMPORTED_ON.append(threading.current_thread().name)
        return None


async def main():
    async def refuse(request):
        return web.json_response({"error": {"message": "slow down"}}, status=429)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    cfg = LLMConfig.model_validate(
        {"api_key": "sk-test-fake-key-wire-0000", "base_url": f"http://127.0.0.1:{port}/v1"},
        context={"env": {}},
    )
    sender = Shared(cfg, None).sender()
    assert "openai" not in sys.modules, "imported before any error"
    sys.meta_path.insert(0, Watch())
    try:
        await sender.send_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    except Exception as exc:
        print(type(exc).__module__, type(exc).__name__, IMPORTED_ON)
    await sender.close()
    await runner.cleanup()


asyncio.run(main())
"""


def test_the_first_error_imports_the_sdk_off_the_event_loop() -> None:
    # Given a process that has not imported the SDK (a fetch with no error so far), when
    # the first error arrives: it is the SDK's own exception, and the SDK was imported
    # in a worker thread, so the event loop went on meanwhile (2-3 s on a loaded machine)
    out = subprocess.run(
        [sys.executable, "-c", FIRST_ERROR], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    module, name, threads = out.stdout.split(maxsplit=2)
    assert (module, name) == ("openai", "RateLimitError")
    assert threads.strip().startswith("['asyncio_"), threads  # not ['MainThread']
