"""Shared fixtures: the simulator over real HTTP, and keys that are obviously fake."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_llmbench.sim import SimConfig, Simulator

from .helpers import FAKE_KEY

__all__ = ["FAKE_KEY"]  # re-exported: test files import it from here (new ones: from .helpers)


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
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting of the developer's shell leaks into a test."""
    import os

    for name in list(os.environ):
        if name.startswith(("LLMBENCH_", "PYTEST_LLMBENCH_")) or name in (
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "OPENAI_ORG_ID",
            "OPENAI_PROJECT_ID",
        ):
            monkeypatch.delenv(name, raising=False)
