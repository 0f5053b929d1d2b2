"""Grading helpers for benchmark tests: normalisation, matching, answer extraction.

Pure functions, no state. The extractors are heuristics tuned for the usual shapes of
model answers; each documents what it accepts, and tests pin the behaviour.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

__all__ = [
    "CHECKED",
    "check",
    "contains",
    "display",
    "exact",
    "extract_choice",
    "extract_number",
    "graded_fields",
    "normalize",
    "normalized_match",
    "numbers_match",
    "shorten",
]

_ARTICLES = frozenset({"a", "an", "the"})
# A leading sign that belongs to a number ("-5") is kept, so that "-5" and "5" differ.
_LEADING_PUNCT = re.compile(r"^(?:(?![-+\u2212]\d)[\W_])+")
_TRAILING_PUNCT = re.compile(r"[\W_]+$")
_ANSWER_WORDS = (
    r"\b(?:answer|correct\s+(?:option|choice))\b"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?"
    r"\s*[:=]?\s*(?:\b(?:option|choice|letter)\b)?[\s(\[*]*"
)
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-+\u2212])?\$?(?P<sign2>[-\u2212])?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<exp>[eE][-+]?\d+)?"
)


def normalize(text: str) -> str:
    """Normalise an answer for comparison, in the spirit of SQuAD's ``normalize_answer``.

    Lowercases (after NFKC), splits on whitespace, strips punctuation and symbols from
    both ends of every word (keeping a number's sign), and drops the articles a, an, the
    (unless nothing else is left, so that a bare "A" still means something). Punctuation
    inside a word stays: "3.14" and "U.S." keep their dots.

    >>> normalize("  The  Eiffel Tower! ")
    'eiffel tower'
    """
    words = []
    for token in unicodedata.normalize("NFKC", text).lower().split():
        word = _TRAILING_PUNCT.sub("", _LEADING_PUNCT.sub("", token))
        if word:
            words.append(word)
    content = [word for word in words if word not in _ARTICLES]
    return " ".join(content or words)


def _alternatives(expected: str | Iterable[str]) -> list[str]:
    alternatives = [expected] if isinstance(expected, str) else list(expected)
    if not alternatives:
        raise ValueError("expected must be a string or a non-empty list of strings")
    return alternatives


def exact(answer: str, expected: str) -> bool:
    """True when the answer equals ``expected`` apart from surrounding whitespace.

    >>> exact("Paris\\n", "Paris"), exact("paris", "Paris")
    (True, False)
    """
    return answer.strip() == expected.strip()


def normalized_match(answer: str, expected: str | Iterable[str]) -> bool:
    """True when ``normalize(answer)`` equals the normalised expected answer, or any of them.

    >>> normalized_match("The Paris.", ["paris", "Paris, France"])
    True
    """
    got = normalize(answer)
    return any(got == normalize(alternative) for alternative in _alternatives(expected))


def contains(answer: str, expected: str | Iterable[str], *, normalize: bool = True) -> bool:
    """True when the answer contains ``expected`` (or any of several).

    With ``normalize`` (the default) both sides are normalised and the match must cover
    whole words, so "12" is not found in "123". Without it, a plain substring test. An
    empty expected string raises ValueError: it would match every answer.

    >>> contains("I think it is Paris, France.", "paris"), contains("1234", "23")
    (True, False)
    """
    got = _normalize_text(answer) if normalize else answer
    for alternative in _alternatives(expected):
        want = _normalize_text(alternative) if normalize else alternative
        if not want:
            raise ValueError(f"expected {alternative!r} is empty and would match any answer")
        if (f" {want} " in f" {got} ") if normalize else (want in got):
            return True
    return False


_normalize_text = normalize  # contains() has a parameter that shadows the name


def extract_choice(text: str, choices: str = "ABCD") -> str | None:
    """The multiple-choice letter the model chose, or None.

    In order of trust: a reply that is only the letter ("b", "(B)", "**C.**"); the last
    answer statement ("Answer: B", "The answer is b)", "correct option is (C)"); the first
    standalone capital choice letter ("B. Paris", "I pick (D)"), skipping "A" and "I" when
    they read as a word ("A good option ...", "I think ..."). Returns the letter as spelled
    in ``choices``.

    >>> extract_choice("After some thought, the answer is (c)."), extract_choice("No idea.")
    ('C', None)
    """
    if not choices:
        raise ValueError("choices must not be empty")
    letters = choices.upper()
    letter = f"[{re.escape(letters)}]"

    def spelled(found: str) -> str:
        return choices[letters.index(found.upper())]

    bare = re.fullmatch(rf"[\W_]*({letter})[\W_]*", text.strip(), re.IGNORECASE)
    if bare:
        return spelled(bare.group(1))

    stated = None
    for match in re.finditer(rf"{_ANSWER_WORDS}({letter})(?![\w'])", text, re.IGNORECASE):
        found = match.group(1)
        # A lowercase letter followed by a word is the article: "the answer is a bit odd".
        if found.islower() and re.match(r"\s+[A-Za-z]", text[match.end() :]):
            continue
        stated = found
    if stated is not None:
        return spelled(stated)

    for match in re.finditer(rf"(?<![\w'])({letter})(?![\w'])", text):
        found, after = match.group(1), text[match.end() :]
        if (
            found in "AI"
            and re.match(r"\s+[a-z]", after)
            and not re.match(r"\s+(?:is|and|or)\b", after)
        ):
            continue
        return spelled(found)
    return None


def extract_number(text: str) -> float | None:
    """The last number in the text, or None.

    Handles thousands separators ("1,234"), signs (including U+2212), decimals, exponents,
    currency ("$12.50", "-$3") and percentages ("45%" gives 45.0). Digits glued to a
    preceding letter ("gpt4") do not count.

    >>> extract_number("5 apples cost $1,234.50 in total."), extract_number("none")
    (1234.5, None)
    """
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    value = float(last.group("num").replace(",", "") + (last.group("exp") or ""))
    negative = (last.group("sign") or last.group("sign2") or "+") in "-\u2212"
    return -value if negative else value


def numbers_match(
    a: float | str | None, b: float | str | None, rel_tol: float = 1e-6, *, abs_tol: float = 0.0
) -> bool:
    """True when two numbers agree within ``rel_tol`` (and ``abs_tol``, for values near 0).

    Strings go through :func:`extract_number` first, so a whole answer can be passed.
    None, unparseable strings and NaN never match.

    >>> numbers_match("The total is 1,234.", 1234), numbers_match("about 3", 3.1)
    (True, False)
    """
    x = extract_number(a) if isinstance(a, str) else a
    y = extract_number(b) if isinstance(b, str) else b
    if x is None or y is None:
        return False
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol)


def shorten(text: str, max_len: int) -> str:
    """``text`` cut to at most ``max_len`` characters, ending in "…" when cut.

    >>> shorten("abcdef", 4)
    'abc…'
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return text if len(text) <= max_len else text[: max_len - 1] + "…"


#: Where ``check`` leaves what it was given for the running test case: the plugin sets a
#: fresh dict around each test call and reads it afterwards (for the report's per-item
#: answers and the consistency figures). Outside a pytest-llmbench run it stays None.
CHECKED: ContextVar[dict[str, Any] | None] = ContextVar("llmbench_checked", default=None)
_NO_GOT: Any = object()


def check(
    condition: bool,
    *,
    question: str,
    expected: object,
    answer: str,
    got: object = _NO_GOT,
    max_len: int = 200,
) -> None:
    """Fail the test with a compact report when ``condition`` is false.

    ``got`` is what was compared with ``expected`` (the extracted letter or number); it
    defaults to ``answer``. The AssertionError reads::

        expected 'Paris', got 'Lyon'
        question: What is the capital of France?
        answer:   The capital is Lyon.

    so that pytest's short test summary (which shows the first line) says what went wrong.
    Each value is put on one line (whitespace runs collapsed) and shortened to ``max_len``
    (the first line's values to 60 characters); non-string values are shown with
    ``repr()``, a float that is a whole number as an integer (``128``, not ``128.0``).

    In a pytest-llmbench run ``check`` also records the question, the expected answer and
    ``got`` for the case: the report shows them, and the consistency figures compare the
    ``got`` values of a suite's samples (normalised as the suite says).
    """
    __tracebackhide__ = True
    compared = answer if got is _NO_GOT else got
    sink = CHECKED.get()
    if sink is not None:
        sink.update(question=question, expected=expected, answer=answer, got=compared)
    if condition:
        return

    def one_line(value: object, limit: int) -> str:
        text = value if isinstance(value, str) else display(value)
        flat = " ".join(text.split())
        return shorten(flat, limit) if flat else repr(text)

    head = min(max_len, 60)
    if isinstance(compared, str):
        shown = repr(shorten(" ".join(compared.split()), head) if compared.strip() else compared)
    else:
        shown = one_line(compared, head)
    raise AssertionError(
        f"expected {one_line(expected, head)}, got {shown}\n"
        f"question: {one_line(question, max_len)}\n"
        f"answer:   {one_line(answer, max_len)}"
    )


def display(value: object) -> str:
    """``value`` as text for a report: strings as they are, whole floats as integers
    (``128.0`` -> ``128``), None as an empty string, anything else with ``repr()``.

    >>> display(128.0), display("B"), display(["A", 1])
    ('128', 'B', "['A', 1]")
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


#: dataset fields read for the report when a test does not call ``check``
QUESTION_FIELDS = ("question", "prompt", "input", "problem")
EXPECTED_FIELDS = ("answer", "expected", "target", "label")
#: the report keeps this much of a question or expected answer
REPORT_TEXT_LEN = 2000


def graded_fields(
    checked: dict[str, Any] | None,
    data: dict[str, Any] | None,
    response: str | None,
    normalizer: Any = None,
) -> tuple[str | None, str | None, str | None]:
    """(question, expected, normalised answer) of one case, for the report.

    From what ``check`` recorded, else from the dataset item's usual fields and the last
    response. The answer is ``normalizer(got)`` (the suite's ``normalize=``; default
    :func:`normalize`); None when there is no answer or the normalizer returns None.
    """
    checked = checked or {}
    data = data or {}

    def first(keys: tuple[str, ...]) -> Any:
        return next((data[k] for k in keys if data.get(k) is not None), None)

    question = checked.get("question", first(QUESTION_FIELDS))
    expected = checked.get("expected", first(EXPECTED_FIELDS))
    got = checked.get("got", response)
    answer: str | None = None
    if got is not None:
        value = (normalizer or normalize)(got if normalizer else display(got))
        answer = None if value is None else display(value)
    return (
        None if question is None else shorten(display(question), REPORT_TEXT_LEN),
        None if expected is None else shorten(display(expected), REPORT_TEXT_LEN),
        None if answer is None else shorten(answer, REPORT_TEXT_LEN),
    )
