"""README.md stays true: its option table is the one the code generates."""

from __future__ import annotations

from pathlib import Path

from pytest_llmbench.config import option_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_option_table_is_generated_from_the_options() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- options-table")
    end = text.index("<!-- /options-table -->")
    table = text[start:end].split("\n", 1)[1].strip()
    assert table == option_reference().strip()


def test_quick_start_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "pip install -e . && pytest -n 8 example_suites --llm-sim" in text
    assert 'pip install -e ".[test]" && pytest' in text
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -e ".[test]" && pytest' in ci
