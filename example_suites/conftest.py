"""Teaches the built-in simulator (``--llm-sim``) the answers of these example suites.

A real API needs none of this: the hook only runs with ``--llm-sim``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def pytest_llmbench_sim_config(config: Any) -> dict[str, Any]:
    key: list[dict[str, Any]] = []
    for line in (HERE / "data" / "truthfulqa_mc.jsonl").read_text().splitlines():
        row = json.loads(line)
        wrong = [c for c in "ABCD" if c != row["answer"]]
        key.append({"question": row["question"], "correct": row["answer"], "wrong": wrong})
    with (HERE / "data" / "arithmetic.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            n = int(row["answer"])
            key.append(
                {
                    "question": row["question"],
                    "correct": str(n),
                    "wrong": [str(n + 1), str(n - 10), str(n * 2)],
                }
            )
    # a realistic small account: 600 requests and 200k tokens per minute, ~0.3 s latency
    return {
        "answer_key": key,
        "rpm": 600,
        "tpm": 200_000,
        "latency": {"kind": "lognormal", "mean": 0.3, "sigma": 0.5},
    }
