"""Reasoning models (OpenAI's gpt-5 and o-series families): what they refuse and accept.

Such a model refuses ``max_tokens`` (400 ``unsupported_parameter``: "Use
'max_completion_tokens' instead") and any ``temperature`` but the default 1 (400
``unsupported_value``); it accepts ``reasoning_effort``; and it spends hidden reasoning
tokens that ``usage.completion_tokens_details.reasoning_tokens`` counts, which are billed
as output and already included in ``completion_tokens``. ``max_completion_tokens``
bounds those reasoning tokens plus the visible answer.

:func:`is_reasoning_model` knows the families by name; the simulator answers the same
families (its ``reasoning_models`` default) by the same rule (:func:`in_families`). The
client renames ``max_tokens`` for them and the plugin refuses a suite's temperatures at
collection time. A model it does not know is still stopped at run time by the API's first
refusal (exit status 6). This module imports nothing: the simulator shares it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "REASONING_EFFORTS",
    "REASONING_FAMILIES",
    "check_effort",
    "in_families",
    "is_reasoning_model",
    "temperature_problem",
]

#: model families that reason (a name is one, or one followed by ``-`` or ``.``)
REASONING_FAMILIES = ("gpt-5", "o1", "o3", "o4")
#: ``reasoning_effort`` values the option and the marker accept (``none``: gpt-5.1 and
#: later; ``xhigh``: the newest models; which model takes which is the API's call)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def is_reasoning_model(name: str | None) -> bool:
    """Whether ``name`` is of a reasoning family: gpt-5, gpt-5-mini, gpt-5-nano,
    gpt-5.1, o1, o3, o3-mini, o4-mini and their dated snapshots (``gpt-5-2025-08-07``),
    also behind a gateway's ``provider/`` prefix; not the ``-chat`` models
    (``gpt-5-chat-latest``), which are ordinary chat models."""
    return in_families(name, REASONING_FAMILIES)


def in_families(name: str | None, families: Iterable[str]) -> bool:
    """Whether model ``name`` (after any ``provider/``) is one of ``families`` or starts
    with one and ``-`` or ``.`` (a size, a version, a snapshot date), unless ``-chat``
    follows (``gpt-5-chat-latest``, ``gpt-5.1-chat-latest``); case-insensitive."""
    if not name:
        return False
    model = name.lower().rsplit("/", 1)[-1]
    for family in (f.lower() for f in families):
        if model == family or model.startswith((family + "-", family + ".")):
            rest = model[len(family) :].lstrip(".0123456789")
            return not rest.startswith("-chat")
    return False


def check_effort(value: str) -> str:
    """``value`` as a reasoning effort; raises ValueError naming the accepted ones."""
    effort = value.strip().lower()
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"{value!r} is not a reasoning effort; use {', '.join(REASONING_EFFORTS)}")
    return effort


def temperature_problem(
    model: str, suite: str, temperatures: Sequence[float | None], *, from_option: bool
) -> str | None:
    """The one line refusing a suite's temperatures on a reasoning model, or None.

    A reasoning model accepts only the default temperature (1): every other one would be
    refused by the API request after request.
    """
    if not is_reasoning_model(model):
        return None
    refused = [t for t in temperatures if t is not None and t != 1]
    if not refused:
        return None
    listed = ", ".join(f"{t:g}" for t in temperatures if t is not None)
    fix = (
        f"drop --llm-temperatures {listed.replace(', ', ',')} or set it to 1"
        if from_option
        else f"drop temperatures=[{listed}] or use --llm-temperatures 1"
    )
    return f"{suite}: model {model} accepts only the default temperature (1); {fix}"
