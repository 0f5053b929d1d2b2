"""Helpers shared by the tests: the fake key, a polling wait, a manual clock, answer keys.

Import them from here (``from .helpers import wait_for``); ``conftest.py`` re-exports
``FAKE_KEY`` for the test files that import it from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# Obviously fake: the simulator accepts any key that starts with "sk-" unless told otherwise.
FAKE_KEY = "sk-test-fake-key-do-not-use-0000"

#: plugins of the test environment that the pytest runs under test do not use: pytest-html
#: and pytest-metadata (one test of the pytest-html section enables them again), llmock's
#: fixtures and anyio's (no test uses them). pytest-html's import and pytest-metadata's
#: look at every installed package cost a run 0.1-0.2 s of CPU in each of its processes
#: (the run, its plan subprocess, each xdist worker): about 5% of the suite's CPU (578
#: against 610 CPU-seconds in one pair of runs on 2 CPUs).
UNNEEDED_PLUGINS = ("html", "metadata", "llmock", "anyio")
LEAN_ADDOPTS = " ".join(f"-p no:{name}" for name in UNNEEDED_PLUGINS)


def wait_for(
    condition: Callable[[], T],
    what: str = "the condition",
    timeout: float = 10.0,
    interval: float = 0.01,
) -> T:
    """Poll ``condition`` until it returns something truthy and return that value.

    Fails the test after ``timeout`` seconds. The sleep between polls only paces the
    polling of an observable condition; it never stands in for the condition itself.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ManualClock:
    """A clock that moves only when told to: for the ``clock=`` seams (simulator state and
    limits, budgets). ``sleep`` advances it instead of sleeping and records the request."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


# -- simulator answer keys ----------------------------------------------------------------


def questions(n: int) -> list[dict[str, Any]]:
    """An answer key of ``n`` numbered questions with distinct answers (``City{i}``)."""
    return [
        {
            "question": f"What is the capital of imaginary country number {i}?",
            "correct": f"City{i}",
            "wrong": [f"Town{i}a", f"Town{i}b", f"Town{i}c"],
        }
        for i in range(n)
    ]


def answer_key(
    rows: Iterable[Mapping[str, Any]],
    *,
    question: str = "question",
    answer: str | Callable[[Mapping[str, Any]], str] = "answer",
    wrong: Iterable[str] = ("nope",),
) -> list[dict[str, Any]]:
    """The simulator's answer key for dataset ``rows``: each row's ``question`` field is
    answered with its ``answer`` field (or ``answer(row)``), else with one of ``wrong``."""
    wrong = list(wrong)
    return [
        {
            "question": row[question],
            "correct": answer(row) if callable(answer) else row[answer],
            "wrong": list(wrong),
        }
        for row in rows
    ]
