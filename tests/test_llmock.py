"""The behaviours the simulator and llmock (PyPI) both implement, run against llmock: a
second, independent mock of the API, so that a test passing only because the simulator
shares the client's misreadings of the reference would show here.

llmock runs as its own process (``python -m llmock.cli serve``) on a free loopback port;
each run is a real pytest process (``runpytest_subprocess``) sending to it over HTTP. What
llmock saw is read from its journal (``GET /_llmock/requests``) and its verdict on the
client (``GET /_llmock/verdict``: e.g. ``retry_after_ignored`` when a retry came before
the ``Retry-After``). The tests are skipped, saying why, only when llmock is not
installed or does not start.

Where llmock differs from the reference (``shared/reference/openai-api.md``), the
reference wins and the tests assert only what both agree on: llmock's bucket holds a
whole minute's allowance from the start (OpenAI enforces a per-minute limit over short
periods), and its Files and Batch calls count against the chat RPM (OpenAI's Batch API
has its own pool), so the rate-limit tests start a fresh llmock without batch traffic.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import FAKE_KEY

#: how long llmock may take to answer /health after it starts (it imports FastAPI)
START_TIMEOUT_S = 20.0

SUITE = """
import pytest

DATA = {data}

@pytest.mark.llmbench(dataset=DATA, temperatures=[0.0], id="id")
def test_q(case, llm):
    r = llm.generate_response(case["question"], max_tokens=5)
    assert r.ok and r.text
"""


class LLMock:
    """One llmock server process: its URLs, its journal and its verdict."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.base_url = url + "/v1"

    def get(self, path: str) -> dict[str, Any]:
        # urllib, not httpx2: pytester restores sys.modules after each test, and an
        # httpx2 imported again maps its transport errors to classes of its own
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            data: dict[str, Any] = json.loads(response.read())
        return data

    def requests(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.get("/_llmock/requests")["requests"]
        return records

    def chat(self) -> list[dict[str, Any]]:
        return [r for r in self.requests() if r["path"] == "/v1/chat/completions"]

    def verdict(self) -> dict[str, Any]:
        return self.get("/_llmock/verdict")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers_health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:  # refused while it starts (URLError is an OSError)
        return False


@pytest.fixture
def start_llmock(tmp_path: Path) -> Iterator[Callable[..., LLMock]]:
    """Start llmock with the given ``serve`` flags (once per test); stopped after it."""
    if importlib.util.find_spec("llmock") is None:
        pytest.skip("llmock is not installed (pip install llmock; it is in the test extra)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*flags: str) -> LLMock:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / f"llmock-{port}.log"
        cmd = [sys.executable, "-m", "llmock.cli", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--log-level", "warning", *flags]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not answers_health(url):
            time.sleep(0.05)  # paces the polling of /health only
        if proc.poll() is not None or not answers_health(url):
            tail = log.read_text(errors="replace")[-400:]
            pytest.skip(f"llmock did not start on {url}: {tail}")
        return LLMock(url)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_suite(
    pytester: pytest.Pytester, mock: LLMock, n: int, *args: str
) -> tuple[pytest.RunResult, str]:
    data = [{"id": f"q{i:03d}", "question": f"What is item {i}?"} for i in range(n)]
    pytester.makepyfile(test_suite=SUITE.format(data=json.dumps(data)))
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "--llm-base-url", mock.base_url, *args
    )
    return result, result.stdout.str() + "\n" + result.stderr.str()


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    return FAKE_KEY


def statuses(records: list[dict[str, Any]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in records:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def test_limits_are_learned_from_llmocks_headers(
    pytester: pytest.Pytester, start_llmock: Callable[..., LLMock], key: str
) -> None:
    # Given llmock enforcing 600 RPM per key, and no limit configured on our side
    mock = start_llmock("--rpm", "600")
    # When a suite of 30 cases runs with two workers
    result, text = run_suite(pytester, mock, 30, "-n", "2")
    # Then every case is answered once, and no request was refused
    result.assert_outcomes(passed=30)
    chat = mock.chat()
    assert statuses(chat) == {200: 30}, statuses(chat)
    # paced by the limit learned from llmock's x-ratelimit-* headers: after the first
    # request (alone) and the budget's one-second burst (10 requests), 10 per second
    assert "llmbench pacing: paced by the server's x-ratelimit headers" in text, text
    starts = sorted(r["started_at"] for r in chat)
    print(f"30 requests sent over {starts[-1] - starts[0]:.2f}s")
    assert starts[-1] - starts[0] >= 1.5, starts[-1] - starts[0]


def test_llmocks_429s_are_waited_out_and_every_case_is_answered(
    pytester: pytest.Pytester, start_llmock: Callable[..., LLMock], key: str
) -> None:
    # Given llmock at 120 RPM (a bucket of 120 that refills 2 per second) and a client
    # that does not pace (--llm-budget none): 130 requests meet a 429 unless sending
    # them takes over 5 s (124 did not, once, on a machine busy compiling: 4.9 s)
    mock = start_llmock("--rpm", "120")
    result, text = run_suite(pytester, mock, 130, "--llm-budget", "none", "--llm-max-retries", "10")
    # Then every case is answered, after 429s that were retried
    result.assert_outcomes(passed=130)
    chat = mock.chat()
    counts = statuses(chat)
    print(f"llmock answered {counts}")
    assert counts.get(200) == 130 and counts.get(429, 0) >= 1, counts
    assert set(counts) == {200, 429}, counts
    assert f"429s {counts[429]}," in text, text
    # and llmock's own verdict: no retry before its Retry-After, no retry storm
    verdict = mock.verdict()
    errors = [f for f in verdict["findings"] if f["severity"] == "error"]
    assert errors == [], errors
    assert "llmbench pacing: not paced (--llm-budget none)" in text


def test_one_batch_job_against_llmock(
    pytester: pytest.Pytester, start_llmock: Callable[..., LLMock], key: str
) -> None:
    mock = start_llmock()
    result, text = run_suite(pytester, mock, 4, "--batch-api", "--llm-batch-poll", "0.2")
    result.assert_outcomes(passed=4)
    seen = [(r["method"], r["path"]) for r in mock.requests()]
    assert seen.count(("POST", "/v1/files")) == 1
    assert seen.count(("POST", "/v1/batches")) == 1
    assert ("POST", "/v1/chat/completions") not in seen  # every answer came from the job
    assert "llmbench batch:" in text
    assert "(batch, model" in text  # the summary's mode


def busiest_second(times: list[float]) -> int:
    """The most of ``times`` within any one second."""
    times = sorted(times)
    return max((sum(t <= u < t + 1.0 for u in times) for t in times), default=0)


def test_the_opening_burst_spends_llmocks_full_bucket_without_a_429(
    pytester: pytest.Pytester, start_llmock: Callable[..., LLMock], key: str
) -> None:
    # Given llmock at 600 RPM, whose bucket holds the minute's 600 requests from the start
    # (its first answer says 599 remain), and a client told it may spend them
    mock = start_llmock("--rpm", "600")
    result, text = run_suite(pytester, mock, 60, "-n", "2", "--llm-opening-burst")
    # Then the cases go out far faster than the steady 10 per second (whose budget lets
    # 21 through in a second at most: the first alone, its 1 s cap, 10 refilled), and
    # llmock refused none of them
    result.assert_outcomes(passed=60)
    chat = mock.chat()
    assert statuses(chat) == {200: 60}, statuses(chat)
    peak = busiest_second([r["started_at"] for r in chat])
    print(f"llmock saw {peak} requests start in the busiest second")
    assert peak >= 40, peak
    assert "the opening burst allowed up to 599 requests at once" in text, text
    errors = [f for f in mock.verdict()["findings"] if f["severity"] == "error"]
    assert errors == [], errors
