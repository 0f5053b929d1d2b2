"""``--batch-api``: the per-line retry verdict, collecting, the rounds and the statistics
as units; then end to end: plan, one job, poll, collect, replay, resume.

The unit tests at the top call the pure parts of the batch modules directly and run in
milliseconds; each row of a table is one rule. Every end-to-end test runs a small
generated suite with pytest (``pytester``) against a simulator started in this process
over real HTTP (``--llm-base-url`` and a fake key), so the test can read the simulator's
counters (``batches_created``, ``files_uploaded``, ``chat_requests``) and the Batch API
objects it holds, and keep one simulator alive across several pytest runs (resume,
timeout, detach). Batch phases are made tiny; where a test needs a job to take a while,
it slows ``batch_requests_per_second`` and waits on an observable condition with a
deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest

from pytest_llmbench.batch import JOBS_STATE, TokenLimits
from pytest_llmbench.batch_collect import (
    RESUBMIT,
    JobLines,
    Verdict,
    line_verdict,
    read_errors,
    read_output,
    settle_unseen,
)
from pytest_llmbench.batch_rounds import BatchStats, FetchLog, Rounds
from pytest_llmbench.plan import PlannedRequest
from pytest_llmbench.sim import SimConfig, Simulator
from pytest_llmbench.store import ResponseStore, request_key

from .helpers import FAKE_KEY, wait_for

ENDPOINT = "/v1/chat/completions"
FAST = {
    "batch_validating_seconds": 0.05,
    "batch_finalizing_seconds": 0.05,
    "batch_requests_per_second": None,
}
POLL = ("--llm-batch-poll", "0.05")


def items(n: int) -> list[dict[str, str]]:
    """Questions with pairwise distinct answers, so a mix-up of lines cannot pass."""
    return [
        {"id": f"q{i}", "question": f"What is secret word number {i}?", "answer": f"word{i}x"}
        for i in range(n)
    ]


def answer_key(n: int, p_dependent: bool = False) -> list[dict[str, Any]]:
    key: list[dict[str, Any]] = [
        {"question": it["question"], "correct": it["answer"], "wrong": ["nope"]} for it in items(n)
    ]
    if p_dependent:
        key += [
            {"question": f"Spell backwards: {it['answer']}", "correct": it["answer"][::-1]}
            for it in items(n)
        ]
    return key


SUITE = """
import pytest
from pytest_llmbench import check

DATA = {data}

@pytest.mark.llmbench(dataset=DATA, temperatures={temperatures}, id="id")
def test_q(case, llm):
    r = llm.generate_response(case["question"], max_tokens=5)
    check(r.text == case["answer"], question=case["question"], expected=case["answer"],
          answer=r.text)
"""

DEPENDENT = """
import pytest
from pytest_llmbench import check

DATA = {data}

@pytest.mark.llmbench(dataset=DATA, temperatures=[0.0], id="id")
def test_chain(case, llm):
    first = llm.generate_response(case["question"], max_tokens=5)
    second = llm.generate_response("Spell backwards: " + first.text, max_tokens=5)
    check(second.text == case["answer"][::-1], question=case["question"],
          expected=case["answer"][::-1], answer=second.text)
"""


class Bench:
    """A pytester directory with a suite, and the simulator it talks to."""

    def __init__(self, pytester: pytest.Pytester, sim: Simulator) -> None:
        self.pytester = pytester
        self.sim = sim
        self.path = pytester.path
        self.api = openai.OpenAI(api_key=FAKE_KEY, base_url=sim.base_url, max_retries=0)

    def suite(self, n: int, temperatures: str = "[0.0]", template: str = SUITE) -> None:
        text = template.format(data=json.dumps(items(n)), temperatures=temperatures)
        self.pytester.makepyfile(test_bench=text)

    def args(self, *extra: str, report: str = "report.json") -> list[str]:
        return [
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "--llm-base-url",
            self.sim.base_url,
            "--batch-api",
            *POLL,
            "--llm-report",
            report,
            *extra,
        ]

    def run(self, *extra: str, report: str = "report.json") -> pytest.RunResult:
        return self.pytester.runpytest(*self.args(*extra, report=report))

    def report(self, name: str = "report.json") -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / name).read_text())
        return data

    def cases(self, name: str = "report.json") -> dict[str, dict[str, Any]]:
        return {c["nodeid"]: c for c in self.report(name)["cases"]}

    def stats(self) -> dict[str, Any]:
        return self.sim.stats()

    def batches(self) -> list[Any]:
        """The simulator's batches, oldest first (the API lists the newest first)."""
        return list(reversed(self.api.batches.list(limit=100).data))

    def store(self) -> ResponseStore:
        # answers are filed under the server that gave them: the simulator's base URL here
        return ResponseStore.open(self.path / ".llmbench", origin=self.sim.base_url)

    def stored_by_batch(self) -> dict[str | None, int]:
        with self.store() as store:
            found = store.get_many(store.keys())
        counts: dict[str | None, int] = {}
        for s in found.values():
            counts[s.batch_id] = counts.get(s.batch_id, 0) + 1
        return counts

    def saved_jobs(self) -> list[dict[str, Any]]:
        with self.store() as store:
            return list(store.get_state(JOBS_STATE) or [])


@pytest.fixture
def make_bench(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Bench]]:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    started: list[Simulator] = []

    def make(n: int = 0, *, dependent: bool = False, **config: Any) -> Bench:
        settings = {
            "answer_key": answer_key(n, dependent),
            "p_correct": 1.0,
            "temperature_slope": 0.0,
            **FAST,
            **config,
        }
        sim = Simulator(SimConfig.model_validate(settings), port=0).start()
        started.append(sim)
        return Bench(pytester, sim)

    yield make
    for sim in started:
        sim.stop()


def key_of(nodeid: str, question: str, temperature: float = 0.0) -> str:
    """The store key (= custom_id) the ``llm`` fixture gives the suite's first call."""
    body = {
        "model": "gpt-4o-mini",
        "temperature": temperature,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": question}],
    }
    return request_key(nodeid, 0, ENDPOINT, body)


# ---------------------------------------------------------------------------- units


def http(status: int, code: str | None = "server_error", message: str = "boom") -> dict[str, Any]:
    """A batch line's HTTP response with an API error body."""
    return {"status_code": status, "body": {"error": {"code": code, "message": message}}}


def failed(reason: str, attempts: int = 1, *, fatal: bool = False) -> Verdict:
    plural = "s" if attempts != 1 else ""
    return Verdict.failed(f"Batch API error: {reason} (after {attempts} attempt{plural})", fatal)


EXPIRED = {"code": "batch_expired", "message": "not run (job expired)"}
MISSING = {"code": "missing_result", "message": "not run (job completed)"}


@pytest.mark.parametrize(
    ("response", "error", "attempts", "live", "expected"),
    [
        # 5xx, 429, 408 and 409 lines go into another job, up to the attempt limit (3)
        pytest.param(http(500), None, 1, False, RESUBMIT, id="500-first"),
        pytest.param(http(503), None, 2, False, RESUBMIT, id="503-second"),
        pytest.param(
            http(500), None, 3, False, failed("HTTP 500 server_error: boom", 3), id="500-limit"
        ),
        pytest.param(http(429, "rate_limit_exceeded"), None, 1, False, RESUBMIT, id="429"),
        pytest.param(http(408), None, 1, False, RESUBMIT, id="408"),
        pytest.param(http(409), None, 2, False, RESUBMIT, id="409"),
        pytest.param({"status_code": 502, "body": None}, None, 1, False, RESUBMIT, id="502-bare"),
        # other HTTP errors fail for good at once, with the API's code (or type) and message
        pytest.param(
            http(400, "invalid_value", "bad"),
            None,
            1,
            False,
            failed("HTTP 400 invalid_value: bad"),
            id="400",
        ),
        pytest.param(
            {"status_code": 401, "body": {"error": {"type": "auth", "message": "no"}}},
            None,
            1,
            False,
            failed("HTTP 401 auth: no", fatal=True),
            id="401-type-label",
        ),
        pytest.param(
            http(404, None, ""), None, 1, False, failed("HTTP 404 :", fatal=True), id="404-empty"
        ),
        # refusals every line shares stop the run (a parameter the model does not accept)
        pytest.param(
            http(400, "unsupported_value", "no"),
            None,
            1,
            False,
            failed("HTTP 400 unsupported_value: no", fatal=True),
            id="400-unsupported",
        ),
        # an output line without a response is not retried (status 0)
        pytest.param({}, {"code": "server_error"}, 1, False, failed("HTTP 0 :"), id="no-status"),
        # with --llm-batch-fallback live a retryable line is left to the live API at once
        pytest.param(
            http(500), None, 1, True, failed("HTTP 500 server_error: boom"), id="500-live"
        ),
        # error-file lines (no response): the retryable codes, the rest fail for good
        pytest.param(None, {"code": "server_error"}, 1, False, RESUBMIT, id="code-5xx"),
        pytest.param(None, {"code": "rate_limit_exceeded"}, 2, False, RESUBMIT, id="code-429"),
        pytest.param(None, {"code": "timeout"}, 1, False, RESUBMIT, id="code-timeout"),
        pytest.param(
            None,
            {"code": "invalid_request", "message": "bad line"},
            1,
            False,
            failed("invalid_request: bad line"),
            id="code-invalid",
        ),
        pytest.param(None, None, 1, False, failed("error:"), id="nothing-said"),
        pytest.param("junk", {"code": "timeout"}, 1, False, RESUBMIT, id="response-not-dict"),
        pytest.param(
            None, {"code": "timeout"}, 1, True, failed("timeout:"), id="code-timeout-live"
        ),
        # lines a job never ran: expired ones get another job, even with the live fallback
        pytest.param(None, EXPIRED, 1, False, RESUBMIT, id="expired"),
        pytest.param(None, EXPIRED, 1, True, RESUBMIT, id="expired-live"),
        pytest.param(
            None,
            EXPIRED,
            3,
            True,
            failed("batch_expired: not run (job expired)", 3),
            id="expired-limit",
        ),
        pytest.param(None, MISSING, 1, False, RESUBMIT, id="missing"),
        pytest.param(
            None,
            MISSING,
            1,
            True,
            failed("missing_result: not run (job completed)"),
            id="missing-live",
        ),
    ],
)
def test_line_verdict(
    response: Any, error: Any, attempts: int, live: bool, expected: Verdict
) -> None:
    assert line_verdict(response, error, attempts, max_attempts=3, live=live) == expected


def test_line_verdict_attempt_limit_is_the_setting() -> None:
    assert line_verdict(http(500), None, 1, max_attempts=1, live=False) == failed(
        "HTTP 500 server_error: boom"
    )
    assert line_verdict(http(500), None, 4, max_attempts=5, live=False) == RESUBMIT


def planned(name: str, ordinal: int = 0, prompt: str = "") -> PlannedRequest:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt or name}]}
    return PlannedRequest(
        f"key-{name}-{ordinal}-{prompt}", f"t.py::{name}", ordinal, ENDPOINT, body
    )


def output_line(key: str, status: int) -> str:
    """A line of a job's output file: an answer (200) or an HTTP error."""
    body = {"choices": [{"message": {"content": "hi"}}]}
    response = {"status_code": 200, "body": body} if status == 200 else http(status)
    return json.dumps({"custom_id": key, "response": response})


@pytest.mark.parametrize(
    ("status", "job_error", "output", "errors", "stored", "retry", "failed_keys", "line"),
    [
        # a completed job: the answer stored, a 500 resubmitted, a line in neither file too
        (
            "completed",
            None,
            {"a": 200, "b": 500},
            [],
            ["a"],
            ["b", "c"],
            [],
            "1 stored, 2 to resubmit",
        ),
        # an error-file line counts only when the output file did not settle it
        (
            "completed",
            None,
            {"a": 200, "b": 200},
            ["b", "c"],
            ["a", "b"],
            [],
            ["c"],
            "2 stored, 1 failed",
        ),
        # an expired job keeps what finished and resubmits the rest
        ("expired", None, {"a": 200}, [], ["a"], ["b", "c"], [], "1 stored, 2 to resubmit"),
        # a cancelled job's unfinished lines fail with that reason
        ("cancelled", None, {"a": 200}, [], ["a"], [], ["b", "c"], "1 stored, 2 failed"),
        # a job that failed validation fails every line, with the API's reason
        (
            "failed",
            "too_many_tasks",
            {},
            [],
            [],
            [],
            ["a", "b", "c"],
            "0 stored, 3 failed -- too_many_tasks: no",
        ),
        # token_limit_exceeded: every line goes into smaller jobs
        (
            "failed",
            "token_limit_exceeded",
            {},
            [],
            [],
            ["a", "b", "c"],
            [],
            "0 stored, 3 to resubmit -- token_limit_exceeded: no",
        ),
    ],
    ids=["completed", "error-file", "expired", "cancelled", "failed", "token-limit"],
)
def test_collect_settles_every_line_once(
    status: str,
    job_error: str | None,
    output: dict[str, int],
    errors: list[str],
    stored: list[str],
    retry: list[str],
    failed_keys: list[str],
    line: str,
) -> None:
    requests = {k: [f"t.py::{k}", 0, ENDPOINT, {"model": "m"}] for k in "abc"}
    lines = JobLines(
        requests,
        lambda key, response, error: line_verdict(response, error, 1, max_attempts=3, live=False),
    )
    out = [output_line(k, code) for k, code in output.items()]
    got: list[str] = []
    # lines that are not JSON, or of another job, are skipped
    read_output(
        lines, "\n".join([*out, "not json", output_line("x", 200)]), lambda k, r: got.append(k)
    )
    read_errors(lines, "\n".join(json.dumps({"custom_id": k, "error": {}}) for k in errors))
    found = [SimpleNamespace(code=job_error, message="no", line=None)] if job_error else []
    batch = SimpleNamespace(id="batch_1", status=status, errors=SimpleNamespace(data=found))
    settle_unseen(lines, batch, lambda size: size > 1)
    assert (got, sorted(lines.retry), sorted(lines.errors)) == (stored, retry, failed_keys)
    collected = lines.collected("batch_1", status, live=False)
    assert collected.line == f"llmbench batch: job batch_1 {status}: {line}"
    assert (collected.stored, collected.failed) == (len(stored), len(failed_keys))


def test_token_limits_halve_until_a_single_request_still_fails() -> None:
    limits = TokenLimits()
    assert limits.halve("gpt-4o-mini", 4) and limits.cap("gpt-4o-mini", 50_000) == 2
    assert limits.halve("gpt-4o-mini", 2) and limits.cap("gpt-4o-mini", 50_000) == 1
    assert not limits.halve("gpt-4o-mini", 1)
    # a limited model's jobs run one at a time
    now, later = limits.take([[planned("a")], [planned("b")]], busy=set())
    assert (len(now), len(later)) == (1, 1)


def test_rounds_ask_once_and_fail_changed_and_too_deep_requests() -> None:
    rounds = Rounds(max_rounds=2)
    first = [planned("a"), planned("b")]
    assert rounds.plan(first, 0.5, lambda key: False) == first
    assert not rounds.exhausted(first)
    rounds.start(first)
    # round 2: a asks something else in its slot; b was asked; b's second call is new
    changed, dependent = planned("a", prompt="at 12:01"), planned("b", 1)
    fresh = rounds.plan([changed, first[1], dependent], 0.25, lambda key: False)
    assert fresh == [dependent]
    rounds.start(fresh)
    assert (rounds.count, rounds.plan_s, rounds.only) == (2, 0.75, {"t.py::a", "t.py::b"})
    assert "sent a different request in plan round 2" in rounds.errors[changed.key]
    # round 3 would exceed the limit: its requests fail with it
    deeper = [planned("b", 2)]
    assert rounds.plan(deeper, 0.0, lambda key: False) == deeper
    assert rounds.exhausted(deeper)
    assert "more than --llm-batch-max-rounds 2" in rounds.errors[deeper[0].key]
    assert rounds.notes(live=True) == [
        "1 request(s) still unanswered after 2 round(s) (raise --llm-batch-max-rounds)"
        "; left to the live API",
        "1 request(s) changed between plan rounds",
    ]


@pytest.mark.parametrize(
    ("settled", "keys"),
    [
        (None, ["jobs", "waited_s", "rounds"]),  # the stage did not run
        (False, ["jobs", "waited_s", "rounds", "plan_s"]),  # stopped early (timeout, detach)
        (True, ["jobs", "waited_s", "rounds", "plan_s", "failed", "unanswered", "notes"]),
    ],
)
def test_stats_report_keys_and_round_trip(settled: bool | None, keys: list[str]) -> None:
    rounds, log = Rounds(5), FetchLog(submitted=["b1", "b2"], lost=["b1"], waited_s=1.23456)
    log.failed.add("k")
    stats = BatchStats() if settled is None else BatchStats.of(rounds, log)
    if settled:
        stats.settle(rounds, log, live=False)
    report = stats.to_report()
    assert list(report) == keys
    assert BatchStats.from_report(report).to_report() == report
    if settled:
        assert report["jobs"] == ["b2"] and report["waited_s"] == 1.235
        assert report["notes"] == [
            "1 request(s) failed in the Batch API",
            "job(s) unknown to the API, submitted again: b1",
        ]


# ---------------------------------------------------------------------------- the job


def test_one_job_for_two_workers_and_shuffled_lines_reach_their_cases(
    make_bench: Callable[..., Bench],
) -> None:
    # Given 12 questions with distinct answers at two temperatures (24 cases), always
    # answered correctly, and a simulator that shuffles output lines
    bench = make_bench(12)
    bench.suite(12, temperatures="[0.0, 1.0]")

    # When the suite runs with two xdist workers through the Batch API
    result = bench.run("-n", "2")

    # Then exactly one file and one job were submitted, and nothing was called live
    result.assert_outcomes(passed=24)
    stats = bench.stats()
    assert (stats["files_uploaded"], stats["batches_created"], stats["chat_requests"]) == (1, 1, 0)
    (job,) = bench.batches()
    assert job.request_counts.total == 24
    # the output really is shuffled, so the joins below prove the mapping
    inputs = [
        json.loads(x)["custom_id"]
        for x in bench.api.files.content(job.input_file_id).text.splitlines()
    ]
    outputs = [
        json.loads(x)["custom_id"]
        for x in bench.api.files.content(job.output_file_id).text.splitlines()
    ]
    assert sorted(inputs) == sorted(outputs) and inputs != outputs
    # and every case got its own question's answer
    cases = bench.cases()
    assert len(cases) == 24
    for c in cases.values():
        assert c["response"] == f"word{c['item_id'][1:]}x", c["nodeid"]
        assert c["batch"] is True
    # and the summary names the mode, the job, the wait and the saving
    result.stdout.re_match_lines(
        [
            r".*llmbench summary \(batch, model gpt-4o-mini\).*",
            rf"llmbench batch: 1 round\(s\), 1 job\(s\) \({job.id}\), waited \d+\.\ds .*",
            r"llmbench batch: estimated cost \$[\d.]+ at batch prices vs \$[\d.]+ .* saved .*",
        ],
        consecutive=False,
    )
    run = bench.report()["run"]
    assert run["mode"] == "batch" and run["batch"]["jobs"] == [job.id]
    # both are rounded to 6 decimals in the report: equal to within that rounding
    realtime, batch = run["batch"]["realtime_cost_usd"], run["batch"]["cost_usd"]
    assert realtime == pytest.approx(2 * batch, abs=2e-6)


def test_dependent_calls_run_in_rounds_bounded_by_max_rounds(
    make_bench: Callable[..., Bench],
) -> None:
    # Given tests whose second prompt contains the first answer
    bench = make_bench(3, dependent=True)
    bench.suite(3, template=DEPENDENT)

    # When the round limit is 1
    capped = bench.run("--llm-batch-max-rounds", "1", "--llm-run-dir", "capped")

    # Then one job ran and every case fails naming the limit, without a live call
    capped.assert_outcomes(failed=3)
    assert bench.stats()["batches_created"] == 1
    assert bench.stats()["chat_requests"] == 0
    capped.stdout.fnmatch_lines(["*needs more than --llm-batch-max-rounds 1 round(s)*"])
    capped.stdout.fnmatch_lines(["llmbench batch: 3 request(s) still unanswered after 1 round*"])

    # When the default limit applies
    result = bench.run()

    # Then a second round answered the dependent calls
    result.assert_outcomes(passed=3)
    assert bench.stats()["batches_created"] == 3
    assert bench.stats()["chat_requests"] == 0
    result.stdout.fnmatch_lines(["llmbench batch: 2 round(s), 2 job(s)*"])
    assert bench.report()["run"]["batch"]["rounds"] == 2


def test_split_at_a_lowered_limit_is_one_tracked_submission(
    make_bench: Callable[..., Bench], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 7 requests and a test-only limit of 3 requests per file
    monkeypatch.setenv("LLMBENCH_BATCH_MAX_REQUESTS", "3")
    bench = make_bench(7)
    bench.suite(7)

    result = bench.run()

    # Then 3 jobs of 3, 3 and 1 were submitted together and waited for as one
    result.assert_outcomes(passed=7)
    jobs = bench.batches()
    assert sorted(b.request_counts.total for b in jobs) == [1, 3, 3]
    assert bench.stats()["batches_created"] == 3
    ids = ", ".join(b.id for b in jobs)
    result.stdout.fnmatch_lines([f"llmbench batch: submitted 7 request(s) as {ids}"])
    result.stdout.fnmatch_lines(["llmbench batch: completed 7/7 done, 0 failed*"])
    assert bench.report()["run"]["batch"]["jobs"] == [b.id for b in jobs]


def test_token_limit_exceeded_splits_and_resubmits_one_at_a_time(
    make_bench: Callable[..., Bench],
) -> None:
    # Given 4 prompts of 13 tokens and room for 30 enqueued tokens per model
    bench = make_bench(4, batch_enqueued_token_limit=30)
    bench.suite(4)

    result = bench.run()

    # Then the job of 4 failed, halves were resubmitted one after the other, all answered
    result.assert_outcomes(passed=4)
    jobs = bench.batches()
    assert [(b.status, b.request_counts.total) for b in jobs] == [
        ("failed", 4),
        ("completed", 2),
        ("completed", 2),
    ]
    assert "token_limit_exceeded" in jobs[0].errors.data[0].code
    result.stdout.fnmatch_lines(
        [f"llmbench batch: job {jobs[0].id} failed: *token_limit_exceeded*"]
    )


# ---------------------------------------------------------------------------- failures


def test_failed_job_reports_the_api_errors_and_fails_its_cases(
    make_bench: Callable[..., Bench],
) -> None:
    # Given a Batch API that accepts 2 requests per file and a suite of 3
    bench = make_bench(3, batch_max_requests=2)
    bench.suite(3)

    result = bench.run()

    # Then the job failed validation and every case fails with the API's reason
    assert result.ret == 1
    result.assert_outcomes(failed=3)
    (job,) = bench.batches()
    assert job.status == "failed"
    reason = "too_many_tasks: The batch input file has 3 requests; the limit is 2."
    result.stdout.fnmatch_lines(
        [f"llmbench batch: job {job.id} failed: 0 stored, 3 failed -- {reason}"]
    )
    result.stdout.fnmatch_lines([f"*API error: Batch API rejected job {job.id}: {reason}*"])
    result.stdout.fnmatch_lines([f"llmbench batch: job {job.id} failed validation: {reason}"])
    for c in bench.cases().values():
        assert c["outcome"] == "error" and reason in c["error"]
    assert bench.stats()["chat_requests"] == 0


def test_error_lines_are_resubmitted_then_fail_the_case_with_the_api_reason(
    make_bench: Callable[..., Bench],
) -> None:
    # Given a batch line that fails with a 500 every time it runs
    failing = key_of("test_bench.py::test_q[q1-t0]", items(4)[1]["question"])
    bench = make_bench(4, batch_fail_custom_ids=[failing], batch_line_error_status=500)
    bench.suite(4)

    result = bench.run()

    # Then it was resubmitted alone in follow-up jobs up to the attempt limit (3)
    jobs = bench.batches()
    assert [b.request_counts.total for b in jobs] == [4, 1, 1]
    assert [b.request_counts.failed for b in jobs] == [1, 1, 1]
    # and that case fails with the API's reason, the others pass, nothing went live
    result.assert_outcomes(passed=3, failed=1)
    case = bench.cases()["test_bench.py::test_q[q1-t0]"]
    assert case["outcome"] == "error"
    assert case["error"].startswith("Batch API error: HTTP 500 server_error: ")
    assert case["error"].endswith("(after 3 attempts)")
    assert bench.stats()["chat_requests"] == 0
    result.stdout.fnmatch_lines(["llmbench batch: 1 request(s) failed in the Batch API"])

    # When the line would now succeed and the same command runs again
    bench.sim.configure(batch_fail_custom_ids=[])
    again = bench.run()

    # Then only the failed request was asked again (a failure is not an answer; stored
    # answers are not sent twice), and its case passes
    again.assert_outcomes(passed=4)
    jobs = bench.batches()
    assert [b.request_counts.total for b in jobs] == [4, 1, 1, 1]
    assert bench.stored_by_batch() == {jobs[0].id: 3, jobs[3].id: 1}
    assert bench.stats()["chat_requests"] == 0


def test_fallback_live_calls_the_api_for_failed_lines(make_bench: Callable[..., Bench]) -> None:
    # Given a batch line that always fails, and --llm-batch-fallback live
    failing = key_of("test_bench.py::test_q[q0-t0]", items(3)[0]["question"])
    bench = make_bench(3, batch_fail_custom_ids=[failing])
    bench.suite(3)

    result = bench.run("--llm-batch-fallback", "live")

    # Then no follow-up job: that one request was sent live during the run, and passed
    result.assert_outcomes(passed=3)
    (job,) = bench.batches()
    assert bench.stats()["chat_requests"] == 1
    result.stdout.fnmatch_lines(["llmbench batch: 1 request(s) failed in the Batch API; left to*"])
    assert bench.stored_by_batch() == {job.id: 2, None: 1}


def test_expired_job_keeps_partial_results_and_resubmits_the_rest(
    make_bench: Callable[..., Bench],
) -> None:
    # Given a job of 4 lines at 4 lines/s that expires 1 s after creation (about 3 lines
    # finish in time; a follow-up job of the rest needs at most 0.85 s)
    bench = make_bench(4, batch_requests_per_second=4.0, batch_expire_after=1.0)
    bench.suite(4)

    result = bench.run()

    # Then the finished lines were kept and only the rest went into a follow-up job
    result.assert_outcomes(passed=4)
    first, second = bench.batches()
    assert first.status == "expired" and second.status == "completed"
    done = first.request_counts.completed
    assert 1 <= done < 4
    assert second.request_counts.total == 4 - done
    assert bench.stored_by_batch() == {first.id: done, second.id: 4 - done}
    result.stdout.fnmatch_lines(
        [f"llmbench batch: job {first.id} expired: {done} stored, {4 - done} to resubmit"]
    )


def test_cancelled_job_says_so_and_keeps_the_lines_it_finished(
    make_bench: Callable[..., Bench],
) -> None:
    # Given a job of 6 lines at 4 lines/s that someone cancels once a line has finished
    bench = make_bench(6, batch_requests_per_second=4.0, batch_cancelling_seconds=0.05)
    bench.suite(6)

    def cancel_when_started() -> None:
        def started() -> Any:
            jobs = bench.batches()
            return jobs and jobs[0].request_counts.completed >= 1 and jobs[0]

        job = wait_for(started, "a job with a finished line", timeout=20)
        bench.api.batches.cancel(job.id)

    canceller = threading.Thread(target=cancel_when_started)
    canceller.start()
    result = bench.run()
    canceller.join()

    # Then the run says the job was cancelled, keeps what finished, and fails the rest
    # with that reason (no resubmission, no live call)
    (job,) = bench.batches()
    assert job.status == "cancelled"
    done = job.request_counts.completed
    assert 1 <= done < 6
    assert bench.stored_by_batch() == {job.id: done}
    result.assert_outcomes(passed=done, failed=6 - done)
    result.stdout.fnmatch_lines([f"llmbench batch: job {job.id} was cancelled (not by *"])
    failed = [c for c in bench.cases().values() if c["outcome"] != "passed"]
    assert {c["error"] for c in failed} == {
        f"Batch API job {job.id} was cancelled before this request ran"
    }
    assert bench.stats()["chat_requests"] == 0


# ---------------------------------------------------------------------------- resuming


def test_kill_during_polling_then_rerun_resumes_the_same_job(
    make_bench: Callable[..., Bench], tmp_path: Path
) -> None:
    # Given a job that takes about 1.5 s (6 lines at 4 lines/s)
    bench = make_bench(6, batch_requests_per_second=4.0)
    bench.suite(6)
    log = tmp_path / "killed.log"

    # When pytest is killed (SIGKILL, its whole process group) once the job is saved
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *bench.args()],
            cwd=bench.path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(
                lambda: any(j.get("batch_id") for j in bench.saved_jobs()),
                "a saved job",
                timeout=20,
            )
            assert proc.poll() is None, log.read_text()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (saved,) = bench.saved_jobs()
    assert bench.batches()[0].status in ("validating", "in_progress")

    # and the same command runs again
    result = bench.run()

    # Then it resumed that job: one upload, one job, every result stored
    result.stdout.fnmatch_lines([f"llmbench batch: resuming job(s) {saved['batch_id']}"])
    result.assert_outcomes(passed=6)
    stats = bench.stats()
    assert (stats["files_uploaded"], stats["batches_created"], stats["chat_requests"]) == (1, 1, 0)
    assert bench.stored_by_batch() == {saved["batch_id"]: 6}


def test_timeout_exits_non_zero_and_the_next_run_resumes(
    make_bench: Callable[..., Bench],
) -> None:
    # Given a job that takes about 2 s
    bench = make_bench(8, batch_requests_per_second=4.0)
    bench.suite(8)

    # When the run may wait 0.3 s
    timed_out = bench.run("--llm-batch-timeout", "0.3")

    # Then it stops non-zero, names the saved job, and ran no test
    (job,) = bench.batches()
    assert timed_out.ret == 1
    timed_out.stdout.fnmatch_lines(["*submitted 8 request(s) as " + job.id])
    out = timed_out.stdout.str() + timed_out.stderr.str()
    assert f"batch job(s) {job.id} not finished after --llm-batch-timeout 0.3s" in out
    assert "run the same command again to resume" in out
    timed_out.assert_outcomes()
    assert [j["batch_id"] for j in bench.saved_jobs()] == [job.id]

    # When the same command runs without the timeout
    result = bench.run()

    # Then it waits for the same job and collects it
    result.stdout.fnmatch_lines([f"llmbench batch: resuming job(s) {job.id}"])
    result.assert_outcomes(passed=8)
    assert bench.stats()["batches_created"] == 1


def test_detach_submits_and_exits_then_a_normal_run_collects(
    make_bench: Callable[..., Bench],
) -> None:
    # Given a job that takes a moment
    bench = make_bench(4, batch_requests_per_second=8.0)
    bench.suite(4)

    # When the run detaches
    detached = bench.run("--llm-batch-detach")

    # Then it submitted one job and exited at once, saying how to collect
    assert detached.ret == 0
    detached.assert_outcomes()
    (job,) = bench.batches()
    out = detached.stdout.str() + detached.stderr.str()
    assert f"batch job(s) {job.id} submitted and running" in out
    assert "again without --llm-batch-detach" in out

    # And when the crash window between creating a job and saving its id is simulated
    # (the saved record has no batch id yet), the next run still finds it by input file
    with bench.store() as store:
        jobs = store.get_state(JOBS_STATE)
        jobs[0]["batch_id"] = None
        store.set_state(JOBS_STATE, jobs)

    # When a normal run follows
    result = bench.run()

    # Then it collected that job: still one job, every case answered from it
    result.stdout.fnmatch_lines([f"llmbench batch: resuming job(s) {job.id}"])
    result.assert_outcomes(passed=4)
    assert bench.stats()["batches_created"] == 1
    assert bench.stored_by_batch() == {job.id: 4}


# ---------------------------------------------------------------------------- vs real time


def test_outcomes_at_temperature_zero_equal_real_time_mode(
    make_bench: Callable[..., Bench],
) -> None:
    # Given a model that is right 60% of the time, at two temperatures
    bench = make_bench(10, p_correct=0.6, temperature_slope=0.3)
    bench.suite(10, temperatures="[0.0, 1.0]")

    # When the suite runs in real time, then through the Batch API (own run directories)
    live = bench.pytester.runpytest(
        *("-p", "no:randomly", "--llm-base-url", bench.sim.base_url, "--llm-no-prefetch"),
        *("--llm-run-dir", "live", "--llm-report", "live.json"),
    )
    batch = bench.run("--llm-run-dir", "batch", report="batch.json")

    # Then every case at T=0 has the same outcome and answer in both modes
    assert bench.report("live.json")["run"]["mode"] == "live"
    assert bench.report("batch.json")["run"]["mode"] == "batch"
    pick = lambda name: {  # noqa: E731
        n: (c["outcome"], c["response"])
        for n, c in bench.cases(name).items()
        if c["temperature"] == 0.0
    }
    assert len(pick("live.json")) == 10
    assert pick("batch.json") == pick("live.json")
    outcomes = {o for o, _ in pick("live.json").values()}
    assert outcomes == {"passed", "failed"}, "the comparison needs both outcomes"
    assert live.ret == batch.ret == 1
