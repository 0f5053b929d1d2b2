"""A subprocess that exercises a shared budget, driven by ``test_budget.py``.

    python tests/budget_worker.py MODE BUDGET KEY [options]

BUDGET is ``file:<run_dir>`` or a ``redis://`` URL. The worker prints ``ready`` once
imported, waits for a line on stdin (the start barrier), runs MODE and prints one JSON
line with its results. Modes:

* ``hammer``: acquire in a loop for ``--duration`` s, recording the wall-clock time at
  which each acquisition was admitted (after its wait); optionally ``correct``.
* ``spin``: reserve as fast as possible forever (to be SIGKILLed mid-operation).
* ``reserve``: reserve ``--count`` times without waiting, print ``reserved``, sleep.
* ``hold``: take the file budget's lock, print ``locked``, sleep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "pytest_llmbench" not in sys.modules:
    # Load only the budget subpackage: the package __init__ imports openai and the whole
    # client (about 1 s per process), which would dominate a 3 s test on a small CI box.
    pkg = types.ModuleType("pytest_llmbench")
    pkg.__path__ = [str(ROOT / "pytest_llmbench")]
    sys.modules["pytest_llmbench"] = pkg

from filelock import FileLock  # noqa: E402

from pytest_llmbench.budget import FileBudget, open_budget  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["hammer", "spin", "reserve", "hold"])
    p.add_argument("budget")
    p.add_argument("key")
    p.add_argument("--rpm", type=int)
    p.add_argument("--tpm", type=int)
    p.add_argument("--burst", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--correct-to", type=int)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--count", type=int, default=1)
    args = p.parse_args(argv)

    if args.budget.startswith("file:"):
        url, run_dir = None, Path(args.budget[5:])
    else:
        url, run_dir = args.budget, Path(".")
    budget = open_budget(
        url, run_dir=run_dir, key=args.key, rpm=args.rpm, tpm=args.tpm, burst_seconds=args.burst
    )
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()
    result: dict[str, object] = {}
    try:
        if args.mode == "hammer":
            deadline = time.time() + args.duration
            admitted: list[float] = []
            ops = 0
            while time.time() < deadline:
                budget.acquire(args.tokens)
                ops += 1
                t = time.time()
                if args.correct_to is not None:
                    budget.correct(args.tokens, args.correct_to)
                    ops += 1
                if t < deadline:
                    admitted.append(t)
            result = {"admitted": admitted, "ops": ops, "started": started}
        elif args.mode == "spin":
            while True:
                budget.reserve(args.tokens)
        elif args.mode == "reserve":
            waits = [budget.reserve(args.tokens) for _ in range(args.count)]
            print(json.dumps({"reserved": waits}), flush=True)
            time.sleep(60)
        elif args.mode == "hold":
            assert isinstance(budget, FileBudget)
            with FileLock(budget.lock_path):
                print("locked", flush=True)
                time.sleep(60)
    finally:
        budget.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
