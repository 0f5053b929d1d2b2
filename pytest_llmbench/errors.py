"""Exceptions raised by pytest-llmbench.

Every error a user can cause carries a short message that names the thing at fault
(an option, a dataset file and line, a request parameter). None of them ever contains
an API key.
"""

from __future__ import annotations

#: The exit status of a run stopped because the API refused a request for a reason every
#: other request shares (key, permission, quota, model, parameter): see the README.
FATAL_EXIT_STATUS = 6
#: A request was about to be sent without a key (the library's message; the plugin's is
#: ``runtime.MISSING_KEY``).
MISSING_KEY = "no OpenAI API key: set OPENAI_API_KEY, or pass LLMConfig(api_key=...)"


class LLMBenchError(Exception):
    """Base class of every error pytest-llmbench raises on purpose."""


class ConfigError(LLMBenchError):
    """A setting is missing or invalid; the message names the option and what is allowed."""


class DatasetError(LLMBenchError):
    """A dataset cannot be loaded; the message names the file, line and field at fault."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        where = path or "<dataset>"
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")


class LLMCallError(LLMBenchError):
    """An API call failed for good (not retryable, or retries exhausted).

    ``status`` is the HTTP status (None for connection failures), ``code`` the API's
    error code (``insufficient_quota``, ``model_not_found`` ...), ``attempts`` how many
    HTTP requests were made for this call, ``rate_limited`` how many of them got a 429.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        error_type: str | None = None,
        attempts: int = 1,
        retryable: bool = False,
        fatal: bool = False,
    ) -> None:
        self.status = status
        self.fatal = fatal
        self.code = code
        self.error_type = error_type
        self.attempts = attempts
        self.rate_limited = 0
        self.retryable = retryable
        super().__init__(message)


class RunStopped(LLMBenchError):
    """The run is stopping (a fatal error elsewhere, an interrupt): this request was not
    sent, and is not a failure of its own."""


class RunInterrupted(KeyboardInterrupt):
    """Ends a session on Ctrl-C or SIGTERM once the requests in flight are stored; pytest
    shows it as ``llmbench: <message>`` with its interrupted status, and no traceback."""


RunInterrupted.__module__ = "builtins"  # pytest's banner: "llmbench: interrupted: ..."
RunInterrupted.__qualname__ = "llmbench"


class StoreError(LLMBenchError):
    """The response store cannot be opened or written."""


class UnusableStoreError(StoreError):
    """The store file is not a usable response store (corrupt, truncated, not SQLite, or
    another program's database); ``reason`` is SQLite's word for it. A run sets such a
    file aside when it starts (``store.check_store``)."""

    def __init__(self, message: str, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class BudgetError(LLMBenchError):
    """A rate-limit budget cannot be used (bad URL, unreachable Redis, impossible request)."""


class LLMPending(BaseException):
    """Raised in the plan phase when a test reaches a call whose answer is not stored yet.

    A BaseException so that a test's ``except Exception`` cannot swallow it.
    """
