"""The reliability battery: what the plugin survives, each item with its figures.

Run it alone with ``pytest tests/reliability`` (a plain ``pytest`` skips the directory: it
is listed in ``norecursedirs``, and ``.ci/run`` runs it once, on the newest Python). Every
test runs the real plugin (pytester or subprocess runs, the simulator over HTTP) and records
one row of the "What it survives" table through the :func:`survives` fixture. The rows
travel from xdist workers to the controller as user properties, and the controller prints
the table at the end of the session and writes it as JSON next to the rootdir's cache
(``.pytest_cache/llmbench-reliability.json``), which ``tests/reliability/table.py`` turns
into the README's Markdown table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

PROPERTY = "llmbench_survives"
COLUMNS = ("item", "cases", "faults injected", "retries", "paid twice", "lost", "outcome")
_ROWS = pytest.StashKey[list[dict[str, Any]]]()


@dataclass
class Row:
    """One item of the battery. ``faults``: what was injected, with counts (``"50 5xx, 20
    drops"``); ``paid_twice``: answers requested again although stored; ``lost``: cases or
    stored answers missing at the end; ``outcome``: one short sentence of what happened."""

    item: str
    cases: int | str
    faults: str
    retries: int | str
    paid_twice: int | str
    lost: int | str
    outcome: str

    def cells(self) -> list[str]:
        return [str(v) for v in asdict(self).values()]


@pytest.fixture
def survives(request: pytest.FixtureRequest) -> Callable[..., Row]:
    """``survives(item=..., cases=..., faults=..., retries=..., paid_twice=..., lost=...,
    outcome=...)`` records this test's row (print it too: ``-s`` shows it as it happens)."""

    def record(**fields: Any) -> Row:
        row = Row(**fields)
        request.node.user_properties.append((PROPERTY, json.dumps(asdict(row))))
        print("llmbench reliability:", " | ".join(row.cells()))
        return row

    return record


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ROWS] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for name, value in report.user_properties:
        if name == PROPERTY:
            _rows_of(report).append(json.loads(str(value)))


_CONFIG: list[pytest.Config] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG[:] = [session.config]


def _rows_of(report: pytest.TestReport) -> list[dict[str, Any]]:
    return _CONFIG[0].stash[_ROWS] if _CONFIG else []


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    cells = [list(COLUMNS)] + [[str(v) for v in r.values()] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = sorted(config.stash.get(_ROWS, []), key=lambda r: str(r["item"]))
    if not rows or hasattr(config, "workerinput"):
        return
    terminalreporter.section("llmbench: what it survives")
    for line in format_table(rows):
        terminalreporter.write_line(line)
    out = Path(str(config.rootpath)) / ".pytest_cache" / "llmbench-reliability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
