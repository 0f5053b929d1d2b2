"""Estimated cost of a run: a table of USD per 1M tokens per model.

The built-in table (``DEFAULT_PRICES``) holds OpenAI's list prices for standard
processing at the time of writing; prices change, so ``--llm-prices FILE`` overrides
or extends it with a JSON object ``{"model": {"input": 0.15, "output": 0.6}}`` (USD per
1M prompt and completion tokens). Batch API answers cost ``BATCH_DISCOUNT`` of the list
price. Cached-input discounts are not modelled: the estimate is an upper bound there.

A model is looked up by its exact name first, then by the longest table entry that is a
prefix of it followed by ``-``, so ``gpt-4o-mini-2024-07-18`` is priced as
``gpt-4o-mini`` and not as ``gpt-4o``. A model the table does not know has no cost
(``None``, shown as ``?``): guessing a price would put a wrong number in a CI log.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ConfigError

__all__ = ["BATCH_DISCOUNT", "DEFAULT_PRICES", "Price", "PriceTable"]

#: Fraction of the list price charged for an answer from the Batch API.
BATCH_DISCOUNT = 0.5

_PER = 1_000_000


class Price(NamedTuple):
    """USD per 1M prompt (``input``) and completion (``output``) tokens."""

    input: float
    output: float


#: USD per 1M tokens, standard processing (OpenAI list prices, 2025; gpt-5 family as of
#: its launch, 2025-08-07).
DEFAULT_PRICES: Mapping[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "o4-mini": Price(1.10, 4.40),
    # o-series list prices as of 2025-08 (o3 after its June 2025 price cut); reasoning
    # tokens are billed as output and are part of completion_tokens, so priced there once
    "o1": Price(15.00, 60.00),
    "o1-mini": Price(1.10, 4.40),
    "o3": Price(2.00, 8.00),
    "o3-mini": Price(1.10, 4.40),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}


class PriceTable:
    """Model prices (the built-in table, optionally overridden) and cost estimates.

    >>> PriceTable().cost("gpt-4o-mini-2024-07-18", 1_000_000, 0)
    0.15
    """

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        # names are matched case-insensitively: "GPT-4o" in a prices file is no typo
        self._prices: dict[str, Price] = {k.lower(): v for k, v in DEFAULT_PRICES.items()}
        for name, price in (overrides or {}).items():
            self._prices[name.lower()] = Price(float(price[0]), float(price[1]))

    def __repr__(self) -> str:
        return f"PriceTable({len(self._prices)} models)"

    @property
    def prices(self) -> Mapping[str, Price]:
        """The effective table, lower-case model name -> price."""
        return dict(self._prices)

    def price(self, model: str | None) -> Price | None:
        """The price of ``model`` (exact name, else the longest ``prefix-``), or None."""
        if not model:
            return None
        name = model.lower()
        if name in self._prices:
            return self._prices[name]
        best: str | None = None
        for known in self._prices:
            if name.startswith(known + "-") and (best is None or len(known) > len(best)):
                best = known
        return None if best is None else self._prices[best]

    def cost(
        self,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        batch: bool = False,
    ) -> float | None:
        """Estimated USD for the tokens; None when the model has no known price."""
        price = self.price(model)
        if price is None:
            return None
        usd = (prompt_tokens * price.input + completion_tokens * price.output) / _PER
        return usd * BATCH_DISCOUNT if batch else usd

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """The built-in table overridden and extended by the JSON file at ``path``.

        Raises ConfigError naming the file and what is wrong with it.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read prices file: {exc.strerror or exc}") from None
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: expected a JSON object "
                '{"model": {"input": USD per 1M tokens, "output": USD per 1M tokens}}, '
                f"got {_json_type(data)}"
            )
        overrides: dict[str, Price] = {}
        for model, entry in data.items():
            overrides[model] = _parse_entry(path, model, entry)
        return cls(overrides)


def _parse_entry(path: Path, model: str, entry: Any) -> Price:
    where = f"{path}: model {model!r}"
    if not model.strip():
        raise ConfigError(f"{path}: empty model name")
    if not isinstance(entry, dict):
        raise ConfigError(
            f'{where}: expected {{"input": number, "output": number}}, got {_json_type(entry)}'
        )
    unknown = sorted(set(entry) - {"input", "output"})
    if unknown:
        # a misspelt key would otherwise silently keep the built-in price
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: 'input', 'output'")
    values: list[float] = []
    for key in ("input", "output"):
        if key not in entry:
            raise ConfigError(f"{where}: missing {key!r} (USD per 1M tokens)")
        value = entry[key]
        # bool is an int in Python, and `true` is never a price
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"{where}: {key!r} must be a non-negative number (USD per 1M tokens), "
                f"got {json.dumps(value)}"
            )
        values.append(float(value))
    return Price(values[0], values[1])


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
