"""Running the simulator: in a daemon thread with its own event loop, or in the foreground."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Any

from aiohttp import web

from ..tokens import warm
from .app import make_app
from .config import SimConfig
from .state import SimState

# Stopping waits this long for handlers still sleeping (latency), then cancels them.
SHUTDOWN_TIMEOUT = 1.0


async def start_site(state: SimState, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``state`` on ``host:port`` (0 = any free port); returns the bound port.

    With exact token counts, the encoding of most models (``o200k_base``) is loaded
    first, once per process (0.65 s of CPU here), as a server loads its tokenizer before
    it takes requests. Loaded by the first request, it stopped the server's event loop
    there, and the requests that came meanwhile reached the rate limiter together, their
    refill lost (30 to 36 429s in the first 2,000-case run of ``benchmarks/throughput.py``,
    none in the runs after it); loaded in a thread beside the server, it held the GIL
    while the first requests were served, and a test's burst spread out."""
    if state.config.tokenizer == "exact":
        warm(None)
    runner = web.AppRunner(
        make_app(state),
        # a client that gives up (timeout) cancels its handler, as a real server would stop work
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


class Simulator:
    """An OpenAI-compatible server in a background thread.

    ::

        with Simulator(SimConfig(rpm=60), port=0) as sim:
            client = openai.OpenAI(api_key="sk-test", base_url=sim.base_url, max_retries=0)

    The thread runs its own asyncio loop; :meth:`stats`, :meth:`reset_stats` and
    :meth:`configure` act on the shared state directly (thread-safe). Other processes use
    ``GET /_sim/stats``, ``POST /_sim/reset`` and ``POST /_sim/config`` instead.
    """

    def __init__(
        self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.host = host
        self._requested_port = port
        self.state = SimState(config if config is not None else SimConfig())
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        where = self.base_url if self._port is not None else "not started"
        return f"Simulator({where})"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Simulator:
        """Start serving; returns once the port is bound (raises if binding failed)."""
        if self._thread is not None:
            raise RuntimeError("the simulator is already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._serve, name="llmbench-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the simulator did not start within {timeout} s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._port = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                runner, self._port = loop.run_until_complete(
                    start_site(self.state, self.host, self._requested_port)
                )
            except BaseException as exc:  # handed to start() in the calling thread
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    # -- addresses -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not running")
        return self._port

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:PORT`` (``/_sim/*`` lives here)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    # -- inspection and runtime configuration --------------------------------------------

    @property
    def config(self) -> SimConfig:
        """The current configuration."""
        return self.state.config

    def stats(self) -> dict[str, Any]:
        """The same dict as ``GET /_sim/stats``."""
        return self.state.snapshot()

    def reset_stats(self) -> None:
        """Clear statistics, counters and rate-limit buckets (``POST /_sim/reset``)."""
        self.state.reset()

    def configure(self, **patch: Any) -> SimConfig:
        """Merge ``patch`` into the configuration (``POST /_sim/config``); returns the result.

        ``sim.configure(rpm=120, faults={"500": 0.1}, latency={"kind": "fixed", "mean": 0.05})``.
        A value of ``None`` restores the field's default. Raises ``pydantic.ValidationError``.
        """
        return self.state.configure(patch)
