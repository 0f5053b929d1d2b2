"""pytest-llmbench: LLM benchmark datasets as pytest suites, at the account's rate limit.

Public API: the configuration, the client and its response, and the scoring helpers.
Everything else is private and may change.
"""

from __future__ import annotations

from .client import LLMClient, Response, Usage
from .config import BatchSettings, LLMConfig
from .errors import ConfigError, DatasetError, LLMBenchError, LLMCallError
from .scoring import (
    check,
    contains,
    exact,
    extract_choice,
    extract_number,
    normalize,
    normalized_match,
    numbers_match,
)

__version__ = "0.1.0"

__all__ = [
    "BatchSettings",
    "ConfigError",
    "DatasetError",
    "LLMBenchError",
    "LLMCallError",
    "LLMClient",
    "LLMConfig",
    "Response",
    "Usage",
    "__version__",
    "check",
    "contains",
    "exact",
    "extract_choice",
    "extract_number",
    "normalize",
    "normalized_match",
    "numbers_match",
]
