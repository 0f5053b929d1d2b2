"""Answer key, deterministic answers and token counting.

Token counting: a request's prompt tokens are counted by the project's own counter
(``pytest_llmbench.tokens``, the client's), as the ``tokenizer`` setting says: ``exact``
(OpenAI's encodings and per-message overhead; the default when the ``tokens`` extra is
installed) or ``estimate`` (``ceil(C / 4) + 4·m`` for ``C`` characters of content in ``m``
messages). Either way client and server agree. A completion is ``ceil(len(answer) / 4)``
tokens per choice (a documented approximation: answers are cut at ``4·max_tokens``
characters).

Answers: the question whose text appears in the request's user messages (longest match wins)
is answered correctly with probability p(T) = clamp(p_correct - slope·T, 0, 1), otherwise
with one of its wrong answers. The draw is a hash of the canonical body, the simulator seed,
the choice index and, at T > 0 without a ``seed`` parameter, how many times the same body was
answered before; so it is reproducible, yet repeated samples differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..tokens import Tokenizer, content_text
from ..tokens import prompt_tokens as count_prompt_tokens
from .config import AnswerItem

CHARS_PER_TOKEN = 4

# A line such as "Question: ..." or "Q3) ..." is looked up without its label as well.
_LABEL = re.compile(r"^\s*(?:[A-Za-z][\w ]{0,24}[:)]|\d{1,6}[.)])\s*")

_FILLER_SUBJECTS = ("The simulator", "This model", "A careful reader", "The benchmark")
_FILLER_VERBS = ("has no recorded answer for", "cannot look up", "does not recognise", "skips")
_FILLER_OBJECTS = ("this prompt", "the question asked", "the request", "this input")


def text_tokens(text: str) -> int:
    """Completion tokens of ``text``: ``ceil(len(text) / 4)``."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def prompt_tokens(
    messages: Sequence[Mapping[str, Any]],
    model: str | None = None,
    tokenizer: Tokenizer | None = None,
) -> int:
    """Prompt tokens of a message list, counted as the client counts them (exact when the
    ``tokens`` extra is installed, unless ``tokenizer`` says ``estimate``)."""
    return count_prompt_tokens(messages, model, tokenizer)


def canonical_body(body: Mapping[str, Any]) -> str:
    """The canonical JSON of a request body (sorted keys, no spaces)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def body_hash(body: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical body: the key of ``duplicate_body_hashes``."""
    return hashlib.sha256(canonical_body(body).encode()).hexdigest()


def _unit(digest: bytes) -> float:
    """A float in [0, 1) from the first 8 bytes of a digest."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


def load_answer_key(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any] | AnswerItem],
) -> list[AnswerItem]:
    """Load an answer key from a JSON list or JSONL file, or from Python objects.

    Each item is ``{"question": str, "correct": str, "wrong": [str, ...]}``; other keys are
    ignored. A bad item raises ``ValueError`` naming the file and line (or the index).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
            return [_item(row, f"{path}[{i}]") for i, row in enumerate(rows)]
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            items.append(_item(row, f"{path}:{lineno}"))
        return items
    return [_item(row, f"item {i}") for i, row in enumerate(source)]


def _item(row: Any, where: str) -> AnswerItem:
    if isinstance(row, AnswerItem):
        return row
    try:
        return AnswerItem.model_validate(row)
    except ValueError as exc:
        first = str(exc).splitlines()
        detail = "; ".join(first[1:3]) if len(first) > 1 else str(exc)
        raise ValueError(f"{where}: bad answer-key item: {detail}") from None


class AnswerIndex:
    """Finds the known question in a request, fast enough for 30,000 questions.

    Exact lookups first (the stripped last user message, its first line, and every line of
    the user messages with and without a label like ``Question:``), each confirmed as a
    substring; a full scan only when none of them hits, cached per prompt text.
    """

    def __init__(self, items: Iterable[AnswerItem]) -> None:
        self._by_text: dict[str, AnswerItem] = {}
        self._by_first_line: dict[str, list[AnswerItem]] = {}
        for item in items:
            key = item.question.strip()
            self._by_text[key] = item
            first = key.splitlines()[0].strip()
            self._by_first_line.setdefault(first, []).append(item)
        self._scan_cache: dict[str, AnswerItem | None] = {}

    def __len__(self) -> int:
        return len(self._by_text)

    def find(self, messages: Sequence[Mapping[str, Any]]) -> AnswerItem | None:
        """The longest known question contained in the user messages, or None."""
        if not self._by_text:
            return None
        users = [content_text(m.get("content")) for m in messages if m.get("role") == "user"]
        if not users:
            return None
        text = "\n".join(users)
        last = users[-1].strip()
        hit = self._by_text.get(last)
        if hit is not None:
            return hit
        best: AnswerItem | None = None
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            for candidate_line in (line, _LABEL.sub("", line, count=1).strip()):
                for item in self._by_first_line.get(candidate_line, ()):
                    if item.question.strip() in text and (
                        best is None or len(item.question) > len(best.question)
                    ):
                        best = item
        if best is not None:
            return best
        return self._scan(text)

    def _scan(self, text: str) -> AnswerItem | None:
        if text in self._scan_cache:
            return self._scan_cache[text]
        best: AnswerItem | None = None
        for key, item in self._by_text.items():
            if (best is None or len(key) > len(best.question.strip())) and key in text:
                best = item
        if len(self._scan_cache) > 4096:
            self._scan_cache.clear()
        self._scan_cache[text] = best
        return best


def p_correct_at(p0: float, slope: float, temperature: float) -> float:
    """p(T) = clamp(p0 - slope·T, 0, 1)."""
    return min(1.0, max(0.0, p0 - slope * temperature))


def draw_answer(
    item: AnswerItem | None,
    *,
    canonical: str,
    sim_seed: int,
    choice: int,
    repeat: int,
    p: float,
) -> str:
    """The deterministic answer of one choice (see the module docstring)."""
    digest = hashlib.sha256(f"{sim_seed}|{choice}|{repeat}|{canonical}".encode()).digest()
    if item is None:
        return _filler(digest)
    if _unit(digest) < p:
        return item.correct
    if not item.wrong:
        # keep the rate of correct answers at p(T) even without listed wrong answers
        return _filler(digest)
    pick = int.from_bytes(digest[8:16], "big") % len(item.wrong)
    return item.wrong[pick]


def _filler(digest: bytes) -> str:
    subject = _FILLER_SUBJECTS[digest[0] % len(_FILLER_SUBJECTS)]
    verb = _FILLER_VERBS[digest[1] % len(_FILLER_VERBS)]
    obj = _FILLER_OBJECTS[digest[2] % len(_FILLER_OBJECTS)]
    return f"{subject} {verb} {obj} (ref {digest[3:7].hex()})."


def truncate(answer: str, max_tokens: int | None) -> tuple[str, int, str]:
    """Cut ``answer`` to ``max_tokens``; returns (text, completion tokens, finish_reason)."""
    tokens = text_tokens(answer)
    if max_tokens is None or tokens <= max_tokens:
        return answer, tokens, "stop"
    return answer[: max_tokens * CHARS_PER_TOKEN], max_tokens, "length"
