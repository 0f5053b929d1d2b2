"""Configuration: pydantic models and the ONE table of options.

The table ``OPTIONS`` drives ``pytest_addoption`` (flag and ini key), the environment
lookup and the precedence, and the README's option reference, so the four can never
disagree. Precedence, applied in :func:`resolve_settings`:

    command-line option  >  environment (LLMBENCH_*)  >  ini / [tool.pytest.ini_options]  >  default
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: the environment variable of the API key; never an option (shell history, CI logs)
KEY_ENV = "OPENAI_API_KEY"


class BatchSettings(BaseModel):
    """Settings of ``--batch-api`` runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    poll_interval: float = Field(default=5.0, gt=0, le=600)
    completion_window: Literal["24h"] = "24h"
    timeout: float | None = Field(default=None, gt=0)
    detach: bool = False
    fallback: Literal["none", "live"] = "none"
    max_rounds: int = Field(default=5, ge=1, le=100)
    max_attempts: int = Field(default=3, ge=1, le=20)


class LLMConfig(BaseModel):
    """Everything a client needs to reach the API and pace itself.

    Build it directly (``LLMConfig(model="gpt-4o", rpm=500)``), or let the plugin build
    it from options, environment and ini. Fields not given are read from the same
    environment the plugin reads (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
    ``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID`` and the ``LLMBENCH_*`` variables), so a
    client built on its own behaves like the plugin's. The API key is a
    :class:`SecretStr`: it never shows in a repr, a log line or an error message.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    api_key: SecretStr | None = None
    base_url: str | None = None
    organization: str | None = None
    project: str | None = None
    model: str = DEFAULT_MODEL
    max_tokens: int = Field(default=256, ge=1, le=1_000_000)
    timeout: float = Field(default=60.0, gt=0, le=3600)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    burst_seconds: float = Field(default=1.0, gt=0, le=60)
    max_concurrency: int = Field(default=64, ge=1, le=4096)
    max_retries: int = Field(default=6, ge=0, le=100)
    backoff_min: float = Field(default=0.5, ge=0, le=600)
    backoff_max: float = Field(default=30.0, gt=0, le=3600)
    max_retry_after: float = Field(default=120.0, gt=0, le=86400)
    run_dir: Path = Path(".llmbench")
    budget_url: str | None = None
    batch: BatchSettings = BatchSettings()

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any, info: ValidationInfo) -> Any:
        """Fill the fields that were not given from the environment (context ``env``
        replaces ``os.environ``, for the plugin and for tests)."""
        if not isinstance(data, dict):
            return data
        env = (info.context or {}).get("env", os.environ)
        return _env_defaults(data, env)

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @field_validator("budget_url")
    @classmethod
    def _check_budget(cls, value: str | None) -> str | None:
        if value in (None, "", "file"):
            return None
        assert value is not None
        if value != "none" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be 'file', 'none' or a redis://host:port/db URL")
        return value

    def with_changes(self, **changes: Any) -> LLMConfig:
        """A validated copy with some fields changed (the environment is not read again)."""
        data = self.model_dump()
        data.update(changes)
        return LLMConfig.model_validate(data, context={"env": {}})

    @property
    def endpoint(self) -> str:
        """The base URL requests go to (the public API when none is configured)."""
        return self.base_url or DEFAULT_BASE_URL


# ---------------------------------------------------------------------------------------
# The option table


def _float_list(text: str) -> list[float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise ValueError("expected a comma-separated list of numbers, e.g. 0,0.7")
    values = [float(p) for p in parts]
    for v in values:
        if not 0.0 <= v <= 2.0:
            raise ValueError(f"temperature {v:g} is outside 0..2")
    return values


def _record_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in ("none", "once", "new_episodes", "all"):
        raise ValueError("expected one of none, once, new_episodes, all")
    return mode


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


@dataclass(frozen=True)
class Option:
    """One setting: where it comes from and where it goes."""

    dest: str  # also the ini key and the argparse dest
    flag: str | None  # command-line flag; None for ini/env-only settings
    env: str | None
    field: str | None  # dotted LLMConfig field, or None for plugin-only settings
    help: str
    parse: Callable[[str], Any] = str
    kind: Literal["value", "flag", "append"] = "value"
    metavar: str | None = None
    extra_env: tuple[str, ...] = ()  # fallbacks after ``env`` (OPENAI_*)
    default: str | None = None  # shown in the README; LLMConfig fields show their own

    @property
    def name(self) -> str:
        return self.flag or self.dest


OPTIONS: tuple[Option, ...] = (
    Option("llm_model", "--llm-model", "LLMBENCH_MODEL", "model", "model to call", metavar="NAME"),
    Option(
        "llm_base_url",
        "--llm-base-url",
        "LLMBENCH_BASE_URL",
        "base_url",
        "OpenAI-compatible API base URL",
        metavar="URL",
        extra_env=("OPENAI_BASE_URL",),
        default=f"`{DEFAULT_BASE_URL}`",
    ),
    Option(
        "llm_organization",
        "--llm-organization",
        "LLMBENCH_ORGANIZATION",
        "organization",
        "OpenAI organization id",
        extra_env=("OPENAI_ORG_ID",),
    ),
    Option(
        "llm_project",
        "--llm-project",
        "LLMBENCH_PROJECT",
        "project",
        "OpenAI project id",
        extra_env=("OPENAI_PROJECT_ID",),
    ),
    Option(
        "llm_max_tokens",
        "--llm-max-tokens",
        "LLMBENCH_MAX_TOKENS",
        "max_tokens",
        "default max_tokens per call",
        int,
        metavar="N",
    ),
    Option(
        "llm_timeout",
        "--llm-timeout",
        "LLMBENCH_TIMEOUT",
        "timeout",
        "seconds before one HTTP request times out (then retried)",
        float,
        metavar="S",
    ),
    Option(
        "llm_rpm",
        "--llm-rpm",
        "LLMBENCH_RPM",
        "rpm",
        "requests per minute the account allows",
        int,
        metavar="N",
        default="learned from headers",
    ),
    Option(
        "llm_tpm",
        "--llm-tpm",
        "LLMBENCH_TPM",
        "tpm",
        "tokens per minute the account allows",
        int,
        metavar="N",
        default="learned from headers",
    ),
    Option(
        "llm_burst_seconds",
        "--llm-burst-seconds",
        "LLMBENCH_BURST_SECONDS",
        "burst_seconds",
        "burst cap of the shared budget, in seconds of refill",
        float,
        metavar="S",
    ),
    Option(
        "llm_concurrency",
        "--llm-concurrency",
        "LLMBENCH_CONCURRENCY",
        "max_concurrency",
        "requests in flight at most per process",
        int,
        metavar="N",
    ),
    Option(
        "llm_max_retries",
        "--llm-max-retries",
        "LLMBENCH_MAX_RETRIES",
        "max_retries",
        "retries per call after the first attempt",
        int,
        metavar="N",
    ),
    Option(
        "llm_backoff_min",
        "--llm-backoff-min",
        "LLMBENCH_BACKOFF_MIN",
        "backoff_min",
        "first backoff step in seconds",
        float,
        metavar="S",
    ),
    Option(
        "llm_backoff_max",
        "--llm-backoff-max",
        "LLMBENCH_BACKOFF_MAX",
        "backoff_max",
        "longest backoff in seconds",
        float,
        metavar="S",
    ),
    Option(
        "llm_run_dir",
        "--llm-run-dir",
        "LLMBENCH_RUN_DIR",
        "run_dir",
        "where responses, budget state and batch jobs live",
        Path,
        metavar="DIR",
    ),
    Option(
        "llm_budget",
        "--llm-budget",
        "LLMBENCH_BUDGET",
        "budget_url",
        "shared budget: 'file' (one machine), redis://host:port/db (several) or 'none'",
        metavar="URL",
        default="`file`",
    ),
    Option(
        "llm_batch_poll",
        "--llm-batch-poll",
        "LLMBENCH_BATCH_POLL",
        "batch.poll_interval",
        "seconds between Batch API polls",
        float,
        metavar="S",
    ),
    Option(
        "llm_batch_timeout",
        "--llm-batch-timeout",
        "LLMBENCH_BATCH_TIMEOUT",
        "batch.timeout",
        "give up waiting for batch jobs after S seconds (they resume next run)",
        float,
        metavar="S",
        default="wait until done",
    ),
    Option(
        "llm_batch_detach",
        "--llm-batch-detach",
        "LLMBENCH_BATCH_DETACH",
        "batch.detach",
        "submit the batch job(s) and exit; the next run collects",
        _bool,
        kind="flag",
    ),
    Option(
        "llm_batch_fallback",
        "--llm-batch-fallback",
        "LLMBENCH_BATCH_FALLBACK",
        "batch.fallback",
        "'none' or 'live': call the API for lines the Batch API failed",
        metavar="MODE",
    ),
    Option(
        "llm_batch_max_rounds",
        "--llm-batch-max-rounds",
        "LLMBENCH_BATCH_MAX_ROUNDS",
        "batch.max_rounds",
        "rounds of dependent calls at most",
        int,
        metavar="N",
    ),
    # plugin-only settings
    Option(
        "batch_api",
        "--batch-api",
        "LLMBENCH_BATCH_API",
        "batch.enabled",
        "fetch every response through one Batch API job (half price)",
        _bool,
        kind="flag",
    ),
    Option(
        "llm_sim",
        "--llm-sim",
        "LLMBENCH_SIM",
        None,
        "run against the built-in OpenAI simulator (no key, no network)",
        _bool,
        kind="flag",
    ),
    Option(
        "llm_temperatures",
        "--llm-temperatures",
        "LLMBENCH_TEMPERATURES",
        None,
        "temperatures for every llmbench suite, overriding the marker",
        _float_list,
        metavar="T,T",
        default="the marker's",
    ),
    Option(
        "llm_limit",
        "--llm-limit",
        "LLMBENCH_LIMIT",
        None,
        "keep the first N items of each dataset",
        int,
        metavar="N",
        default="all items",
    ),
    Option(
        "llm_sample",
        "--llm-sample",
        "LLMBENCH_SAMPLE",
        None,
        "keep a seeded sample of N items of each dataset",
        int,
        metavar="N",
        default="all items",
    ),
    Option(
        "llm_seed",
        "--llm-seed",
        "LLMBENCH_SEED",
        None,
        "seed of --llm-sample",
        str,
        metavar="S",
        default="`0`",
    ),
    Option(
        "llm_no_prefetch",
        "--llm-no-prefetch",
        "LLMBENCH_NO_PREFETCH",
        None,
        "do not plan and prefetch requests; each test calls the API itself",
        _bool,
        kind="flag",
    ),
    Option(
        "llm_fresh",
        "--llm-fresh",
        "LLMBENCH_FRESH",
        None,
        "ignore stored responses (new ones are still saved)",
        _bool,
        kind="flag",
    ),
    Option(
        "llm_record_mode",
        "--llm-record-mode",
        "LLMBENCH_RECORD_MODE",
        None,
        "cassettes: none (replay only), once, new_episodes or all, as vcrpy means them",
        _record_mode,
        metavar="MODE",
        default="`none` when the suites have cassettes and no key is set, else no cassettes",
    ),
    Option(
        "llm_cassette_dir",
        "--llm-cassette-dir",
        "LLMBENCH_CASSETTE_DIR",
        None,
        "where cassettes live",
        Path,
        metavar="DIR",
        default="`cassettes/<module>/` beside each suite",
    ),
    Option(
        "llm_report",
        "--llm-report",
        "LLMBENCH_REPORT",
        None,
        "write the JSON report to PATH (its directory must exist)",
        Path,
        metavar="PATH",
        default="no report",
    ),
    Option(
        "llm_gate",
        "--llm-gate",
        None,
        None,
        "CI gate 'suite[@T]:metric>=value' (repeatable); gates decide the exit status",
        kind="append",
        metavar="GATE",
        default="no gates",
    ),
    Option(
        "llm_prices",
        "--llm-prices",
        "LLMBENCH_PRICES",
        None,
        "JSON file of USD prices per 1M tokens, overriding the built-in table",
        Path,
        metavar="FILE",
        default="the built-in table",
    ),
    Option(
        "llm_sim_config",
        "--llm-sim-config",
        "LLMBENCH_SIM_CONFIG",
        None,
        "JSON file of simulator settings for --llm-sim",
        Path,
        metavar="FILE",
    ),
)

OPTIONS_BY_DEST = {o.dest: o for o in OPTIONS}

#: not options: knobs for this project's own tests, read from the environment only
BATCH_MAX_REQUESTS_ENV = "LLMBENCH_BATCH_MAX_REQUESTS"  # requests per batch file (50,000)


@dataclass(frozen=True)
class RunSettings:
    """The plugin's own settings (those not in :class:`LLMConfig`), parsed once.

    Field names are the option destinations less ``llm_``; ``None`` means not given.
    """

    sim: bool = False
    temperatures: tuple[float, ...] | None = None
    limit: int | None = None
    sample: int | None = None
    seed: str | None = None
    no_prefetch: bool = False
    fresh: bool = False
    record_mode: str | None = None
    cassette_dir: Path | None = None
    report: Path | None = None
    gate: tuple[str, ...] = ()
    prices: Path | None = None
    sim_config: Path | None = None
    batch_max_requests: int | None = None

    @classmethod
    def from_resolved(
        cls, settings: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> RunSettings:
        """From :func:`resolve_settings` output (and the environment's test knobs)."""
        values: dict[str, Any] = {}
        for option in OPTIONS:
            if option.field is not None or option.dest not in settings:
                continue
            value = settings[option.dest]
            values[option.dest.removeprefix("llm_")] = (
                tuple(value) if isinstance(value, list) else value
            )
        for knob in ("limit", "sample"):
            if values.get(knob) is not None and values[knob] < 1:
                raise ConfigError(f"--llm-{knob}: must be at least 1, got {values[knob]}")
        raw = (os.environ if env is None else env).get(BATCH_MAX_REQUESTS_ENV, "")
        if raw:
            try:
                values["batch_max_requests"] = max(1, int(raw))
            except ValueError:
                raise ConfigError(f"{BATCH_MAX_REQUESTS_ENV}: not a number: {raw!r}") from None
        return cls(**values)


def _parse(option: Option, raw: Any, origin: str) -> Any:
    if raw is None:
        return None
    if option.kind == "append":
        items = raw if isinstance(raw, list) else [raw]
        return [str(i).strip() for i in items if str(i).strip()]
    if not isinstance(raw, str):
        return raw  # already typed by argparse
    try:
        return option.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{origin}: invalid value {raw!r}: {exc}") from None


def resolve_settings(
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    ini: Mapping[str, Any],
) -> dict[str, Any]:
    """Merge the sources for every option in ``OPTIONS``; returns ``{dest: value}``.

    ``cli`` holds argparse values (None or False/[] when not given), ``ini`` the raw ini
    values (None or empty when unset). Values that are still None are left out.
    """
    result: dict[str, Any] = {}
    for option in OPTIONS:
        value: Any = None
        given = cli.get(option.dest)
        if given not in (None, False, []):
            value = _parse(option, given, option.name)
        else:
            for var in (option.env, *option.extra_env):
                if var and env.get(var, "") != "":
                    value = _parse(option, env[var], f"environment variable {var}")
                    break
            else:
                raw_ini = ini.get(option.dest)
                if raw_ini not in (None, "", []):
                    value = _parse(option, raw_ini, f"ini option {option.dest}")
        if value is not None:
            result[option.dest] = value
    return result


def _env_defaults(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``data`` plus, for each LLMConfig field it does not name, the environment's value."""
    out = dict(data)
    if "api_key" not in out and env.get(KEY_ENV, ""):
        out["api_key"] = SecretStr(env[KEY_ENV])
    batch = dict(out["batch"]) if isinstance(out.get("batch"), Mapping) else None
    for option in OPTIONS:
        if option.field is None:
            continue
        name = option.field.removeprefix("batch.")
        target = out
        if option.field.startswith("batch."):
            if "batch" in out and batch is None:
                continue  # a BatchSettings object was given whole
            batch = batch if batch is not None else {}
            target = batch
        if name in target:
            continue
        for var in (option.env, *option.extra_env):
            if var and env.get(var, "") != "":
                try:
                    target[name] = option.parse(env[var])
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"environment variable {var}: {exc}") from None
                break
    if batch:
        out["batch"] = batch
    return out


def _first_error(exc: ValidationError) -> tuple[str, str]:
    """The location and message of a validation error, without pydantic's prefixes."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    message = str(first["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return loc, message


def build_config(settings: Mapping[str, Any], env: Mapping[str, str] | None = None) -> LLMConfig:
    """Build an :class:`LLMConfig` from resolved settings, naming the option on error.

    ``settings`` already holds the environment's values (precedence applied by
    :func:`resolve_settings`); the key comes from ``env`` alone.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    batch: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for dest, value in settings.items():
        option = OPTIONS_BY_DEST[dest]
        if option.field is None:
            continue
        if option.field.startswith("batch."):
            batch[option.field.split(".", 1)[1]] = value
            origin["batch." + option.field.split(".", 1)[1]] = option.name
        else:
            data[option.field] = value
            origin[option.field] = option.name
    if batch:
        data["batch"] = batch
    key_env = {KEY_ENV: env[KEY_ENV]} if env.get(KEY_ENV) else {}
    try:
        return LLMConfig.model_validate(data, context={"env": key_env})
    except ValidationError as exc:
        loc, message = _first_error(exc)
        raise ConfigError(f"{origin.get(loc, loc)}: {message}") from None


def default_text(option: Option) -> str:
    """The default of an option as the README shows it."""
    if option.default is not None:
        return option.default
    if option.kind == "flag":
        return "off"
    if option.field is None:
        return "-"
    owner: type[BaseModel] = LLMConfig
    name = option.field
    if name.startswith("batch."):
        owner, name = BatchSettings, name.removeprefix("batch.")
    value = owner.model_fields[name].default
    if value is None:
        return "-"
    return f"`{value}`"


def option_reference() -> str:
    """The README's option table, generated from ``OPTIONS``."""
    rows = [
        "| option | ini key | environment | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in OPTIONS:
        flag = f"`{o.flag}`" if o.flag else ""
        if o.metavar:
            flag = f"`{o.flag} {o.metavar}`"
        env = ", ".join(f"`{v}`" for v in (o.env, *o.extra_env) if v)
        rows.append(f"| {flag} | `{o.dest}` | {env} | {default_text(o)} | {o.help} |")
    return "\n".join(rows)
