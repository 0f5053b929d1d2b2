"""README.md stays true: its option table is the one the code generates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pytest_llmbench.config import option_reference
from pytest_llmbench.sim import SimConfig, Simulator

README = Path(__file__).resolve().parent.parent / "README.md"


def test_option_table_is_generated_from_the_options() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- options-table")
    end = text.index("<!-- /options-table -->")
    table = text[start:end].split("\n", 1)[1].strip()
    assert table == option_reference().strip()


def test_quick_start_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert (
        'pip install -e ".[html]" && pytest -n 8 example_suites --llm-sim --llm-html report.html'
        in text
    )
    assert 'pip install -e ".[test]" && pytest' in text
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -e ".[test]" && pytest' in ci


def code_block(section: str, language: str) -> str:
    """The first ```language block after the heading ``section``."""
    text = README.read_text(encoding="utf-8")
    after = text[text.index(f"\n## {section}\n") :]
    start = after.index(f"```{language}\n") + len(language) + 4
    return after[start : after.index("```", start)]


def run_as_written(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A shell command exactly as the README writes it, with this environment's tools first
    on PATH and no setting of the developer's shell."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLMBENCH_"))}
    clean["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{clean.get('PATH', '')}"
    clean.update(env)
    return subprocess.run(
        command, shell=True, cwd=cwd, env=clean, capture_output=True, text=True, timeout=600
    )


def sent(stdout: str, origin: str) -> int:
    """The requests the summary says this run sent to ``origin`` (-1: no such line)."""
    found = re.search(
        rf"llmbench answers from {re.escape(origin)}: (\d+) request\(s\) sent", stdout
    )
    return int(found.group(1)) if found else -1


def test_quick_start_and_the_client_on_its_own_as_written(tmp_path: Path) -> None:
    """The README's commands, run as written; a second simulator on another port, which
    accepts only its own key, stands in for the real API. The `pip install` halves are
    run by .ci/run on a fresh virtualenv (here they would replace the package under test),
    and the second command's `pytest` is this very test session."""
    commands = [c for c in code_block("Quick start", "bash").splitlines() if c and c[0] != "#"]
    assert commands == [
        'pip install -e ".[html]" && pytest -n 8 example_suites --llm-sim --llm-html report.html',
        'pip install -e ".[test]" && pytest',
    ]
    main = commands[0].split(" && ")[1]
    shutil.copytree(README.parent / "example_suites", tmp_path / "example_suites")

    # 1. the example suites on the built-in simulator
    sim_run = run_as_written(main, tmp_path)
    assert sim_run.returncode == 1, sim_run.stdout[-3000:] + sim_run.stderr[-3000:]
    outcome = re.search(r"\b(\d+) failed, (\d+) passed\b", sim_run.stdout)
    assert outcome and int(outcome[1]) + int(outcome[2]) == 630, sim_run.stdout[-2000:]
    # 630 cases: 180 + 250 one-call cases and 100 + 100 two-call cases make 830 requests
    # (under load a retry may add a request: the count is at least one per call)
    assert sent(sim_run.stdout, "the built-in simulator") >= 830, sim_run.stdout[-2000:]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "test_short_answer" in page and "llmbench" in page
    assert "llmbench consistency: test_short_answer@0.7: maj@5" in sim_run.stdout

    key = "sk-test-fake-readme-standin-0003"
    with Simulator(SimConfig(api_keys=[key]), port=0) as api:
        # 2. "set OPENAI_API_KEY and drop --llm-sim" (the base URL: the stand-in API)
        real = main.replace(" --llm-sim", "")
        api_run = run_as_written(real, tmp_path, OPENAI_API_KEY=key, OPENAI_BASE_URL=api.base_url)
        assert api_run.returncode in (0, 1), api_run.stdout[-3000:] + api_run.stderr[-3000:]
        answered = api.stats()["chat_answered"]
        assert answered >= 830  # every call asked the API: nothing of the simulator's replayed
        assert sent(api_run.stdout, api.base_url) >= 830, api_run.stdout[-2000:]

        # 3. "The client on its own", as written
        script = tmp_path / "client_alone.py"
        script.write_text(code_block("The client on its own", "python"), encoding="utf-8")
        alone = run_as_written(
            f"python {script}", tmp_path, OPENAI_API_KEY=key, OPENAI_BASE_URL=api.base_url
        )
        assert alone.returncode == 0, alone.stderr[-3000:]
        assert api.stats()["chat_answered"] >= answered + 3  # one call, two in batch_generate
        assert set(api.stats()["by_status"]) == {"200"}  # the key it sent was the one set
