"""Configuration: one precedence (option > environment > ini > default), clear errors."""

from __future__ import annotations

import pytest

from pytest_llmbench import ConfigError, LLMConfig
from pytest_llmbench.config import build_config, option_reference, resolve_settings

SHOW = """
def test_show(llm_config):
    print("RPM=%s MODEL=%s RUN_DIR=%s" % (llm_config.rpm, llm_config.model,
                                          llm_config.run_dir.name))
"""


@pytest.mark.parametrize(
    ("cli", "env", "ini", "expected"),
    [
        ([], None, None, "RPM=None"),
        ([], None, "5", "RPM=5"),
        ([], "6", "5", "RPM=6"),
        (["--llm-rpm", "7"], "6", "5", "RPM=7"),
        (["--llm-rpm", "7"], None, None, "RPM=7"),
    ],
)
def test_precedence_option_env_ini_default(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    cli: list[str],
    env: str | None,
    ini: str | None,
    expected: str,
) -> None:
    pytester.makepyfile(SHOW)
    if ini is not None:
        pytester.makeini(f"[pytest]\nllm_rpm = {ini}\n")
    if env is not None:
        monkeypatch.setenv("LLMBENCH_RPM", env)
    result = pytester.runpytest("-s", "-p", "no:cacheprovider", *cli)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*{expected} *"])


def test_pyproject_ini_and_env_model(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nllm_model = "gpt-4o"\n')
    pytester.makepyfile(SHOW)
    result = pytester.runpytest("-s")
    result.stdout.fnmatch_lines(["*MODEL=gpt-4o *"])
    monkeypatch.setenv("LLMBENCH_MODEL", "gpt-5-mini")
    result = pytester.runpytest("-s")
    result.stdout.fnmatch_lines(["*MODEL=gpt-5-mini *"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--llm-rpm", "-5"], "*--llm-rpm: *greater than or equal to 1*"),
        (["--llm-rpm", "many"], "*--llm-rpm: invalid value 'many'*"),
        (["--llm-timeout", "0"], "*--llm-timeout: *greater than 0*"),
        (["--llm-temperatures", "0,3"], "*--llm-temperatures: *outside 0..2*"),
        (["--llm-base-url", "localhost:1"], "*--llm-base-url: *http://*"),
        (["--llm-budget", "memcached://x"], "*--llm-budget: *redis://*"),
        (["--llm-gate", "suite:bogus>=1"], "*--llm-gate: *"),
        (["--llm-limit", "0"], "*--llm-limit: must be at least 1*"),
        (
            ["--llm-sim-config", "missing.json", "--llm-sim"],
            "*--llm-sim-config: missing.json: cannot read*",
        ),
    ],
)
def test_bad_values_are_usage_errors_naming_the_option(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


def test_bad_env_names_the_variable(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMBENCH_TPM", "lots")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*environment variable LLMBENCH_TPM: invalid value 'lots'*"])


def test_missing_key_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_call(llm):
            llm.generate_response("hi")
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: no OpenAI API key: set OPENAI_API_KEY, or add --llm-sim*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    # without the plan phase, the run stops the same way (one form for every usage error)
    result = pytester.runpytest("--llm-no-prefetch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: no OpenAI API key: set OPENAI_API_KEY, or add --llm-sim*"])


def test_key_is_secret() -> None:
    key = "sk-test-fake-key-secret-1234567890"
    settings = resolve_settings({}, {}, {})
    config = build_config(settings, env={"OPENAI_API_KEY": key})
    assert config.api_key is not None and config.api_key.get_secret_value() == key
    assert key not in repr(config) and key not in str(config)
    assert key not in config.model_dump_json()


def test_unknown_field_rejected() -> None:
    with pytest.raises(Exception, match="extra"):
        LLMConfig.model_validate({"modle": "x"})


def test_errors_name_option_not_field() -> None:
    with pytest.raises(ConfigError, match=r"^--llm-max-retries: "):
        build_config({"llm_max_retries": -1}, env={})


def test_option_reference_lists_every_flag() -> None:
    table = option_reference()
    for flag in ("--llm-model", "--llm-rpm", "--batch-api", "--llm-gate", "--llm-report"):
        assert flag in table
