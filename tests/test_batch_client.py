"""``LLMClient.batch_generate(..., use_batch_api=True)``: a client on its own through the
Batch API machinery of ``--batch-api``.

Every test talks to a simulator started in this process over real HTTP with the real
SDK, so it can read the simulator's counters (``batches_created``, ``files_uploaded``,
``chat_requests``) and the Batch API objects it holds. The resume test runs the client
the way a user does, as a script in a subprocess, and kills it while it polls the job;
the others call the client in this process. Batch phases are made tiny; where a job must
take a while, ``batch_requests_per_second`` is lowered and the test waits on an
observable condition with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import pytest_llmbench.client as client_module
from pytest_llmbench import LLMCallError, LLMClient, LLMConfig
from pytest_llmbench.batch_client import NODEID
from pytest_llmbench.batch_ledger import JOBS_STATE
from pytest_llmbench.batch_wait import BatchWaitError
from pytest_llmbench.client import ENDPOINT
from pytest_llmbench.errors import ConfigError
from pytest_llmbench.sim import SimConfig, Simulator
from pytest_llmbench.store import ResponseStore, request_key

from .helpers import FAKE_KEY, wait_for

FAST = {
    "batch_validating_seconds": 0.05,
    "batch_finalizing_seconds": 0.05,
    "batch_requests_per_second": None,
}

SCRIPT = """
import json
import sys

from pytest_llmbench import LLMClient, LLMConfig

base_url, run_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = [f"What is secret word number {i}?" for i in range(n)]
config = LLMConfig(base_url=base_url, run_dir=run_dir, batch={"poll_interval": 0.05})
with LLMClient(config) as client:
    answers = client.batch_generate(prompts, use_batch_api=True, max_tokens=5)
print(json.dumps([[r.ok, r.text] for r in answers]))
"""


def prompt(i: int) -> str:
    return f"What is secret word number {i}?"


def answer(i: int) -> str:
    """Pairwise distinct answers, so a mix-up of lines cannot pass."""
    return f"word{i}x"


@pytest.fixture
def make_sim() -> Iterator[Callable[..., Simulator]]:
    started: list[Simulator] = []

    def make(n: int, **config: Any) -> Simulator:
        settings = {
            "answer_key": [
                {"question": prompt(i), "correct": answer(i), "wrong": ["nope"]} for i in range(n)
            ],
            "p_correct": 1.0,
            "temperature_slope": 0.0,
            **FAST,
            **config,
        }
        sim = Simulator(SimConfig.model_validate(settings), port=0).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


def make_client(sim: Simulator, run_dir: Path, **batch: Any) -> LLMClient:
    config = LLMConfig(
        base_url=sim.base_url,
        api_key=FAKE_KEY,
        run_dir=run_dir,
        batch={"poll_interval": 0.05, **batch},
    )
    return LLMClient(config)


def key_of(client: LLMClient, text: str, ordinal: int = 0) -> str:
    """The store key (= custom_id) of a standalone batch request."""
    return request_key(NODEID, ordinal, ENDPOINT, client.build_request(text, {"max_tokens": 5}))


def saved_jobs(sim: Simulator, run_dir: Path) -> list[dict[str, Any]]:
    if not run_dir.is_dir():
        return []
    with ResponseStore.open(run_dir, origin=sim.base_url) as store:
        return list(store.get_state(JOBS_STATE) or [])


def sim_batches(sim: Simulator) -> list[Any]:
    """The simulator's batches, oldest first (the API lists the newest first)."""
    api = openai.OpenAI(api_key=FAKE_KEY, base_url=sim.base_url, max_retries=0)
    return list(reversed(api.batches.list(limit=100).data))


def counters(sim: Simulator) -> tuple[int, int, int]:
    stats = sim.stats()
    return stats["files_uploaded"], stats["batches_created"], stats["chat_requests"]


# ---------------------------------------------------------------------------- resuming


def test_script_killed_while_polling_resumes_the_one_job_on_rerun(
    make_sim: Callable[..., Simulator], tmp_path: Path
) -> None:
    # Given a script asking 200 prompts through the Batch API, and a job that takes
    # about 2 s (200 lines at 100 lines/s)
    sim = make_sim(200, batch_requests_per_second=100.0)
    script = tmp_path / "ask.py"
    script.write_text(SCRIPT, encoding="utf-8")
    run_dir = tmp_path / "runs"
    cmd = [sys.executable, str(script), sim.base_url, str(run_dir), "200"]
    env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY}
    err = tmp_path / "killed.err"
    polled = re.compile(r"llmbench batch: \w+ \d+/200 done")

    # When it is killed (SIGKILL) once its progress line shows it polling the job
    with err.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=out, env=env, start_new_session=True
        )
        try:
            wait_for(lambda: polled.search(err.read_text()), "the job polled", timeout=30)
            assert proc.poll() is None, err.read_text()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (saved,) = saved_jobs(sim, run_dir)
    (job,) = sim_batches(sim)
    assert saved["batch_id"] == job.id
    assert job.status in ("validating", "in_progress")

    # and the same script runs again
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    # Then it polled the saved job instead of submitting again, and printed all 200
    # answers in input order, with nothing sent in real time
    assert rerun.returncode == 0, rerun.stderr
    assert f"llmbench batch: resuming job(s) {job.id}" in rerun.stderr
    assert "submitted" not in rerun.stderr
    assert json.loads(rerun.stdout) == [[True, answer(i)] for i in range(200)]
    assert counters(sim) == (1, 1, 0)
    assert sim_batches(sim)[0].status == "completed"


# ---------------------------------------------------------------------------- failures


def test_failed_lines_come_back_per_item_and_retry_live_answers_them(
    make_sim: Callable[..., Simulator], tmp_path: Path
) -> None:
    # Given a Batch API that refuses two of six lines (HTTP 400: failed for good)
    sim = make_sim(6)
    client = make_client(sim, tmp_path / "runs")
    prompts = [prompt(i) for i in range(6)]
    failing = [key_of(client, prompt(1)), key_of(client, prompt(4))]
    sim.configure(batch_fail_custom_ids=failing, batch_line_error_status=400)

    # When the client asks them through the Batch API
    first = client.batch_generate(prompts, use_batch_api=True, max_tokens=5)

    # Then those two items come back with ok False and the API's reason, the others
    # with their answers, in input order; one job, nothing in real time
    assert [r.ok for r in first] == [True, False, True, True, False, True]
    assert [r.text for r in first if r.ok] == [answer(i) for i in (0, 2, 3, 5)]
    for r in (first[1], first[4]):
        assert r.error is not None and r.error.startswith("Batch API error: HTTP 400 ")
        assert r.key in failing
    assert counters(sim) == (1, 1, 0)

    # When the lines now fail with a 500 and the same prompts are asked with retry_live
    sim.configure(batch_line_error_status=500)
    second = client.batch_generate(prompts, use_batch_api=True, retry_live=True, max_tokens=5)

    # Then only the two unanswered were batched (a failure is not an answer; stored
    # answers are not asked again), their 500s were not resubmitted but sent in real time
    assert [(r.ok, r.text) for r in second] == [(True, answer(i)) for i in range(6)]
    assert [r.source for r in second] == ["batch", "live", "batch", "batch", "live", "batch"]
    assert [b.request_counts.total for b in sim_batches(sim)] == [6, 2]
    assert counters(sim) == (2, 2, 2)


# ---------------------------------------------------------------------------- the switch


def test_use_batch_api_false_goes_real_time_although_batch_is_enabled(
    make_sim: Callable[..., Simulator], tmp_path: Path
) -> None:
    # Given a configuration with the Batch API enabled
    sim = make_sim(3)
    client = make_client(sim, tmp_path / "runs", enabled=True)

    # When batch_generate is told not to use it
    got = client.batch_generate([prompt(i) for i in range(3)], use_batch_api=False, max_tokens=5)

    # Then the calls went in real time: no file, no job, three chat requests
    assert [(r.ok, r.text, r.source) for r in got] == [(True, answer(i), "live") for i in range(3)]
    assert counters(sim) == (0, 0, 3)


def test_second_call_is_answered_from_the_store_with_no_new_job(
    make_sim: Callable[..., Simulator], tmp_path: Path
) -> None:
    # Given batch.enabled (use_batch_api left to the configuration) and a repeated prompt
    sim = make_sim(3)
    run_dir = tmp_path / "runs"
    client = make_client(sim, run_dir, enabled=True)
    first = client.batch_generate([prompt(0), prompt(1), prompt(0)], max_tokens=5)
    assert [(r.text, r.cached) for r in first] == [(answer(i), False) for i in (0, 1, 0)]
    assert counters(sim) == (1, 1, 0)
    assert sim_batches(sim)[0].request_counts.total == 3  # the repeat is a request of its own

    # When a new client asks the same prompts again, in another order
    again = make_client(sim, run_dir, enabled=True)
    second = again.batch_generate([prompt(1), prompt(0), prompt(0)], max_tokens=5)

    # Then every answer comes from the store: no new job, no real-time call
    assert [(r.text, r.cached, r.source) for r in second] == [
        (answer(i), True, "batch") for i in (1, 0, 0)
    ]
    assert counters(sim) == (1, 1, 0)
    assert again.usage()["gpt-4o-mini"].total_tokens == 0  # nothing was paid for again
    # and the key reached neither the store nor any other file of the run directory
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_timeout_raises_naming_the_saved_job_and_the_same_call_resumes(
    make_sim: Callable[..., Simulator], tmp_path: Path
) -> None:
    # Given a job that takes about 1 s and a client that waits 0.2 s at most
    sim = make_sim(4, batch_requests_per_second=4.0)
    client = make_client(sim, tmp_path / "runs", timeout=0.2)
    prompts = [prompt(i) for i in range(4)]

    # When it asks through the Batch API
    with pytest.raises(BatchWaitError) as info:
        client.batch_generate(prompts, use_batch_api=True, max_tokens=5)

    # Then the error names the saved job and how to resume
    (job,) = sim_batches(sim)
    assert str(info.value) == (
        f"batch job(s) {job.id} not finished after the batch timeout of 0.2s; they are "
        "saved in the run directory: the same call again waits for them and collects the "
        "results (nothing is submitted twice)"
    )

    # When the same call runs without the timeout
    patient = make_client(sim, tmp_path / "runs")
    got = patient.batch_generate(prompts, use_batch_api=True, max_tokens=5)

    # Then it collected that job
    assert [r.text for r in got] == [answer(i) for i in range(4)]
    assert counters(sim) == (1, 1, 0)


def test_a_server_without_a_batch_api_says_so_in_one_line(
    make_sim: Callable[..., Simulator], tmp_path: Path
) -> None:
    sim = make_sim(1, batch_api=False)
    client = make_client(sim, tmp_path / "runs")
    with pytest.raises(LLMCallError) as info:
        client.batch_generate([prompt(0)], use_batch_api=True)
    assert str(info.value) == (
        f"use_batch_api: {sim.base_url} has no Batch API (POST /files answered 404); "
        "call batch_generate with use_batch_api=False"
    )
    assert counters(sim) == (0, 0, 0)


def test_without_the_backend_registered_the_error_says_how_to_load_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(client_module._BACKENDS, "batch")
    client = LLMClient(LLMConfig(api_key=FAKE_KEY, run_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"^use_batch_api: the Batch API backend is not"):
        client.batch_generate(["hi"], use_batch_api=True)


def test_inside_a_test_the_run_mode_decides(
    make_sim: Callable[..., Simulator], pytester: pytest.Pytester, fake_key: str
) -> None:
    # Given a test that asks for the Batch API through the llm fixture, in a live run
    sim = make_sim(2)
    pytester.makepyfile(
        test_it=f"""
        def test_ask(llm):
            got = llm.batch_generate({[prompt(0), prompt(1)]!r}, use_batch_api=True,
                                     max_tokens=5)
            assert [r.text for r in got] == {[answer(0), answer(1)]!r}
        """
    )
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest("-p", "no:randomly", "--llm-base-url", sim.base_url)

    # Then the run's mode (live) decided: real-time calls, no job
    result.assert_outcomes(passed=1)
    assert counters(sim) == (0, 0, 2)
