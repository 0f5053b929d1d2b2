from __future__ import annotations

import math

import pytest

from pytest_llmbench.scoring import (
    check,
    contains,
    exact,
    extract_choice,
    extract_number,
    normalize,
    normalized_match,
    numbers_match,
    shorten,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The  Eiffel\tTower! ", "eiffel tower"),
        ("Paris.", "paris"),
        ('"An apple, a day"', "apple day"),
        ("3.14", "3.14"),
        ("U.S.", "u.s"),
        ("-5", "-5"),
        ("$12.50", "12.50"),
        ("50%", "50"),
        ("A", "a"),  # nothing but an article: kept
        ("The", "the"),
        ("¡Hola!", "hola"),
        ("\uff21\uff22\uff23", "abc"),  # NFKC folds full-width letters
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_exact() -> None:
    assert exact("Paris\n", "Paris")
    assert not exact("paris", "Paris")
    assert not exact("Paris.", "Paris")


def test_normalized_match() -> None:
    assert normalized_match("The Paris.", "paris")
    assert normalized_match("paris", ["Lyon", "Paris"])
    assert not normalized_match("Paris, France", "Paris")
    assert not normalized_match("-5", "5")
    with pytest.raises(ValueError, match="non-empty"):
        normalized_match("x", [])


def test_contains() -> None:
    assert contains("I think it is Paris, France.", "paris")
    assert contains("The answer: the Eiffel Tower.", "eiffel tower")
    assert contains("x", ["nope", "X"])
    assert not contains("1234", "23")  # whole words when normalising
    assert contains("1234", "23", normalize=False)
    assert not contains("Paris", "paris", normalize=False)


def test_contains_rejects_empty_expected() -> None:
    with pytest.raises(ValueError, match="empty"):
        contains("anything", "")
    with pytest.raises(ValueError, match="empty"):
        contains("anything", " ! ")
    with pytest.raises(ValueError, match="empty"):
        contains("anything", "", normalize=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("**C**", "C"),
        ("Answer: B", "B"),
        ("answer: (d)", "D"),
        ("The answer is b)", "B"),
        ("The correct answer is **C** because ...", "C"),
        ("Final Answer: D.", "D"),
        ("the correct option is (A)", "A"),
        ("The answer is option C", "C"),
        ("Option A looks plausible, but the answer is C. Option D is wrong.", "C"),
        ("Let's check. A is wrong. Answer: B\nSo the answer is D", "D"),
        ("the answer is a bit tricky, but I pick C", "C"),
        ("B. Paris", "B"),
        ("I pick (D) here", "D"),
        ("A good choice would be B", "B"),
        ("I think C is right", "C"),
        ("A is correct", "A"),
        ("Between A and B, A", "A"),
        ("No idea.", None),
        ("It's E", None),
        ("a reasonable guess", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text) == expected


def test_extract_choice_with_other_choices() -> None:
    assert extract_choice("The answer is J", "ABCDEFGHIJ") == "J"
    assert extract_choice("It's E", "ABCDE") == "E"
    assert extract_choice("answer: c", "abcd") == "c"  # spelled as in choices
    assert extract_choice("The answer is D", "ABC") is None
    with pytest.raises(ValueError):
        extract_choice("A", "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        ("The answer is 42.", 42.0),
        ("5 apples and 7 pears", 7.0),
        ("1,234", 1234.0),
        ("It costs $1,234,567.89 in total", 1234567.89),
        ("$12.50", 12.5),
        ("-3", -3.0),
        ("-$3", -3.0),
        ("$-3", -3.0),
        ("\u22127.5", -7.5),
        ("it went from 1990-2000", 2000.0),
        ("x-5", 5.0),
        ("45%", 45.0),
        (".5", 0.5),
        ("3.14 is pi", 3.14),
        ("1.5e3", 1500.0),
        ("#### 18", 18.0),
        ("gpt4", None),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_number(text: str, expected: float | None) -> None:
    assert extract_number(text) == expected


def test_numbers_match() -> None:
    assert numbers_match(1234, "1,234")
    assert numbers_match("The total is 1,234.", 1234.0)
    assert numbers_match(0.1 + 0.2, 0.3)
    assert not numbers_match("about 3", 3.1)
    assert numbers_match(100, 100.5, rel_tol=0.01)
    assert not numbers_match(1e-9, 0)
    assert numbers_match(1e-9, 0, abs_tol=1e-6)
    assert not numbers_match(None, 1)
    assert not numbers_match("none", "none")
    assert not numbers_match(math.nan, math.nan)


def test_shorten() -> None:
    assert shorten("abc", 3) == "abc"
    assert shorten("abcdef", 4) == "abc…"
    assert len(shorten("x" * 500, 200)) == 200
    with pytest.raises(ValueError):
        shorten("abc", 0)


def test_check_passes_silently() -> None:
    check(True, question="q", expected="a", answer="a")


def test_check_message_is_compact() -> None:
    with pytest.raises(AssertionError) as info:
        check(
            False,
            question="What is\nthe capital of France?",
            expected="Paris",
            answer="It is " + "very " * 100 + "much Lyon",
            max_len=40,
        )
    lines = str(info.value).splitlines()
    assert lines[0].startswith("expected Paris, got 'It is very very")
    assert lines[1] == "question: What is the capital of France?"
    assert lines[2].startswith("answer:   It is very very")
    assert lines[2].endswith("…") and len(lines[2]) == len("answer:   ") + 40
    assert len(lines) == 3


def test_check_shows_non_strings_and_empty_answers_with_repr() -> None:
    with pytest.raises(AssertionError) as info:
        check(False, question="q", expected=["A", 1], answer="")
    assert str(info.value).splitlines() == [
        "expected ['A', 1], got ''",
        "question: q",
        "answer:   ''",
    ]


def test_check_first_line_names_what_was_compared() -> None:
    with pytest.raises(AssertionError) as info:
        check(False, question="What is 65 + 63?", expected="128", answer="It is 256.", got=256.0)
    assert str(info.value).splitlines()[0] == "expected 128, got 256"
    with pytest.raises(AssertionError) as info:
        check(False, question="q", expected="128", answer="x", got="256")
    assert str(info.value).splitlines()[0] == "expected 128, got '256'"


def test_check_records_what_it_was_given_for_the_report() -> None:
    from pytest_llmbench.scoring import CHECKED

    sink: dict[str, object] = {}
    token = CHECKED.set(sink)
    try:
        check(True, question="q", expected="A", answer="The answer is A", got="A")
    finally:
        CHECKED.reset(token)
    assert sink == {"question": "q", "expected": "A", "answer": "The answer is A", "got": "A"}
