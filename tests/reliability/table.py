"""The README's "What it survives" table from the battery's last run.

    pytest tests/reliability && python tests/reliability/table.py

reads ``.pytest_cache/llmbench-reliability.json`` (written by the battery's conftest at the
end of the session) and prints the rows as a Markdown table, figures as the run printed them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("item", "cases", "faults injected", "retries", "paid twice", "lost", "outcome")
SOURCE = Path(__file__).resolve().parents[2] / ".pytest_cache" / "llmbench-reliability.json"


def markdown(rows: list[dict[str, object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    if not SOURCE.exists():
        print(f"{SOURCE}: no battery results yet; run: pytest tests/reliability", file=sys.stderr)
        return 1
    print(markdown(json.loads(SOURCE.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
