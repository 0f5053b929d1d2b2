"""Fault injection and latency: seeded draws, the fault script and rate-limit storms.

Kinds: ``500`` (server_error), ``503`` (engine overloaded), ``drop`` (the TCP connection is
aborted without a response: the client sees a connection error), ``hang`` (no response for
``hang_seconds``, then the normal answer; a client timeout fires first), ``malformed`` (200
with a truncated JSON body), ``429`` (rate_limit_exceeded with ``retry-after-ms``).

Precedence for one chat request: the script (its next entry, ``ok`` = no fault), then the
seeded rates. Storms are checked before the rate limiter (see ``app.py``).
"""

from __future__ import annotations

import math
import random
from typing import cast

from .config import FAULT_KINDS, FaultKind, LatencyConfig, StormConfig


def draw_fault(rng: random.Random, rates: dict[FaultKind, float]) -> FaultKind | None:
    """One seeded draw over the configured rates (no draw at all when every rate is 0)."""
    if not any(rates.values()):
        return None
    u = rng.random()
    edge = 0.0
    for kind in FAULT_KINDS:  # a fixed order keeps a seed's sequence of faults stable
        edge += rates.get(kind, 0.0)
        if u < edge:
            return kind
    return None


def script_fault(entry: str) -> FaultKind | None:
    """The fault of one script entry (``ok`` = none)."""
    return None if entry == "ok" else cast(FaultKind, entry)


def sample_latency(rng: random.Random, cfg: LatencyConfig) -> float:
    """Seconds of server-side latency for one answered request."""
    if cfg.kind == "none":
        return 0.0
    if cfg.kind == "fixed":
        value = cfg.mean
    elif cfg.kind == "uniform":
        value = rng.uniform(cfg.low, cfg.high)
    else:
        mu = math.log(cfg.mean) - cfg.sigma**2 / 2
        value = rng.lognormvariate(mu, cfg.sigma)
    return min(value, cfg.cap)


class Storm:
    """The running state of a rate-limit storm (armed from a :class:`StormConfig`)."""

    def __init__(self, cfg: StormConfig, now: float) -> None:
        self.cfg = cfg
        self.left = cfg.requests if cfg.requests > 0 else None
        self.until = now + cfg.seconds if cfg.seconds > 0 else None

    def __repr__(self) -> str:
        return f"Storm(left={self.left}, until={self.until})"

    def active(self, now: float) -> bool:
        if self.left is not None and self.left <= 0:
            return False
        return not (self.until is not None and now >= self.until)

    def hit(self, now: float) -> bool:
        """True (and one request used up) when this request falls in the storm."""
        if not self.active(now):
            return False
        if self.left is not None:
            self.left -= 1
        return True
