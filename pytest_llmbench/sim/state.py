"""The simulator's shared state: configuration, limiters, counters and statistics.

Handlers run on the server's event loop; :class:`Simulator` reads stats and patches the
configuration from other threads. Every access goes through one lock, held for microseconds.

Statistics (``GET /_sim/stats``; ``/_sim/*`` requests are not counted):

``requests_total``            HTTP requests under ``/v1``
``chat_requests``             chat-completion requests (incl. refused and faulted ones)
``chat_answered``             chat requests answered 200 with a completion
``by_status``                 ``{"200": n, "429": n, ...}`` over ``/v1`` responses
``rate_limit_429``            429 ``rate_limit_exceeded`` (limits, storms, injected 429)
``quota_429``                 429 ``insufficient_quota``
``prompt_tokens`` / ``completion_tokens``   tokens of answered chat requests
``in_flight`` / ``peak_in_flight``          chat requests being handled (now / at most)
``serving`` / ``peak_serving``              of those, past the ``parallelism`` queue (now /
                              at most): in their latency, or answering
``duplicate_bodies``          answers to a body identical to one answered 200 before
``duplicate_body_hashes``     ``{sha256 of canonical body: times answered again}``
``undelivered``               answers not counted: the client had gone when they were ready
``files_uploaded`` / ``batches_created``
``batch_lines_processed``     lines executed (counted when their batch leaves in_progress)
``faults_injected``           ``{"500"|"503"|"drop"|"hang"|"malformed"|"429"|"storm": n}``
``answered_per_second``       ``{epoch second: chat requests answered 200 in it}``
``peak_answered_1s``          the most chat requests answered 200 within one second (a
                              sliding window: a burst across a second's edge counts whole)
``rate_tokens_per_second``    ``{epoch second: TPM tokens admitted in it}``
``started_at``                epoch seconds of the last start or reset
``first_request_at`` / ``last_answer_at``   epoch seconds of the first chat request since,
                              and of the last chat answer (None before either)
``storm_active`` / ``script_left``          a storm is running / scripted faults still queued
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .answers import AnswerIndex, load_answer_key
from .config import FaultKind, SimConfig, patch_config
from .faults import Storm, draw_fault, sample_latency, script_fault
from .limits import Decision, ModelLimits

_LIMIT_FIELDS = {"rpm", "tpm", "burst_seconds", "rate_limit_tolerance"}
_ANSWER_FIELDS = {"answer_key", "answer_key_path"}


def build_index(config: SimConfig) -> AnswerIndex:
    """The answer index of ``answer_key`` plus the items of ``answer_key_path``."""
    items = list(config.answer_key)
    if config.answer_key_path:
        items.extend(load_answer_key(config.answer_key_path))
    return AnswerIndex(items)


class SimState:
    """Configuration and counters of one running simulator."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.RLock()
        self._clock = clock
        self._config = config
        self.index = build_index(config)
        self._limits: dict[str, ModelLimits] = {}
        self._storm: Storm | None = None
        self._in_flight = 0
        self._serving = 0
        self._draws: dict[str, int] = {}
        self._answered: dict[str, int] = {}
        self._listeners: list[Callable[[], None]] = []
        self._seed_rngs()
        self._arm_storm()
        self._clear_stats()

    # -- configuration -------------------------------------------------------------------

    @property
    def config(self) -> SimConfig:
        return self._config

    def configure(self, patch: dict[str, Any]) -> SimConfig:
        """Merge ``patch`` (JSON merge patch) into the config; raises on invalid values.
        Then tells those who asked (:meth:`on_configure`), in the calling thread."""
        with self.lock:
            new = patch_config(self._config, patch)
            index = build_index(new) if _ANSWER_FIELDS & patch.keys() else self.index
            self._config = new
            self.index = index
            if _LIMIT_FIELDS & patch.keys():
                self._limits.clear()
            if "seed" in patch:
                self._seed_rngs()
            if "storm" in patch:
                self._arm_storm()
        for listener in self._listeners:
            listener()
        return new

    def on_configure(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each change of the configuration."""
        self._listeners.append(listener)

    def reset(self) -> None:
        """Clear statistics, counters and buckets; keep the configuration."""
        with self.lock:
            self._limits.clear()
            self._draws.clear()
            self._answered.clear()
            self._seed_rngs()
            self._clear_stats()

    def _seed_rngs(self) -> None:
        seed = self._config.seed
        self._fault_rng = random.Random(f"faults:{seed}")
        self._latency_rng = random.Random(f"latency:{seed}")

    def _arm_storm(self) -> None:
        storm = self._config.storm
        self._storm = Storm(storm, self._clock()) if storm is not None else None

    # -- per-request decisions -----------------------------------------------------------

    def limits_for(self, model: str) -> ModelLimits:
        with self.lock:
            limits = self._limits.get(model)
            if limits is None:
                cfg = self._config
                limits = ModelLimits(
                    cfg.rpm, cfg.tpm, cfg.burst_seconds, self._clock, cfg.rate_limit_tolerance
                )
                self._limits[model] = limits
            return limits

    def admit(self, model: str, tokens: int) -> tuple[Decision, dict[str, str]]:
        """Run the rate limiter; returns the decision and the ``x-ratelimit-*`` headers."""
        with self.lock:
            limits = self.limits_for(model)
            decision = limits.admit(tokens)
            if decision.admitted and limits.tokens is not None:
                self._bump(self._stats["rate_tokens_per_second"], tokens)
            return decision, limits.headers()

    def headers_for(self, model: str) -> dict[str, str]:
        with self.lock:
            return self.limits_for(model).headers()

    def storm_hit(self) -> int | None:
        """``retry_after_ms`` if this request falls in a storm, else None."""
        with self.lock:
            storm = self._storm
            if storm is None:
                return None
            now = self._clock()
            if storm.hit(now):
                self.count_fault("storm")
                return storm.cfg.retry_after_ms
            if not storm.active(now):
                # an exhausted storm disappears from the config, so GET /_sim/config is honest
                self._storm = None
                self._config = self._config.model_copy(update={"storm": None})
            return None

    def next_fault(self) -> FaultKind | None:
        """The fault for the next chat request: the script first, then the seeded rates."""
        with self.lock:
            cfg = self._config
            if cfg.script:
                entry, rest = cfg.script[0], cfg.script[1:]
                self._config = cfg.model_copy(update={"script": rest})
                kind = script_fault(entry)
            else:
                kind = draw_fault(self._fault_rng, cfg.faults)
            if kind is not None:
                self.count_fault(kind)
            return kind

    def latency(self) -> float:
        with self.lock:
            return sample_latency(self._latency_rng, self._config.latency)

    def next_draw(self, body_hash: str) -> int:
        """How many answers were drawn for this body before (then counts this one)."""
        with self.lock:
            before = self._draws.get(body_hash, 0)
            self._draws[body_hash] = before + 1
            return before

    # -- statistics ----------------------------------------------------------------------

    def _clear_stats(self) -> None:
        self._answer_times: deque[float] = deque()  # the last second's, for peak_answered_1s
        self._stats: dict[str, Any] = {
            "requests_total": 0,
            "chat_requests": 0,
            "chat_answered": 0,
            "by_status": {},
            "rate_limit_429": 0,
            "quota_429": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "peak_in_flight": self._in_flight,
            "peak_serving": self._serving,
            "duplicate_bodies": 0,
            "undelivered": 0,
            "duplicate_body_hashes": {},
            "files_uploaded": 0,
            "batches_created": 0,
            "batch_lines_processed": 0,
            "faults_injected": {},
            "answered_per_second": {},
            "peak_answered_1s": 0,
            "rate_tokens_per_second": {},
            "started_at": time.time(),
            "first_request_at": None,
            "last_answer_at": None,
        }

    @staticmethod
    def _bump(table: dict[str, int], amount: int = 1, key: str | None = None) -> None:
        k = key if key is not None else str(int(time.time()))
        table[k] = table.get(k, 0) + amount

    def count(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self._stats[name] += amount

    def count_status(self, status: int) -> None:
        with self.lock:
            self._bump(self._stats["by_status"], key=str(status))

    def count_fault(self, kind: str) -> None:
        with self.lock:
            self._bump(self._stats["faults_injected"], key=kind)

    @contextmanager
    def chat_in_flight(self) -> Iterator[None]:
        with self.lock:
            self._stats["chat_requests"] += 1
            if self._stats["first_request_at"] is None:
                self._stats["first_request_at"] = time.time()
            self._in_flight += 1
            self._stats["peak_in_flight"] = max(self._stats["peak_in_flight"], self._in_flight)
        try:
            yield
        finally:
            with self.lock:
                self._in_flight -= 1

    @contextmanager
    def serving(self) -> Iterator[None]:
        """A chat request past the ``parallelism`` queue, until its answer is ready."""
        with self.lock:
            self._serving += 1
            self._stats["peak_serving"] = max(self._stats["peak_serving"], self._serving)
        try:
            yield
        finally:
            with self.lock:
                self._serving -= 1

    def record_undelivered(self) -> None:
        with self.lock:
            self._stats["undelivered"] += 1

    def record_answer(self, body_hash: str, prompt: int, completion: int) -> None:
        with self.lock:
            s = self._stats
            s["chat_answered"] += 1
            s["prompt_tokens"] += prompt
            s["completion_tokens"] += completion
            self._bump(s["answered_per_second"])
            s["last_answer_at"] = time.time()
            now, times = self._clock(), self._answer_times
            times.append(now)
            while times[0] <= now - 1.0:
                times.popleft()
            s["peak_answered_1s"] = max(s["peak_answered_1s"], len(times))
            before = self._answered.get(body_hash, 0)
            self._answered[body_hash] = before + 1
            if before:
                s["duplicate_bodies"] += 1
                s["duplicate_body_hashes"][body_hash] = before

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the statistics (safe to hand to another thread)."""
        with self.lock:
            out = {k: dict(v) if isinstance(v, dict) else v for k, v in self._stats.items()}
            out["in_flight"] = self._in_flight
            out["serving"] = self._serving
            out["storm_active"] = self._storm is not None and self._storm.active(self._clock())
            out["script_left"] = len(self._config.script)
            return out

    def config_json(self) -> dict[str, Any]:
        with self.lock:
            return self._config.model_dump(mode="json")
