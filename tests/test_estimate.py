"""``--llm-estimate``: the run is planned, nothing is sent, and the counts it prints are the
ones the server then reports when the same suite runs.

The runs are real pytest processes (``runpytest_subprocess``, ``-n 2``) against a
simulator over HTTP that counts what it was sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from pytest_llmbench.estimate import SuiteEstimate, estimate, format_estimate
from pytest_llmbench.pricing import PriceTable
from pytest_llmbench.sim import SimConfig, Simulator
from pytest_llmbench.store import PlannedRequest, ResponseStore
from pytest_llmbench.tokens import exact_available

from .helpers import FAKE_KEY, answer_key
from .test_plugin import write_dataset

N = 10
SUITE = """
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0, 1.0], id="qid")
def test_qa(case, llm):
    r = llm.generate_response(case["question"], max_tokens=8)
    assert r.text == case["answer"]

@pytest.mark.llmbench(dataset="data.jsonl", id="qid")
def test_checked(case, llm):
    r = llm.generate_response([
        {"role": "system", "content": "Answer with the name only."},
        {"role": "user", "content": case["question"]},
    ])
    # depends on the first answer: the plan cannot know it
    llm.generate_response("Is this right? " + r.text, max_tokens=4)
"""


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    with Simulator(SimConfig(seed=7, p_correct=0.7), port=0) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
        yield sim


def total_row(text: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith("TOTAL "))
    return re.split(r"\s{2,}", line.strip())


@pytest.mark.skipif(not exact_available(), reason="needs pytest-llmbench[tokens]")
def test_the_estimate_sends_nothing_and_counts_what_the_server_then_reports(
    pytester: pytest.Pytester, api: Simulator
) -> None:
    rows = write_dataset(pytester.path / "data.jsonl", N)
    api.configure(answer_key=answer_key(rows))
    pytester.makepyfile(test_suite=SUITE)
    pytester.makeini("[pytest]\n")

    # When the suite is estimated
    est = pytester.runpytest_subprocess("-n", "2", "--llm-estimate")

    # Then nothing is sent, every test is deselected, and the run exits 0
    text = est.stdout.str()
    assert est.ret == 0, text + est.stderr.str()
    assert api.stats()["chat_requests"] == 0
    assert f"{3 * N} deselected" in text
    assert "prompt tokens exact (o200k_base)" in text
    assert "cannot be planned and are not counted" in text
    label, requests, prompt, bound, realtime, batch = total_row(text)
    assert label == "TOTAL"
    # test_checked's first call sets no max_tokens: the client's default (256) bounds it
    assert (int(requests), int(bound.replace(",", ""))) == (3 * N, 2 * N * 8 + N * 256)
    assert realtime.count("$") == 2 and batch.count("$") == 2

    # When the same suite runs
    run = pytester.runpytest_subprocess("-n", "2")
    assert run.ret == 1  # p_correct 0.7: some answers are wrong

    # Then the server counted the same prompt tokens for the planned (first) calls; the
    # dependent calls, which the plan cannot see, are in neither figure
    with ResponseStore.open(pytester.path / ".llmbench", origin=api.base_url) as store:
        answers = [store.get(k) for k in store.keys()]  # noqa: SIM118 (a list, not a dict)
    first = [a for a in answers if a is not None and a.ordinal == 0]
    later = [a for a in answers if a is not None and a.ordinal > 0]
    assert len(first) == int(requests) and len(later) == N
    assert sum(a.response["usage"]["prompt_tokens"] for a in first) == int(prompt)
    assert api.stats()["chat_requests"] == 4 * N

    # And an estimate of the failed tests alone finds them all stored: nothing to send,
    # and the --lf state is left as it was (deselected, not skipped)
    lastfailed = pytester.path / ".pytest_cache" / "v" / "cache" / "lastfailed"
    before = json.loads(lastfailed.read_text())
    again = pytester.runpytest_subprocess("-n", "2", "--llm-estimate", "--lf")
    assert again.ret == 0
    assert "0 request(s) would be sent" in again.stdout.str()
    assert json.loads(lastfailed.read_text()) == before
    assert api.stats()["chat_requests"] == 4 * N


def planned(nodeid: str, body: dict[str, object]) -> PlannedRequest:
    return PlannedRequest(nodeid, nodeid, 0, "/v1/chat/completions", body)


def test_a_request_without_a_bound_or_a_price_shows_as_such() -> None:
    messages = [{"role": "user", "content": "hi"}]
    reqs = [
        planned("t.py::test_a[1]", {"model": "gpt-4o", "messages": messages, "max_tokens": 5}),
        planned("t.py::test_a[2]", {"model": "gpt-4o", "messages": messages}),
        planned(
            "t.py::test_b[1]", {"model": "acme-1", "messages": messages, "n": 2, "max_tokens": 3}
        ),
    ]
    rows, total = estimate(reqs, PriceTable())
    a, b = rows
    assert (a.suite, a.requests, a.output_bound, a.max_usd) == ("t.py::test_a", 2, None, None)
    assert a.min_usd is not None and a.min_usd > 0
    assert (b.output_bound, b.min_usd, b.max_usd) == (6, None, None)
    assert total.requests == 3 and total.output_bound is None
    lines = format_estimate(rows, total)
    assert lines[0].split() == [
        "suite", "requests", "prompt", "tokens", "output", "bound",
        "real-time", "USD", "Batch", "API", "USD",
    ]  # fmt: skip
    assert "unbounded" in lines[1] and lines[1].endswith("- unbounded")
    assert lines[2].endswith("? - ?") and lines[3].startswith("TOTAL")


def test_the_batch_range_is_half_the_real_time_range() -> None:
    row = SuiteEstimate("s")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    row.add(planned("s[1]", {**body, "max_tokens": 1_000_000}), PriceTable())
    line = format_estimate([row], row)[1]
    realtime, batch = re.findall(r"\$\S+ - \$\S+", line)
    assert row.min_usd is not None and row.max_usd == pytest.approx(0.60, abs=1e-4)
    assert realtime == f"${row.min_usd:.6f} - $0.6000"  # 1M output tokens of gpt-4o-mini
    assert batch == f"${row.min_usd / 2:.6f} - $0.3000"
