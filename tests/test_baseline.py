"""A run compared with a baseline report, samples and temperatures, the pytest-html section.

Every run is a real pytest session (pytester, in a subprocess) against the built-in
simulator. The simulator's answers depend only on the request and its seed, so lowering
its ``p_correct`` turns some right answers wrong and none wrong ones right: a run at 0.6
after one at 0.9 is a real regression, one at 0.88 a move within noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.report import validate_report

N_ITEMS = 200

SUITE = f"""
import pytest
from pytest_llmbench import check

ITEMS = [{{"qid": f"q{{i:03d}}", "question": f"Question number {{i}}?", "answer": f"A{{i}}"}}
         for i in range({N_ITEMS})]

@pytest.mark.llmbench(dataset=ITEMS, temperatures=[0.0], id="qid")
def test_q(case, llm):
    r = llm.generate_response(case["question"], max_tokens=5)
    check(r.text == case["answer"], question=case["question"], expected=case["answer"],
          answer=r.text)
"""


def sim_config(path: Path, p_correct: float) -> Path:
    key = [
        {"question": f"Question number {i}?", "correct": f"A{i}", "wrong": [f"B{i}"]}
        for i in range(N_ITEMS)
    ]
    path.write_text(
        json.dumps({"answer_key": key, "p_correct": p_correct, "temperature_slope": 0.0}),
        encoding="utf-8",
    )
    return path


def run(pytester: pytest.Pytester, name: str, p_correct: float, *args: str) -> Any:
    config = sim_config(pytester.path / f"sim-{name}.json", p_correct)
    return pytester.runpytest_subprocess(
        "--llm-sim",
        f"--llm-sim-config={config}",
        f"--llm-run-dir=runs/{name}",  # each run asks afresh: nothing replayed
        f"--llm-report={name}.json",
        "-p",
        "no:cacheprovider",
        "-rN",
        *args,
    )


def report(pytester: pytest.Pytester, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pytester.path / f"{name}.json").read_text("utf-8"))
    assert validate_report(data) == []
    return data


def test_a_delta_gate_fails_a_real_drop_and_passes_noise(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    base = run(pytester, "base", 0.9)
    assert base.ret == 1  # some answers are wrong; no gates: pytest's rule
    gate = "test_q:delta_ci_low>=-0.05"

    # a drop of ~30 points: beyond any noise, the gate fails the run
    drop = run(pytester, "drop", 0.6, "--llm-baseline=base.json", f"--llm-gate={gate}")
    assert drop.ret == 1, drop.stdout.str()[-2000:]
    drop.stdout.fnmatch_lines(
        ["*FAIL test_q:delta_ci_low>=-0.05 — measured -0.*over 200 shared items*"]
    )
    drop.stdout.fnmatch_lines(["*llmbench vs baseline: test_q@0:*"])
    row = report(pytester, "drop")["suites"][0]["baseline"]
    assert row["items"] == N_ITEMS and row["delta"] < -0.2
    assert row["wrong_to_right_items"] == []  # a lower p never makes a wrong answer right
    assert len(row["right_to_wrong_items"]) == round(-row["delta"] * N_ITEMS)

    # a move of ~2 points: within the interval, the gate holds and decides the exit status
    noise = run(pytester, "noise", 0.88, "--llm-baseline=base.json", f"--llm-gate={gate}")
    assert noise.ret == 0, noise.stdout.str()[-2000:]
    noise.stdout.fnmatch_lines(["*PASS test_q:delta_ci_low>=-0.05 — measured -0.0*"])
    data = report(pytester, "noise")
    row = data["suites"][0]["baseline"]
    assert -0.05 < row["delta"] < 0 and row["delta_ci_low"] < row["delta"] < row["delta_ci_high"]
    assert data["baseline"]["path"] == "base.json"
    assert data["baseline"]["shared_items"] == N_ITEMS


def test_new_and_missing_items_are_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    assert run(pytester, "base", 0.9, "--llm-limit=150").ret == 1
    # this run has items 100..199 (a seeded sample would do as well): 50 new, 100 missing
    pytester.makepyfile(test_suite=SUITE.replace("range(200)", "range(100, 200)"))
    result = run(pytester, "next", 0.9, "--llm-baseline=base.json")
    row = report(pytester, "next")["suites"][0]["baseline"]
    assert row["items"] == 50
    assert len(row["new_items"]) == 50 and len(row["missing_items"]) == 100
    assert row["delta"] == 0  # the same answers on the shared items
    result.stdout.fnmatch_lines(["*llmbench vs baseline*"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "*--llm-baseline: bad.json: not valid JSON*"),
        ('{"schema": "other"}', "*--llm-baseline: bad.json: not a pytest-llmbench JSON report*"),
    ],
)
def test_a_baseline_that_is_not_a_report_is_a_usage_error(
    pytester: pytest.Pytester, content: str, message: str
) -> None:
    pytester.makepyfile(test_suite=SUITE)
    (pytester.path / "bad.json").write_text(content, encoding="utf-8")
    result = pytester.runpytest_subprocess("--llm-sim", "--llm-baseline=bad.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert not (pytester.path / ".llmbench").exists()  # nothing was asked


def test_a_delta_gate_needs_a_baseline(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("--llm-sim", "--llm-gate=test_q:delta>=-0.02")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*a delta gate compares with a baseline: add --llm-baseline*"])


SAMPLED = """
import pytest
from pytest_llmbench import check

ITEMS = [{"qid": f"q{i}", "question": f"Question number {i}?", "answer": f"A{i}"}
         for i in range(20)]

@pytest.mark.llmbench(dataset=ITEMS, temperatures=[0.0, 1.0], samples=3, id="qid")
def test_s(case, llm):
    r = llm.generate_response(case["question"], max_tokens=5)
    check(r.text == case["answer"], question=case["question"], expected=case["answer"],
          answer=r.text)
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_samples_and_temperatures_reach_summary_and_report(
    pytester: pytest.Pytester, workers: str
) -> None:
    pytester.makepyfile(test_suite=SAMPLED)
    key = [
        {"question": f"Question number {i}?", "correct": f"A{i}", "wrong": [f"B{i}", f"C{i}"]}
        for i in range(20)
    ]
    (pytester.path / "sim.json").write_text(
        json.dumps({"answer_key": key, "p_correct": 0.9, "temperature_slope": 0.4}), "utf-8"
    )
    result = pytester.runpytest_subprocess(
        "--llm-sim", "--llm-sim-config=sim.json", "--llm-report=r.json", "-n", workers, "-rN"
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "*llmbench consistency: test_s@0: maj@3 *agreement 1.00*",
            "*llmbench consistency: test_s@1: maj@3 *",
            "*llmbench flips vs T=0: test_s@1: * right->wrong, * wrong->right of 20 (McNemar p=*",
        ]
    )
    data = json.loads((pytester.path / "r.json").read_text("utf-8"))
    assert validate_report(data) == []
    cold, hot = data["suites"]
    # at T=0 the simulator repeats itself: three samples, one answer
    assert cold["consistency"]["agreement"] == 1.0 and cold["consistency"]["entropy"] == 0
    assert cold["consistency"]["inconsistent_items"] == []
    assert cold["flips"] is None and hot["flips"]["against"] == 0.0
    assert hot["consistency"]["samples"] == 3 and set(hot["consistency"]["pass_at_k"]) == {
        "1",
        "2",
        "3",
    }
    # pass@1 is the mean per-item share of right samples: the row's accuracy here
    assert hot["consistency"]["pass_at_k"]["1"] == pytest.approx(hot["accuracy"])
    answers = {c["answer"] for c in data["cases"]}
    assert answers <= {f"{x}{i}".lower() for x in "ABC" for i in range(20)}


def test_pytest_html_report_gets_the_llmbench_summary(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pytest_html")
    monkeypatch.delenv("PYTEST_ADDOPTS")  # pytest-html and pytest-metadata on again
    pytester.makepyfile(test_suite=SAMPLED)
    result = pytester.runpytest_subprocess("--llm-sim", "--html=ph.html", "-rN")
    assert result.ret == 1
    page = (pytester.path / "ph.html").read_text("utf-8")
    assert "llmbench summary" in page and "test_s" in page
    assert "llmbench answers from the built-in simulator" in page
