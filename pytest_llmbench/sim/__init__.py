"""An OpenAI-compatible simulator for tests and offline runs (aiohttp).

Chat completions with deterministic answers from an answer key, models, files and the Batch
API, rate limits paced like OpenAI's with the real headers and 429 bodies, quota mode,
latency and fault injection, and ``/_sim`` endpoints for statistics and runtime config.

::

    from pytest_llmbench.sim import SimConfig, Simulator

    with Simulator(SimConfig(rpm=600, tpm=100_000), port=0) as sim:
        client = openai.OpenAI(api_key="sk-test", base_url=sim.base_url, max_retries=0)

Standalone: ``python -m pytest_llmbench.sim --port 0 --rpm 600`` prints one line
``pytest-llmbench simulator listening on http://127.0.0.1:PORT/v1``.
"""

from __future__ import annotations

from .answers import load_answer_key, prompt_tokens, text_tokens
from .config import AnswerItem, FaultKind, LatencyConfig, SimConfig, StormConfig
from .limits import go_duration
from .server import Simulator

__all__ = [
    "AnswerItem",
    "FaultKind",
    "LatencyConfig",
    "SimConfig",
    "Simulator",
    "StormConfig",
    "go_duration",
    "load_answer_key",
    "prompt_tokens",
    "text_tokens",
]
