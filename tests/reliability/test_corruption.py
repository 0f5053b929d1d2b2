"""Corruption: the run directory's files damaged between two runs.

A truncated store, a zero-length store, a file that is not SQLite, a store of schema 1, a
torn budget record, a batch ledger naming a job the server does not know (and a store of
a newer version): each is found when the run starts, reported in one line that names the
file and what happens to it, migrated or set aside (renamed, never deleted), and the run
goes on (or, for the newer store, stops in one line). Every run is the real plugin
(pytester, ``--llm-sim`` over HTTP, ``-n 2`` where a report could be repeated per worker).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.budget.file import torn_record
from pytest_llmbench.store import STORE_FILENAME, ResponseStore

from ..helpers import answer_key
from ..test_first_use import V1_SCHEMA  # the schema-1 store of the previous version
from ..test_plugin import write_dataset
from .harness import FAST_BATCHES, QA_SUITE

N = 12  # cases per run: items x one temperature


@dataclass
class Tally:
    """What the scenarios added up to, for the battery's row."""

    cases: int = 0
    retries: int = 0
    lost: int = 0  # cases missing from a report, or a damaged file gone
    paid_twice: int = 0  # answers a readable store held, asked again
    unreadable: int = 0  # answers of an unreadable file, asked again (it is kept)
    faults: list[str] = field(default_factory=list)


class Bench:
    """A pytester project whose runs use the built-in simulator."""

    result: pytest.RunResult  # the last run's

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.path = pytester.path
        self.run_dir = pytester.path / ".llmbench"
        self.store = self.run_dir / STORE_FILENAME
        self.tally = Tally()
        self.key = answer_key(write_dataset(pytester.path / "data.jsonl", N))
        pytester.makepyfile(test_suite=QA_SUITE)
        pytester.makeini("[pytest]\n")
        self.sim_config = self.write_config("sim.json")

    def write_config(self, name: str, **settings: Any) -> str:
        """A simulator that knows every answer, with ``settings``."""
        path = self.path / name
        config = {"answer_key": self.key, "p_correct": 1.0, **settings}
        path.write_text(json.dumps(config), encoding="utf-8")
        return str(path)

    def run(self, *args: str) -> str:
        """Run the suite; its whole output (the result is ``self.result``)."""
        if not any(a.startswith("--llm-sim-config") for a in args):
            args = (f"--llm-sim-config={self.sim_config}", *args)
        self.result = self.pytester.runpytest(
            "--llm-sim", "-p", "no:cacheprovider", "--llm-report", "r.json", *args
        )
        text = self.result.stdout.str() + "\n" + self.result.stderr.str()
        assert "Traceback" not in text and "INTERNALERROR" not in text, text
        return text

    def report(self) -> dict[str, Any]:
        """The last run's JSON report (removed, so the next run's is not mistaken for it)."""
        path = self.path / "r.json"
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        path.unlink()
        return data

    def completed(self, fault: str) -> dict[str, Any]:
        """The last run's report: every case there and answered; added to the tally."""
        assert self.result.ret == 0
        report = self.report()
        totals = report["totals"]
        assert totals["passed"] == totals["cases"], totals
        self.tally.faults.append(fault)
        self.tally.cases += totals["cases"]
        self.tally.retries += totals["retries"]
        self.tally.lost += N - totals["cases"]
        return report

    def reset(self, template: Path | None) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if template is not None:
            shutil.copytree(template, self.run_dir)

    def set_aside(self) -> list[Path]:
        return sorted(self.run_dir.glob(f"{STORE_FILENAME}.unusable-*"))


def once(text: str, phrase: str) -> str:
    """The one line of ``text`` that holds ``phrase`` (it must not be repeated)."""
    lines = [line for line in text.splitlines() if phrase in line]
    assert len(lines) == 1, f"{phrase!r} in {len(lines)} lines:\n{text}"
    return lines[0]


def to_schema_1(store: Path) -> int:
    """Rewrite a current store as the previous version wrote it; returns its answers."""
    with ResponseStore(store, origin="simulator") as current:
        rows = list(current.get_many(current.keys()).values())
    for leftover in store.parent.glob(f"{STORE_FILENAME}*"):
        leftover.unlink()
    conn = sqlite3.connect(store)
    conn.executescript(V1_SCHEMA)
    for s in rows:
        # schema 1 kept the attempts in a fake header; the simulator's own header
        # (openai-organization: org-sim) tells the migration where the answer came from
        headers = {**s.headers, "x-llmbench-attempts": str(s.attempts)}
        texts = (json.dumps(s.request), json.dumps(s.response), json.dumps(headers))
        conn.execute(
            "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (s.key, s.nodeid, s.ordinal, s.endpoint, *texts, s.latency_s, s.source, None, 1.0),
        )
    conn.commit()
    conn.close()
    return len(rows)


def unreadable_store(bench: Bench, template: Path, name: str, damage: bytes) -> None:
    """A store damaged beyond reading: set aside whole, its answers asked again."""
    bench.reset(template)
    bench.store.write_bytes(damage)
    text = bench.run("-n", "2")  # two workers: the report must still be one line
    line = once(text, "set aside as")
    assert str(bench.store) in line and "not a usable response store" in line
    (aside,) = bench.set_aside()
    assert aside.name in line and aside.read_bytes() == damage  # renamed, never deleted
    totals = bench.completed(name)["totals"]
    assert totals["requests"] == N, totals  # nothing readable was left to replay
    bench.tally.unreadable += totals["requests"]


def readable_damage(bench: Bench, template: Path) -> None:
    """An empty store, a torn budget record and a schema-1 store lose no answer."""
    # a crash as the first run began: its store zero-length, its budget record torn
    bench.reset(None)
    bench.run_dir.mkdir()
    bench.store.write_bytes(b"")
    (record,) = template.glob("budget-*.json")
    budget = bench.run_dir / record.name
    whole = record.read_bytes()
    budget.write_bytes(whole[: len(whole.rstrip()) // 2].ljust(len(whole), b"\0"))
    text = bench.run()
    # each said once; the store made anew, the budget read as a full bucket
    assert "a new store was made" in once(text, str(bench.store))
    assert "torn rate budget record" in once(text, str(budget))
    assert not bench.set_aside()
    totals = bench.completed("0-byte store")["totals"]
    bench.tally.faults.append("torn budget record")
    assert totals["requests"] == N  # the store held no answer
    assert torn_record(budget) is None  # the reservations wrote a whole record again

    # a store of schema 1: migrated in place, every answer replayed
    bench.reset(template)
    answers = to_schema_1(bench.store)
    text = bench.run("-n", "2")
    line = once(text, "migrated from store schema 1 to 2")
    assert str(bench.store) in line and f"its {answers} answer(s) are kept" in line
    totals = bench.completed("schema-1 store")["totals"]
    assert totals["cached"] == answers == N
    bench.tally.paid_twice += totals["requests"]


def unknown_batch_job(bench: Bench) -> None:
    """The ledger names a job the server does not know (the simulator that had it is
    gone): reported once, its requests submitted again, nothing lost."""
    bench.reset(None)
    slow = bench.write_config("slow.json", batch_validating_seconds=30.0)
    text = bench.run("--batch-api", "--llm-batch-detach", f"--llm-sim-config={slow}")
    assert bench.result.ret == 0 and "submitted and running" in text, text
    (bench.path / "r.json").unlink(missing_ok=True)  # the detached run answered nothing
    fast = bench.write_config("fast.json", **FAST_BATCHES)
    text = bench.run("--batch-api", "--llm-batch-poll=0.05", f"--llm-sim-config={fast}")
    # once as it is found (the summary lists it again among the batch figures)
    assert "its requests are submitted again" in once(text, "is unknown to the API")
    report = bench.completed("unknown batch job")
    assert all(case["batch"] for case in report["cases"])  # from the job submitted again


def test_corruption(pytester: pytest.Pytester, survives: Callable[..., Any]) -> None:
    bench = Bench(pytester)

    # Given a run directory of a run that stored every answer
    bench.run()
    assert bench.report()["totals"]["requests"] == N
    template = pytester.path / "template"
    shutil.copytree(bench.run_dir, template)
    whole = (template / STORE_FILENAME).read_bytes()

    # When its files are damaged in each way before the next run, then that run reports
    # the damage once, keeps or migrates the file, and completes every case
    unreadable_store(bench, template, "truncated store", whole[: len(whole) // 2])
    unreadable_store(bench, template, "not SQLite", b"<html>502 Bad Gateway</html>\n" * 64)
    readable_damage(bench, template)
    unknown_batch_job(bench)

    # And a store of a newer version is refused in one line, left as it was
    bench.reset(template)
    conn = sqlite3.connect(bench.store)
    with conn:
        conn.execute("UPDATE meta SET value = '3' WHERE name = 'schema_version'")
    conn.close()
    newer = bench.store.read_bytes()
    text = bench.run()
    assert bench.result.ret == pytest.ExitCode.USAGE_ERROR
    assert "upgrade pytest-llmbench" in once(text, "written by a newer pytest-llmbench")
    assert bench.store.read_bytes() == newer and not bench.set_aside()

    tally = bench.tally
    survives(
        item="corruption",
        cases=tally.cases,
        faults=", ".join(tally.faults) + ", a newer store",
        retries=tally.retries,
        paid_twice=f"{tally.paid_twice} ({tally.unreadable} unreadable, asked again)",
        lost=tally.lost,
        outcome=(
            "each reported in one line naming the file; unreadable stores set aside "
            "(renamed), schema 1 migrated, the unknown job resubmitted, a newer store "
            "refused untouched"
        ),
    )
    assert tally.lost == 0 and tally.paid_twice == 0
