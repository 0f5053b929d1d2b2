"""Disk full: the run directory on a tiny filesystem that fills up half-way through a run.

The test mounts a tmpfs of a few hundred kilobytes (it needs root, or CAP_SYS_ADMIN, on
Linux; elsewhere it is skipped, saying why), points ``--llm-run-dir`` at it and runs a
suite whose answers do not fit. The run must stop in one line that says why, with every
answer it stored still there and readable; once there is room, the same command finishes
the suite without asking for any stored answer again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.errors import FATAL_EXIT_STATUS
from pytest_llmbench.sim import SimConfig, Simulator
from pytest_llmbench.sim.answers import body_hash
from pytest_llmbench.store import STORE_FILENAME, ResponseStore

from ..helpers import FAKE_KEY, answer_key
from .harness import QA_SUITE

N = 200  # cases; each answer takes a few kilobytes of the store (and more of its WAL)
SIZE = "512k"  # the filesystem: room for some answers, not for all of them


def _mount(point: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``point``; None, or why it cannot be done here."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return "mounting a tmpfs needs Linux and mount(8)"
    point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"this machine forbids mounting a tmpfs ({done.stderr.strip() or 'mount failed'})"
    return None


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Callable[[str], None]]:
    """A tmpfs of ``SIZE`` mounted for the test (skipped where that is forbidden); the
    fixture's value resizes it. Unmounted at the end however the test ends."""
    point = tmp_path / "tiny"
    why = _mount(point, SIZE)
    if why is not None:
        pytest.skip(f"disk full needs a tiny filesystem: {why}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)

    try:
        yield resize
    finally:
        if subprocess.run(["umount", str(point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=False)  # busy: detach it


def stored_answers(run_dir: Path, origin: str) -> dict[str, str]:
    """The store's answers, each key with the sim's hash of its request body; every one
    read back whole, and the file intact."""
    with ResponseStore(run_dir / STORE_FILENAME, origin=origin) as store:
        keys = store.keys()
        found = store.get_many(keys)
        assert sorted(found) == sorted(keys)  # none unreadable
        check = store._conn().execute("PRAGMA integrity_check").fetchone()[0]
        assert check == "ok", check
        return {key: body_hash(s.request) for key, s in found.items()}


def stopped_full(result: pytest.RunResult, run_dir: Path) -> None:
    """The run stopped (exit status 6) in one line naming the store and the full disk."""
    text = result.stdout.str() + "\n" + result.stderr.str()
    assert result.ret == FATAL_EXIT_STATUS, text
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    (stop,) = [line for line in text.splitlines() if "stored answers are kept" in line]
    assert "database or disk is full" in stop and str(run_dir) in stop, stop


def test_disk_full(
    pytester: pytest.Pytester,
    tiny_fs: Callable[[str], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    survives: Callable[..., Any],
) -> None:
    # Given a suite whose answers do not fit on the run directory's filesystem
    rows = [
        {"qid": f"q{i:03d}", "question": f"Item {i}: " + "a long question " * 60, "answer": f"A{i}"}
        for i in range(N)
    ]
    (pytester.path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pytester.makepyfile(test_suite=QA_SUITE)
    pytester.makeini("[pytest]\n")
    run_dir = tmp_path / "tiny" / "run"
    config = SimConfig(answer_key=answer_key(rows), p_correct=1.0, seed=5)
    with Simulator(config, port=0) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
        origin = sim.base_url
        args = ["-n", "2", f"--llm-base-url={origin}", f"--llm-run-dir={run_dir}"]

        # When it runs with two workers and the disk fills up
        full = pytester.runpytest(*args)

        # Then it stops in one line that says why, without a traceback, and every
        # answer it stored is there, readable, in an intact file
        stopped_full(full, run_dir)
        kept = stored_answers(run_dir, origin)
        assert 0 < len(kept) < N and len(kept) <= sim.stats()["chat_answered"]

        # When the same command runs live (no prefetch) on the still full disk, each
        # worker's first answer finds no room: it stops the same way, losing nothing
        stopped_full(pytester.runpytest(*args, "--llm-no-prefetch"), run_dir)
        assert stored_answers(run_dir, origin) == kept
        answered = sim.stats()["chat_answered"]

        # When there is room again and the same command runs
        tiny_fs("64m")
        again = pytester.runpytest(*args, "--llm-report", "r.json")

        # Then the suite completes, and no stored answer was asked for again
        totals = json.loads((pytester.path / "r.json").read_text())["totals"]
        assert again.ret == 0 and totals["cases"] == totals["passed"] == N, totals
        assert totals["cached"] == len(kept), totals
        # (the simulator counts, across both runs, every body it answered more than once)
        stats = sim.stats()
        assert stats["chat_answered"] - answered == N - len(kept)
        paid_twice = len(set(kept.values()) & set(stats["duplicate_body_hashes"]))
        after_full = answered - len(kept)  # answered once the disk was full: not kept
        assert stats["duplicate_bodies"] == after_full
    survives(
        item="disk full",
        cases=N,
        faults=f"tmpfs of {SIZE}: full after {len(kept)} answers, then a live run on it",
        retries=totals["retries"],
        paid_twice=paid_twice,
        lost=N - totals["cases"] + len(set(kept) - set(stored_answers(run_dir, origin))),
        outcome=(
            f"both runs stopped in one line (exit {full.ret}), the {len(kept)} stored answers "
            f"intact; {after_full} answered with no room left were asked again once there was"
        ),
    )
    assert paid_twice == 0
