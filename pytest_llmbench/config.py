"""Configuration: pydantic models and the ONE table of options.

The table ``OPTIONS`` drives ``pytest_addoption`` (flag and ini key), the environment
lookup and the precedence, and the README's option reference, so the four can never
disagree. Precedence, applied in :func:`resolve_settings`:

    command-line option  >  environment (LLMBENCH_*)  >  ini / [tool.pytest.ini_options]  >  default
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
from .options import DEFAULT_BASE_URL, OPTIONS, OPTIONS_BY_DEST, Option
from .reasoning import check_effort

DEFAULT_MODEL = "gpt-4o-mini"
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
    reasoning_effort: str | None = None
    timeout: float = Field(default=60.0, gt=0, le=3600)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    burst_seconds: float = Field(default=1.0, gt=0, le=60)
    opening_burst: bool = False
    max_concurrency: int = Field(default=64, ge=1, le=4096)
    fixed_concurrency: bool = False
    transport: Literal["aiohttp", "sdk"] = "aiohttp"
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

    @field_validator("reasoning_effort")
    @classmethod
    def _check_effort(cls, value: str | None) -> str | None:
        return None if value is None else check_effort(value)

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


#: seconds a Ctrl-C or SIGTERM waits for the requests in flight (--llm-drain-timeout)
DEFAULT_DRAIN_S = 10.0

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
    no_overlap: bool = False
    drain_timeout: float | None = None
    fresh: bool = False
    record_mode: str | None = None
    cassette_dir: Path | None = None
    report: Path | None = None
    html: Path | None = None
    baseline: Path | None = None
    gate: tuple[str, ...] = ()
    prices: Path | None = None
    max_cost: float | None = None
    estimate: bool = False
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
