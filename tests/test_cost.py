"""``--llm-max-cost``: a run stops before its spend could pass the cap, shared by every
process; the stored answers are kept and a rerun with a higher cap sends only the rest.

The runs are real pytest processes (``runpytest_subprocess``, ``-n 2``) against a
simulator over HTTP that counts what it was sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_llmbench.errors import FATAL_EXIT_STATUS, RunStopped
from pytest_llmbench.pricing import PriceTable
from pytest_llmbench.sim import SimConfig, Simulator
from pytest_llmbench.spend import CostCap, Spend, usd
from pytest_llmbench.store import ResponseStore
from pytest_llmbench.tokens import prompt_tokens

from .helpers import FAKE_KEY
from .test_plugin import write_dataset

MAX_TOKENS = 8
SUITE = f"""
import pytest

@pytest.mark.llmbench(dataset="data.jsonl", temperatures=[0.0], id="qid")
def test_qa(case, llm):
    r = llm.generate_response(case["question"], max_tokens={MAX_TOKENS})
    assert r.text
"""
MODEL = "gpt-4o-mini"
#: $0.001 a token, in and out: a request costs about two cents
PRICES = {MODEL: {"input": 1000.0, "output": 1000.0}}
N = 40


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    with Simulator(SimConfig(seed=5), port=0) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
        yield sim


def suite(pytester: pytest.Pytester) -> list[dict[str, str]]:
    rows = write_dataset(pytester.path / "data.jsonl", N)
    pytester.makepyfile(test_suite=SUITE)
    pytester.makeini("[pytest]\n")
    (pytester.path / "prices.json").write_text(json.dumps(PRICES), encoding="utf-8")
    return rows


def worst_case(question: str, prices: PriceTable) -> float:
    tokens = prompt_tokens([{"role": "user", "content": question}], MODEL)
    cost = prices.cost(MODEL, tokens, MAX_TOKENS)
    assert cost is not None
    return cost


def stored_spend(pytester: pytest.Pytester, origin: str, prices: PriceTable) -> tuple[int, float]:
    with ResponseStore.open(pytester.path / ".llmbench", origin=origin) as store:
        keys = store.keys()  # a list, not a dict's view
        answers = [store.get(k) for k in keys]
    spent = 0.0
    for a in answers:
        assert a is not None
        usage = a.response["usage"]
        spent += prices.cost(MODEL, usage["prompt_tokens"], usage["completion_tokens"]) or 0.0
    return len(answers), spent


@pytest.mark.parametrize("mode", ["prefetch", "live"])
def test_a_cap_stops_the_run_within_one_request_and_a_higher_cap_finishes_it(
    pytester: pytest.Pytester, api: Simulator, mode: str
) -> None:
    rows = suite(pytester)
    prices = PriceTable.load(pytester.path / "prices.json")
    one = max(worst_case(r["question"], prices) for r in rows)
    cap = 0.25  # about 12 of the 40 requests
    extra = ["--llm-no-prefetch"] if mode == "live" else []
    args = ["-n", "2", "-rN", "--llm-prices=prices.json", *extra]

    # When a run has a cap of $0.25
    first = pytester.runpytest_subprocess(*args, f"--llm-max-cost={cap}")

    # Then it stops with status 6, having spent at most the cap and less than one
    # request's worst case below it; every request it sent has its answer stored
    text = first.stdout.str() + first.stderr.str()
    assert first.ret == FATAL_EXIT_STATUS, text
    assert f"--llm-max-cost {usd(cap)}: spent $" in text
    assert "raise the cap and run the same command" in text
    assert "Traceback" not in text and "INTERNALERROR" not in text
    stored, spent = stored_spend(pytester, api.base_url, prices)
    sent = api.stats()["chat_requests"]
    assert 0 < stored == sent < N
    assert cap - one < spent <= cap, (spent, one)
    # the stop line's figure is the shared ledger's: what was spent when the run stopped
    said = re.search(r"--llm-max-cost 0\.25: spent \$([\d.]+) of \$0\.25", text)
    assert said is not None and cap - one < float(said[1]) <= round(spent, 4)

    # When the same command runs with a higher cap
    second = pytester.runpytest_subprocess(*args, "--llm-max-cost=10")

    # Then it finishes, sending only what was not stored
    text = second.stdout.str() + second.stderr.str()
    assert second.ret == 0, text
    assert api.stats()["chat_requests"] == N
    assert stored_spend(pytester, api.base_url, prices)[0] == N
    assert f"{N - sent} request(s) sent in this run, {sent} answer(s) replayed" in text


def test_a_model_without_a_price_stops_the_run_before_sending(
    pytester: pytest.Pytester, api: Simulator
) -> None:
    suite(pytester)
    api.configure(models=["acme-1"])
    result = pytester.runpytest_subprocess(
        "-n", "2", "-rN", "--llm-model=acme-1", "--llm-max-cost=1"
    )
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == FATAL_EXIT_STATUS, text
    assert "no price for model 'acme-1'" in text and "--llm-prices" in text
    assert api.stats()["chat_requests"] == 0


# ---------------------------------------------------------------------- the ledger
def make_cap(tmp_path: Path, cap: float, stops: list[str]) -> CostCap:
    store = ResponseStore.open(tmp_path)
    return CostCap(
        cap, PriceTable(), store, "run1", default_max_tokens=100, on_stop=stops.append, wait_s=0
    )


def body(question: str, max_tokens: int | None = 100) -> dict[str, object]:
    b: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": question}]}
    if max_tokens is not None:
        b["max_tokens"] = max_tokens
    return b


def test_the_ledger_reserves_the_worst_case_and_settles_the_real_cost(tmp_path: Path) -> None:
    stops: list[str] = []
    cap = make_cap(tmp_path, 1.0, stops)
    # gpt-4o-mini: $0.15 / $0.60 per 1M tokens
    worst = cap.reserve(body("What is 2+2?"))
    tokens = prompt_tokens([{"role": "user", "content": "What is 2+2?"}], MODEL)
    assert worst == pytest.approx((tokens * 0.15 + 100 * 0.60) / 1e6)
    assert cap.spend() == Spend(0.0, worst, 0)
    cap.settle(worst, MODEL, {"prompt_tokens": tokens, "completion_tokens": 2})
    assert cap.spend().spent == pytest.approx((tokens * 0.15 + 2 * 0.60) / 1e6)
    assert cap.spend().reserved == 0 and cap.spend().answers == 1
    second = cap.reserve(body("x", max_tokens=None))  # no bound: --llm-max-tokens (100)
    cap.release(second)
    assert cap.spend().reserved == 0 and cap.spend().answers == 1
    assert stops == []
    cap.store.close()


def test_a_request_that_does_not_fit_stops_the_run(tmp_path: Path) -> None:
    stops: list[str] = []
    cap = make_cap(tmp_path, 0.0001, stops)
    cap.add(0.00009)
    with pytest.raises(RunStopped, match=r"raise the cap and run the same command"):
        cap.reserve(body("What is 2+2?"))
    assert stops and stops[0].startswith("--llm-max-cost 0.0001: spent $0.0001 of $0.0001")
    assert cap.spend().reserved == 0  # nothing was reserved
    cap.store.close()
