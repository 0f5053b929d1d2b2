"""Secrets: a recognisable fake key, and every file and output of runs that write all they can.

Three runs write everything a run writes (the store, the JSON report, JUnit XML, the HTML
report where its extra is installed, log files at DEBUG with the SDK's own debug logging
on, cassettes, a Batch API run's input files), and a fourth has its key refused. Then
every file under the project, every captured output and every file uploaded to the
server are searched for the key and for a fragment of it: none may hold either. The key
goes only to the configured base URL: the server there accepts that key alone (so each
request it answered carried it), while a second server, named by ``OPENAI_BASE_URL`` as
the SDK's default, must see no request at all.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from typing import Any

# imported before any in-process pytester run records a cassette (tests/test_cassettes.py
# says why: libyaml cannot be imported twice, httpx2 keeps the first httpcore2 it saw)
import httpcore2  # noqa: F401
import openai
import pytest
import vcr  # noqa: F401

from pytest_llmbench.errors import FATAL_EXIT_STATUS
from pytest_llmbench.sim import SimConfig, Simulator

from ..helpers import answer_key
from ..test_plugin import write_dataset
from .harness import FAST_BATCHES, QA_SUITE

SECRET = "sk-test-fake-key-SECRETSCAN-4242"  # fake, and easy to find
FRAGMENT = b"SECRETSCAN"  # a masked or cut key still shows it
N = 10


def leaks(data: bytes) -> bool:
    return SECRET.encode() in data or FRAGMENT in data


def test_secrets(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, survives: Callable[..., Any]
) -> None:
    key = answer_key(write_dataset(pytester.path / "data.jsonl", N))
    pytester.makepyfile(test_suite=QA_SUITE)
    pytester.makeini("[pytest]\n")
    html = ["--llm-html", "h.html"] if _has("plotly", "jinja2") else []
    outputs: list[str] = []
    with (
        Simulator(
            SimConfig(
                api_keys=[SECRET],
                answer_key=key,
                p_correct=1.0,
                temperature_slope=0,
                **FAST_BATCHES,
            ),
            port=0,
        ) as api,
        Simulator(SimConfig(), port=0) as decoy,
    ):
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        monkeypatch.setenv("OPENAI_BASE_URL", decoy.base_url)  # the SDK's default server
        monkeypatch.setenv("OPENAI_LOG", "debug")  # the SDK logs its requests too
        logs = ("--log-file-level=DEBUG", "--log-level=DEBUG")

        def run(*args: str) -> pytest.RunResult:
            result = pytester.runpytest(f"--llm-base-url={api.base_url}", *logs, *args)
            outputs.extend([result.stdout.str(), result.stderr.str()])
            return result

        # Given runs that write all they can (each at its own temperature, so no run
        # asks what another one already has)
        runs = [
            run("-n", "2", "-rA", "-v", "--llm-report=r.json", "--junitxml=j.xml", *html,
                "-o", "log_file=run.log"),
            run("--llm-temperatures=0.5", "--llm-run-dir=cassette-run",
                "--llm-record-mode=once", "--llm-cassette-dir=cassettes", "--llm-report=c.json",
                "-o", "log_file=cassette.log"),
            run("-n", "2", "--llm-temperatures=1.0", "--llm-run-dir=batch-run", "--batch-api",
                "--llm-batch-poll=0.05", "--llm-report=b.json", "-o", "log_file=batch.log"),
        ]  # fmt: skip
        reports = [
            json.loads((pytester.path / n).read_text()) for n in ("r.json", "c.json", "b.json")
        ]
        assert all(r.ret == 0 for r in runs), outputs
        assert all(r["totals"]["passed"] == N for r in reports)
        assert (pytester.path / "cassettes").is_dir() and any(
            (pytester.path / "batch-run").iterdir()
        )
        # every request the server answered carried the key (it accepts no other), and
        # the Batch API run uploaded its input files there
        stats = api.stats()
        assert stats["by_status"].get("401", 0) == 0 and stats["files_uploaded"] >= 1
        client = openai.OpenAI(api_key=SECRET, base_url=api.base_url, max_retries=0)
        uploads = [client.files.content(f.id).read() for f in client.files.list().data]
        inputs = [u for u in uploads if b'"custom_id"' in u and b'"method"' in u]
        assert inputs and all(b"chat/completions" in u for u in inputs)

        # And a run whose key the server refuses
        api.configure(api_keys=["sk-test-fake-key-only-this-one"])
        refused = run("-n", "2", "--llm-fresh", "--llm-no-prefetch", "-o", "log_file=refused.log")
        assert refused.ret == FATAL_EXIT_STATUS
        assert "authentication failed (401)" in refused.stdout.str()
        decoy_requests = decoy.stats()["requests_total"]
        carried = stats["requests_total"]
        paid_twice = api.stats()["duplicate_bodies"]

    # Then no file, output or uploaded input file holds the key or a piece of it
    files = [p for p in pytester.path.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".sqlite3", ".json", ".xml", ".log", ".yaml"} <= kinds, kinds
    assert ".html" in kinds or not html
    found = [str(p) for p in files if leaks(p.read_bytes())]
    found += [f"output {i}" for i, text in enumerate(outputs) if leaks(text.encode())]
    found += [f"upload {i}" for i, data in enumerate(uploads) if leaks(data)]
    assert found == []
    # and only the configured server saw a request: the SDK's default one saw none
    assert decoy_requests == 0
    scanned = sum(p.stat().st_size for p in files) + sum(len(t) for t in outputs)
    survives(
        item="secrets",
        cases=sum(r["totals"]["cases"] for r in reports),
        faults=(
            f"a recognisable key; {len(files)} files, {len(outputs)} outputs, "
            f"{len(inputs)} batch input files ({scanned // 1024} KB) searched; "
            "OPENAI_BASE_URL naming a second server"
        ),
        retries=sum(r["totals"]["retries"] for r in reports),
        paid_twice=paid_twice,
        lost=sum(N - r["totals"]["cases"] for r in reports),
        outcome=(
            f"key found {len(found)} times; the configured server got it on "
            f"{carried} requests, the second server saw {decoy_requests}"
        ),
    )


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)
