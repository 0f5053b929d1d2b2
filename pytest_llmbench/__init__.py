"""pytest-llmbench: LLM benchmark datasets as pytest suites, at the account's rate limit.

Public API: the configuration, the client and its response, and the scoring helpers.
Everything else is private and may change. Names are imported on first use, so that
loading the pytest plugin (``pytest --help``) does not import the openai SDK. Taking the
client or its configuration from here also loads the client's Batch API backend
(``batch_client``, which the client, below it in the layers, cannot import itself).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLMClient": "client",
    "Response": "client",
    "Usage": "client",
    "BatchSettings": "config",
    "LLMConfig": "config",
    "ConfigError": "errors",
    "DatasetError": "errors",
    "LLMBenchError": "errors",
    "LLMCallError": "errors",
    "check": "scoring",
    "contains": "scoring",
    "exact": "scoring",
    "extract_choice": "scoring",
    "extract_number": "scoring",
    "normalize": "scoring",
    "normalized_match": "scoring",
    "numbers_match": "scoring",
}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_llmbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    if module in ("client", "config"):
        # registers LLMClient.batch_generate(..., use_batch_api=True)
        importlib.import_module(".batch_client", __name__)
    globals()[name] = value
    return value


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
