"""The ONE table of options: each setting's flag, ini key, environment variables, parser,
LLMConfig field and README text. ``config.py`` applies it (precedence, validation);
``plugin.py`` registers it with pytest; the README's option table is generated from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .reasoning import check_effort

DEFAULT_BASE_URL = "https://api.openai.com/v1"


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


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("expected a number of seconds, 0 or more")
    return value


def _usd(text: str) -> float:
    value = float(text.strip().removeprefix("$"))
    if not value > 0 or value == float("inf"):
        raise ValueError("expected a cost in USD, more than 0 (e.g. 0.50)")
    return value


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
        "default max_tokens per call (on reasoning models it bounds reasoning plus answer)",
        int,
        metavar="N",
    ),
    Option(
        "llm_reasoning_effort",
        "--llm-reasoning-effort",
        "LLMBENCH_REASONING_EFFORT",
        "reasoning_effort",
        "reasoning_effort of every call, overriding the marker's (reasoning models only: "
        "none, minimal, low, medium, high or xhigh)",
        check_effort,
        metavar="EFFORT",
        default="the marker's, else the model's own",
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
        "llm_opening_burst",
        "--llm-opening-burst",
        "LLMBENCH_OPENING_BURST",
        "opening_burst",
        "spend at once the requests and tokens the first answer's x-ratelimit-remaining "
        "headers advertise, beyond the burst cap (for a server whose bucket starts full, "
        "such as llmock; OpenAI refuses such a burst)",
        _bool,
        kind="flag",
    ),
    Option(
        "llm_concurrency",
        "--llm-concurrency",
        "LLMBENCH_CONCURRENCY",
        "max_concurrency",
        "requests in flight at most per process; fewer while more would only queue at the "
        "server (latency rises, throughput does not; see --llm-concurrency-fixed)",
        int,
        metavar="N",
    ),
    Option(
        "llm_concurrency_fixed",
        "--llm-concurrency-fixed",
        "LLMBENCH_CONCURRENCY_FIXED",
        "fixed_concurrency",
        "keep --llm-concurrency requests in flight from the start, instead of adapting "
        "to what the server's throughput gains from them",
        _bool,
        kind="flag",
    ),
    Option(
        "llm_transport",
        "--llm-transport",
        "LLMBENCH_TRANSPORT",
        "transport",
        "how the concurrent fetch sends plain chat requests: aiohttp (the SDK's own transport "
        "for concurrency, without its per-request object layer; same URL, JSON, auth and "
        "error classes) or sdk (AsyncOpenAI for every request)",
        metavar="aiohttp|sdk",
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
        "llm_no_overlap",
        "--llm-no-overlap",
        "LLMBENCH_NO_OVERLAP",
        None,
        "fetch every planned answer before the first test runs (by default the tests "
        "run while the prefetch fetches, each waiting for its own answer)",
        _bool,
        kind="flag",
    ),
    Option(
        "llm_drain_timeout",
        "--llm-drain-timeout",
        "LLMBENCH_DRAIN_TIMEOUT",
        None,
        "on Ctrl-C or SIGTERM during the prefetch: seconds to wait for the requests in "
        "flight (their answers are stored) before exiting; a second Ctrl-C exits at once",
        _seconds,
        metavar="S",
        default="`10`",
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
        "llm_html",
        "--llm-html",
        "LLMBENCH_HTML",
        None,
        "write a self-contained HTML report to PATH (needs the `html` extra)",
        Path,
        metavar="PATH",
        default="no HTML report",
    ),
    Option(
        "llm_baseline",
        "--llm-baseline",
        "LLMBENCH_BASELINE",
        None,
        "compare with an earlier run's JSON report (--llm-report) item by item",
        Path,
        metavar="REPORT",
        default="no baseline",
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
        "llm_estimate",
        "--llm-estimate",
        "LLMBENCH_ESTIMATE",
        None,
        "plan the run and print per suite its requests, prompt tokens, output bound and "
        "cost range; send nothing (the tests are deselected)",
        _bool,
        kind="flag",
    ),
    Option(
        "llm_max_cost",
        "--llm-max-cost",
        "LLMBENCH_MAX_COST",
        None,
        "stop sending (exit status 6) before this run's spend could pass USD, at the price "
        "table's prices; stored answers are kept",
        _usd,
        metavar="USD",
        default="no cap",
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
