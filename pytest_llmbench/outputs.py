"""What a run leaves behind besides the terminal: the JSON report, the HTML report, the
baseline it is compared with, and the llmbench section of pytest-html's report.

Paths are checked at configure time (a directory that does not exist, a baseline that is
not a report, a missing extra), so that a paid run never ends in an error about its
output; the files are written once, at the end of the session, by the controller.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .errors import ConfigError
from .results import CaseResult


@dataclass(frozen=True)
class Baseline:
    """An earlier run's JSON report (``--llm-baseline``): its cases and how it was made."""

    path: Path
    given: str = ""  # as the user wrote it, for the report
    run: dict[str, Any] = field(default_factory=dict)
    cases: tuple[CaseResult, ...] = ()

    def describe(self) -> dict[str, Any]:
        """The report's ``baseline`` section, before the comparison's counts are added."""
        keys = ("model", "mode", "started_at", "origin")
        return {"path": self.given or str(self.path), **{k: self.run.get(k) for k in keys}}


def output_path(config: pytest.Config, given: Path | None, option: str) -> Path | None:
    """Where an output file goes; its directory must exist now, not after a paid run."""
    if given is None:
        return None
    path = config.invocation_params.dir / Path(given)
    if path.is_dir():
        raise pytest.UsageError(f"{option}: {given} is a directory; name a file")
    if not path.parent.is_dir():
        raise pytest.UsageError(f"{option}: directory {path.parent} does not exist")
    return path


def html_path(config: pytest.Config, given: Path | None) -> Path | None:
    """``--llm-html``'s path, refused at once when the ``html`` extra is missing."""
    path = output_path(config, given, "--llm-html")
    if path is not None:
        from .html_report import html_missing

        missing = html_missing()
        if missing is not None:
            raise pytest.UsageError(missing)
    return path


def load_baseline(config: pytest.Config, given: Path | None) -> Baseline | None:
    """Read ``--llm-baseline`` now: a file that is not a report is a usage error."""
    if given is None:
        return None
    from .report import validate_report

    path = config.invocation_params.dir / Path(given)
    where = f"--llm-baseline: {given}"
    data = read_json(path, where)
    problems = validate_report(data)
    if problems:
        raise pytest.UsageError(
            f"{where}: not a pytest-llmbench JSON report (--llm-report): {problems[0]}"
        )
    try:
        cases = tuple(CaseResult.from_dict(c) for c in data["cases"])
    except (TypeError, ValueError) as exc:
        raise pytest.UsageError(f"{where}: a case cannot be read: {exc}") from None
    return Baseline(path, str(given), dict(data.get("run") or {}), cases)


def read_json(path: Path, where: str) -> Any:
    """A JSON file given by an option; a usage error starting with ``where`` if it is not."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise pytest.UsageError(f"{where}: cannot read it: {exc.strerror}") from None
    except ValueError as exc:
        raise pytest.UsageError(f"{where}: not valid JSON: {exc}") from None


def write_outputs(report: dict[str, Any], json_path: Path | None, html_file: Path | None) -> None:
    """Write the JSON and HTML reports (a failure is a usage error naming the option)."""
    from .report import write_report

    try:
        if json_path is not None:
            write_report(json_path, report)
        if html_file is not None:
            from .html_report import write_html

            write_html(html_file, report)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_html_section(lines: Sequence[str]) -> str:
    """The llmbench summary as a block of pytest-html's report (escaped, preformatted)."""
    import html

    body = html.escape("\n".join(lines))
    return f'<div class="llmbench"><h2>llmbench summary</h2><pre>{body}</pre></div>'


__all__ = [
    "Baseline",
    "html_path",
    "load_baseline",
    "output_path",
    "pytest_html_section",
    "read_json",
    "write_outputs",
]
