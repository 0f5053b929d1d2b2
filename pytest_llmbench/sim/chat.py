"""Chat-completion requests: validation like the API's, and the ``chat.completion`` object.

Shared by the real-time endpoint and the batch lines, so both validate and answer alike.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from . import errors
from .answers import AnswerIndex, body_hash, canonical_body, draw_answer, p_correct_at, truncate
from .answers import prompt_tokens as count_prompt_tokens
from .config import DEFAULT_REASONING_EFFORT, REASONING_EFFORTS, Effort, SimConfig

ROLES = ["system", "user", "assistant", "function", "tool", "developer"]
# Every parameter the SDK's CompletionCreateParams knows: accepted (most are ignored).
KNOWN_PARAMS = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "messages",
        "metadata",
        "modalities",
        "model",
        "moderation",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
MAX_N = 128


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request and what the limits and answers need from it."""

    body: Mapping[str, Any]
    model: str
    messages: list[dict[str, Any]]
    temperature: float
    n: int
    max_tokens: int | None
    seed: int | None
    canonical: str
    hash: str
    prompt_tokens: int
    rate_tokens: int
    reasoning_effort: Effort | None = None  # set for reasoning models only


def validate_chat(body: Any, config: SimConfig) -> ChatRequest:
    """Validate a request body; raises :class:`errors.SimAPIError` (400 or 404)."""
    if not isinstance(body, dict):
        raise errors.invalid_type("body", "an object", body)
    if config.reject_unknown_params:
        unknown = sorted(k for k in body if k not in KNOWN_PARAMS)
        if unknown:
            raise errors.SimAPIError(400, f"Unrecognized request argument supplied: {unknown[0]}")
    model = body.get("model")
    if model is None:
        raise errors.SimAPIError(400, "You must provide a model parameter.", param="model")
    if not isinstance(model, str):
        raise errors.invalid_type("model", "a string", model)
    messages = _messages(body)
    if body.get("stream") is True:
        raise errors.SimAPIError(
            400,
            "Streaming is not supported by the pytest-llmbench simulator; send stream=false.",
            param="stream",
            code="unsupported_parameter",
        )
    temperature = _number(body, "temperature", 0.0, 2.0, default=1.0, integer=False)
    n = int(_number(body, "n", 1, MAX_N, default=1, integer=True))
    max_tokens = _max_tokens(body)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise errors.invalid_type("seed", "an integer", seed)
    if not config.accept_any_model and model not in config.models:
        raise errors.model_not_found(model)
    if model in config.forbidden_models:
        raise errors.no_access(model)
    effort = _reasoning_rules(body, config, model)
    prompt = count_prompt_tokens(messages, model, config.tokenizer)
    reserved = (max_tokens if max_tokens is not None else config.default_max_tokens) * n
    return ChatRequest(
        body=body,
        model=model,
        messages=messages,
        temperature=temperature,
        n=n,
        max_tokens=max_tokens,
        seed=seed,
        canonical=canonical_body(body),
        hash=body_hash(body),
        prompt_tokens=prompt,
        rate_tokens=prompt + reserved,
        reasoning_effort=effort,
    )


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    max_tokens: int | None = None
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            # max_completion_tokens wins when both are given (it is the newer name)
            max_tokens = int(_number(body, name, 1, 10_000_000, default=1, integer=True))
    return max_tokens


def _reasoning_rules(body: Mapping[str, Any], config: SimConfig, model: str) -> Effort | None:
    """What the API's reasoning models refuse (bodies as the API words them), and the
    request's reasoning effort (None for other models, which refuse the parameter)."""
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise errors.invalid_value("reasoning_effort", effort, list(REASONING_EFFORTS))
    if not config.is_reasoning(model):
        if effort is not None:
            raise errors.SimAPIError(
                400,
                "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
                param="reasoning_effort",
                code="unsupported_parameter",
            )
        return None
    if body.get("max_tokens") is not None:
        raise errors.SimAPIError(
            400,
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            param="max_tokens",
            code="unsupported_parameter",
        )
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise errors.SimAPIError(
            400,
            f"Unsupported value: 'temperature' does not support {temperature} with this "
            "model. Only the default (1) value is supported.",
            param="temperature",
            code="unsupported_value",
        )
    return cast(Effort, effort if effort is not None else DEFAULT_REASONING_EFFORT)


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise errors.missing_param("messages")
    if not isinstance(messages, list):
        raise errors.invalid_type("messages", "an array", messages)
    if not messages:
        raise errors.SimAPIError(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise errors.invalid_type(where, "an object", message)
        role = message.get("role")
        if role is None:
            raise errors.missing_param(f"{where}.role")
        if role not in ROLES:
            raise errors.invalid_value(f"{where}.role", role, ROLES)
        content = message.get("content")
        if content is None and role != "assistant":
            raise errors.missing_param(f"{where}.content")
        if content is not None and not isinstance(content, (str, list)):
            raise errors.invalid_type(f"{where}.content", "a string or an array", content)
    return messages


def _number(
    body: Mapping[str, Any],
    name: str,
    low: float,
    high: float,
    *,
    default: float,
    integer: bool,
) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        raise errors.invalid_type(name, "an integer" if integer else "a decimal", value)
    if value < low:
        raise errors.below_min(name, value, low, integer=integer)
    if value > high:
        raise errors.above_max(name, value, high, integer=integer)
    return float(value)


@dataclass(frozen=True)
class Answer:
    """The choices of one answered request and its usage."""

    choices: list[dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int  # reasoning tokens included, as the API counts them
    reasoning_tokens: int = 0


def answer_chat(
    req: ChatRequest, index: AnswerIndex, config: SimConfig, draws_before: int
) -> Answer:
    """Answer ``req`` deterministically; ``draws_before`` = earlier draws of the same body."""
    item = index.find(req.messages)
    p0 = item.p_correct if item is not None and item.p_correct is not None else config.p_correct
    p = p_correct_at(p0, config.temperature_slope, req.temperature)
    # Only sampling without a seed gives a new answer each time; T=0 or a seed repeat it.
    repeat = draws_before if req.temperature > 0 and req.seed is None else 0
    choices = []
    completion = reasoning = 0
    for i in range(req.n):
        text = draw_answer(
            item, canonical=req.canonical, sim_seed=config.seed, choice=i, repeat=repeat, p=p
        )
        thought, text, tokens, finish = _think_then_answer(req, config, text)
        completion += thought + tokens
        reasoning += thought
        choices.append(
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": finish,
            }
        )
    return Answer(choices, req.prompt_tokens, completion, reasoning)


def _think_then_answer(req: ChatRequest, config: SimConfig, text: str) -> tuple[int, str, int, str]:
    """(reasoning tokens, visible text, its tokens, finish_reason) of one choice: the
    reasoning comes first out of ``max_completion_tokens``; when it uses the budget up,
    the content is empty and the choice ends with ``length``, as the API's does."""
    if req.reasoning_effort is None:
        return (0, *truncate(text, req.max_tokens))
    thought = config.reasoning_tokens_per_effort.get(req.reasoning_effort, 0)
    if req.max_tokens is None:
        return (thought, *truncate(text, None))
    if thought >= req.max_tokens:
        return req.max_tokens, "", 0, "length"
    return (thought, *truncate(text, req.max_tokens - thought))


def fingerprint(model: str) -> str:
    """A stable ``system_fingerprint`` per model."""
    return "fp_" + hashlib.sha256(model.encode()).hexdigest()[:10]


def completion_object(req: ChatRequest, answer: Answer, created: int) -> dict[str, Any]:
    """The full ``chat.completion`` object."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:29]}",
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": answer.choices,
        "usage": usage_object(
            answer.prompt_tokens, answer.completion_tokens, answer.reasoning_tokens
        ),
        "service_tier": "default",
        "system_fingerprint": fingerprint(req.model),
    }


def usage_object(prompt: int, completion: int, reasoning: int = 0) -> dict[str, Any]:
    """The API's ``usage``; ``completion`` already includes the ``reasoning`` tokens."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def request_id() -> str:
    return f"req_{uuid.uuid4().hex}"
