"""Shared fixtures: the simulator over real HTTP, and keys that are obviously fake."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_llmbench.sim import SimConfig, Simulator

from .helpers import FAKE_KEY, LEAN_ADDOPTS

__all__ = ["FAKE_KEY"]  # re-exported: test files import it from here (new ones: from .helpers)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the addopts): one worker more than the CPUs this process may use. The
    tests spend a sixth of their time waiting (simulated latency, subprocesses starting),
    not computing: on 2 CPUs the suite took 318 s with 3 workers against 345 s with 2
    (CPU 1.87 and 1.67 of 2), the battery 117 s against 128 s, all passing."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cpus or 1) + 1


@pytest.fixture(scope="session", autouse=True)
def _lazy_imports_done() -> None:
    """Import what the SDK and its transport import lazily, on their first request,
    before any test runs. pytester restores ``sys.modules`` after each of its tests: a
    module first imported inside one (httpcore2's backend, say) is dropped and imported
    anew by the next user, whose exception classes then no longer match the ones
    imported before (a ``ReadTimeout`` went unmapped, and a time-out unretried, in a
    test that ran after a pytester test had made the process's first SDK request)."""
    import openai

    with Simulator(SimConfig(), port=0) as server:
        client = openai.OpenAI(api_key=FAKE_KEY, base_url=server.base_url, max_retries=0)
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "warm"}]
            )
        finally:
            client.close()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A fresh simulator (no limits, no latency) on a free loopback port."""
    with Simulator(SimConfig(), port=0) as server:
        yield server


@pytest.fixture
def fake_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    return FAKE_KEY


@pytest.fixture(autouse=True)
def _clean_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting of the developer's shell leaks into a test; the pytest runs a test
    starts leave out the plugins they do not use (``helpers.UNNEEDED_PLUGINS``), through
    ``PYTEST_ADDOPTS``, which their plan subprocesses and xdist workers inherit."""
    import os

    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")  # first: making it clears PYTEST_ADDOPTS
    monkeypatch.setenv("PYTEST_ADDOPTS", LEAN_ADDOPTS)

    for name in list(os.environ):
        if name.startswith(("LLMBENCH_", "PYTEST_LLMBENCH_")) or name in (
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "OPENAI_ORG_ID",
            "OPENAI_PROJECT_ID",
        ):
            monkeypatch.delenv(name, raising=False)
