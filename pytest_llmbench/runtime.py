"""Per-process state of a pytest-llmbench run, kept in ``config.stash``.

Every process (controller, xdist worker, plan subprocess) has one: the run's settings,
token, start and freshness times and record mode, and its own store handle and client,
opened lazily on the first use of the ``llm`` fixture, so that ``pytest --help`` and runs
that never call a model stay fast. What only the controlling process has (simulator,
results, gates, report) lives in ``controller.Controller``.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .client import CallContext, LLMClient, Response
from .config import LLMConfig, RunSettings, build_config, resolve_settings
from .errors import ConfigError, LLMCallError, RunStopped, StoreError
from .journal import FetchEnd, JournalReader, RunStop, Verdict, journal_path, stop_path
from .results import CaseResult

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .spend import CostCap
    from .store import ResponseStore

#: A fake key used against the built-in simulator; obviously not a secret.
SIM_API_KEY = "sk-sim-local-fake-key"
#: Set in plan subprocesses (see engine.py).
PHASE_ENV = "PYTEST_LLMBENCH_PHASE"

MISSING_KEY = (
    "no OpenAI API key: set OPENAI_API_KEY, or add --llm-sim to run on the built-in simulator"
)
#: options that take a path: given as two arguments, pytest reads the value as a test path
#: when it chooses rootdir (before any plugin's options are known)
PATH_OPTIONS = (
    "--llm-run-dir",
    "--llm-report",
    "--llm-html",
    "--llm-baseline",
    "--llm-prices",
    "--llm-sim-config",
    "--llm-cassette-dir",
)


def stop_message(reason: str) -> str:
    """The one line a fatal refusal ends the session with."""
    if "run the same command" in reason:  # the reason says what to do (--llm-max-cost)
        return f"llmbench: {reason}"
    return f"llmbench: {reason} (stored answers are kept: fix it and run the same command)"


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


class CaseAccumulator:
    """Adds one test case's calls up into its :class:`CaseResult` (whose fields are the
    only declaration of what a case reports); the plugin fills in the rest at the end."""

    def __init__(self) -> None:
        self.result = CaseResult("", "", "", None, None, None, "pending")

    def add_error(self, error: LLMCallError) -> None:
        """A call that failed for good still sent its requests (and met its 429s)."""
        case = self.result
        case.requests += error.attempts
        case.retries += max(0, error.attempts - 1)
        case.rate_limited += error.rate_limited

    def add(self, r: Response) -> None:
        case = self.result
        case.calls += 1
        case.prompt_tokens += r.usage.prompt_tokens
        case.completion_tokens += r.usage.completion_tokens
        case.total_tokens += r.usage.total_tokens
        case.reasoning_tokens += r.usage.reasoning_tokens
        case.latency_s += r.latency
        case.model = r.model or case.model
        case.response = r.text
        case.batch = case.batch or r.source == "batch"
        if r.cached:
            case.cached += 1
        else:
            case.requests += r.attempts
            case.retries += r.attempts - 1
            case.rate_limited += r.rate_limited


@dataclass
class RunState:
    """Everything the plugin keeps for one pytest process."""

    config: pytest.Config
    options: RunSettings
    llm_config: LLMConfig
    sim_enabled: bool
    phase: str  # "run" or "plan"
    started_at: float = field(default_factory=time.time)
    _client: LLMClient | None = None
    _store: ResponseStore | None = None
    fresh_since: float | None = None
    run_token: str = ""
    record_mode: str | None = None  # cassettes (cassettes.py); None: no cassettes
    cassette_dir: Path | None = None
    shared: dict[str, Any] = field(default_factory=dict)  # from the controller, if a child
    _stop: RunStop | None = None
    _journal: JournalReader | None = None
    _journal_checked: bool = False
    _reports: int = 0  # tests reported in this process (collect_as_it_goes)

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_config(cls, config: pytest.Config) -> RunState:
        from .options import OPTIONS

        cli = {o.dest: getattr(config.option, o.dest, None) for o in OPTIONS}
        ini = {o.dest: _getini(config, o.dest) for o in OPTIONS}
        try:
            settings = resolve_settings(cli, os.environ, ini)
            llm_config = build_config(settings)
            options = RunSettings.from_resolved(settings)
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
        run_dir = llm_config.run_dir
        if not run_dir.is_absolute():
            run_dir = config.rootpath / run_dir
        llm_config = llm_config.with_changes(run_dir=run_dir)
        workerinput = getattr(config, "workerinput", None)
        shared = (workerinput or {}).get("llmbench") or _env_shared()
        sim_enabled = options.sim or bool(shared.get("sim"))
        if shared.get("base_url"):
            # the controller (or the parent of a plan subprocess) started the simulator
            llm_config = llm_config.with_changes(base_url=shared["base_url"])
        if sim_enabled:
            llm_config = llm_config.with_changes(api_key=SIM_API_KEY)
        _check_rootdir_args(config)
        phase = os.environ.get(PHASE_ENV, "run")
        state = cls(config, options, llm_config, sim_enabled, phase)
        state.run_token = shared.get("run_token") or os.urandom(8).hex()
        if shared.get("run_started") is not None:
            state.started_at = float(shared["run_started"])
        if shared.get("fresh_since") is not None:
            state.fresh_since = float(shared["fresh_since"])
        elif options.fresh:
            state.fresh_since = state.started_at
        state.shared = shared
        return state

    def shared_for_children(self) -> dict[str, Any]:
        """What workers and plan subprocesses must know that their own options don't say."""
        return {
            "sim": self.sim_enabled,
            "base_url": self.llm_config.base_url if self.sim_enabled else None,
            "fresh_since": self.fresh_since,
            "run_token": self.run_token,
            "run_started": self.started_at,
            "record_mode": self.record_mode,
        }

    @property
    def origin(self) -> str:
        """Where this run's answers come from: the simulator, or the API's base URL."""
        from .store import SIM_ORIGIN

        return SIM_ORIGIN if self.sim_enabled else self.llm_config.endpoint

    def is_answered(self, key: str) -> bool:
        """Whether the store holds an answer this run may replay."""
        return self.store.lookup(key, fresh_since=self.fresh_since) is not None

    # ------------------------------------------------------------------ stopping
    @property
    def stop(self) -> RunStop:
        """The run's stop file: tripped by the first fatal refusal in any process."""
        if self._stop is None:
            self._stop = RunStop(stop_path(self.llm_config.run_dir, self.run_token))
        return self._stop

    def stopped(self) -> str | None:
        """Why the run stops (a fatal refusal somewhere), or None."""
        return self.stop.reason()

    def call_failed(self, acc: CaseAccumulator, error: LLMCallError) -> None:
        acc.add_error(error)
        if error.fatal:
            self.stop.trip(str(error))

    def await_answer(self, key: str) -> bool:
        """A test's answer that is not stored yet may be on its way (the prefetch runs
        beside the tests): wait for it. True when it arrived or failed (look again);
        False when the prefetch will not send it (send it live)."""
        if not self._journal_checked:
            self._journal_checked = True
            path = journal_path(self.llm_config.run_dir, self.run_token)
            if path.exists():
                self._journal = JournalReader(path)
        if self._journal is None:
            return False
        verdict = self._journal.wait(key)
        if isinstance(verdict, FetchEnd):
            if verdict.status == "fatal":
                raise LLMCallError(verdict.reason, attempts=0, fatal=True)
            if verdict.status == "stopped":  # --llm-max-cost: not sent, not a failure
                raise RunStopped(verdict.reason)
            raise RunStopped("the run was interrupted while this answer was on its way")
        return verdict is Verdict.SETTLED

    def has_credentials(self) -> bool:
        # a replay from cassettes (record mode none) never sends a request
        return self.llm_config.api_key is not None or self.sim_enabled or self.record_mode == "none"

    def check_credentials(self) -> None:
        if not self.has_credentials():
            raise pytest.UsageError(MISSING_KEY)

    # ------------------------------------------------------------------ resources
    @property
    def store(self) -> ResponseStore:
        if self._store is None:
            from .store import ResponseStore

            try:
                self._store = ResponseStore.open(self.llm_config.run_dir, origin=self.origin)
            except StoreError as exc:
                raise pytest.UsageError(str(exc)) from None
        return self._store

    @property
    def client(self) -> LLMClient:
        if self._client is None:
            self._client = LLMClient(self.llm_config)
            cap = self.cost_cap()
            if cap is not None:  # else the client's transport waits for its first send
                self._client.shared.cost_cap = cap
        return self._client

    def cost_cap(self, on_stop: Callable[[str], None] | None = None) -> CostCap | None:
        """The ``--llm-max-cost`` cap on the run's shared spend (``spend.py``), or None.
        ``on_stop(reason)`` runs when it stops the run (default: trip the stop file)."""
        if self.options.max_cost is None or self.phase != "run":
            return None
        from .pricing import PriceTable
        from .spend import CostCap

        try:
            path = self.options.prices
            prices = PriceTable.load(path) if path is not None else PriceTable()
        except ConfigError as exc:
            raise pytest.UsageError(f"--llm-prices: {exc}") from None
        return CostCap(
            self.options.max_cost,
            prices,
            self.store,
            self.run_token,
            default_max_tokens=self.llm_config.max_tokens,
            on_stop=on_stop or self.stop.trip,
        )

    def add_batch_cost(self, request: Mapping[str, Any], answer: Mapping[str, Any]) -> None:
        """A Batch API answer arrived: its cost (half price) counts toward the cap."""
        cap = self.client.shared.cost_cap
        if cap is not None:
            cap.add_batch_answer(request, answer)

    def bound_client(
        self,
        nodeid: str,
        temperature: float | None,
        acc: CaseAccumulator,
        record: Any = None,
        reasoning_effort: str | None = None,
    ) -> LLMClient:
        context = CallContext(
            nodeid=nodeid,
            store=self.store,
            fresh_since=self.fresh_since,
            run_started=self.started_at,
            record=record,
            on_response=acc.add,
            on_error=lambda error: self.call_failed(acc, error),
            batch_errors=(
                self.llm_config.batch.enabled and self.llm_config.batch.fallback != "live"
            ),
            run_token=self.run_token,
            cassette_replay=self.record_mode == "none",
            await_answer=self.await_answer if self.phase == "run" else None,
            stopped=self.stopped,
        )
        defaults: dict[str, Any] = {} if temperature is None else {"temperature": temperature}
        if reasoning_effort is not None:
            defaults["reasoning_effort"] = reasoning_effort
        return self.client.bind(context=context, **defaults)

    def freeze_at_session_end(self, config: pytest.Config) -> None:
        """The session of a process that ran llmbench cases has ended and the process
        exits after it: one full collection, then ``gc.freeze()``. pytest runs two full
        collections of its own after this (its unraisable-exception checks, at
        unconfigure and in its cleanups), about 0.1-0.2 s each over the 140,000 objects of
        a 2,000-case run, and the interpreter more at exit; frozen objects are skipped, so
        a run ends ~0.3-0.4 s sooner. The collection here runs while pytest still listens
        for unraisable exceptions, so a finalizer that fails in it is reported as before;
        see :func:`collect_then_freeze` for what a freeze gives up."""
        if self.ran_cases() and exits_after_session(config, self.phase):
            collect_then_freeze()

    def collect_as_it_goes(self, config: pytest.Config) -> None:
        """One more test has reported here (its teardown): every ``FREEZE_EVERY`` tests,
        in a process that ran llmbench cases and exits after its session, one full
        collection and then ``gc.freeze()``, as at the session's end. Each collection
        walks only what came since the last freeze, so together they cost about what
        the one at the end would, but they come while the tests wait for the fetch, and
        the one at the end walks what the last few hundred tests left: 0.05-0.1 s off a
        2,000-case run's end in each process."""
        self._reports += 1
        if self._reports % FREEZE_EVERY == 0:
            self.freeze_at_session_end(config)

    def ran_cases(self) -> bool:
        """Whether this process called the model or opened the store for its cases."""
        return self._client is not None or self._store is not None

    def close(self) -> None:
        if self.ran_cases():
            atexit.unregister(collect_then_freeze)  # once per process, and run first
            atexit.register(collect_then_freeze)
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._store is not None:
            self._store.close()
            self._store = None


def exits_after_session(config: pytest.Config, phase: str) -> bool:
    """Whether this process ends when its session does: an xdist worker, the plan
    subprocess, or ``pytest`` / ``python -m pytest`` run with this session's arguments
    (never a ``pytest.main()`` called in a process that goes on, such as pytester's
    in-process runs inside another session)."""
    if phase == "plan" or is_worker(config):
        return True
    main = Path(sys.argv[0])  # the console script, or pytest's __main__.py for -m pytest
    launched = main.name in ("pytest", "py.test") or main.parts[-2:] == ("pytest", "__main__.py")
    args = tuple(str(a) for a in config.invocation_params.args)
    return launched and tuple(sys.argv[1:]) == args


#: tests reported between two collections and freezes (``RunState.collect_as_it_goes``)
FREEZE_EVERY = 500


def collect_then_freeze() -> None:
    """At the exit of a process that ran llmbench cases (registered when its state
    closes; atexit runs it before the handlers registered earlier, and only when the
    interpreter exits, never after an in-process ``pytest.main``): one full garbage
    collection, then ``gc.freeze()``. The interpreter's shutdown runs several full
    collections of its own over everything still alive, about 0.1 s each for the 140,000
    objects pytest keeps of a 2,000-case run (its items and reports): 0.4 s at the end of
    every process, and the controller of ``-n 8`` waits for 8 workers' on 2 cores. The
    one collection here still finalizes what is garbage at exit; what is still alive
    is freed by reference counts as modules are cleared, but a finalizer (``__del__``)
    of an object alive in a reference cycle at exit no longer runs, which Python never
    promised (its data model: "It is not guaranteed that __del__() methods are called
    for objects that still exist when the interpreter exits")."""
    gc.collect()
    gc.freeze()


def _check_rootdir_args(config: pytest.Config) -> None:
    """Refuse ``--llm-run-dir /elsewhere`` (two arguments) in a project without an ini
    file: pytest takes the value for a test path when it picks rootdir, so once the path
    exists node ids (and with them every stored answer's key) change from run to run."""
    if config.inipath is not None or getattr(config.option, "rootdir", None):
        return
    here = config.invocation_params.dir.resolve()
    args = [str(a) for a in config.invocation_params.args]
    for flag, value in itertools.pairwise(args):
        if flag in PATH_OPTIONS and not (here / value).resolve().is_relative_to(here):
            raise pytest.UsageError(
                f"{flag}: without an ini file pytest reads {value} as a test path when it "
                f"chooses rootdir, which changes node ids and stored answers; write "
                f"{flag}={value}, or add a pytest.ini (or --rootdir)"
            )


def _getini(config: pytest.Config, name: str) -> Any:
    try:
        return config.getini(name)
    except (ValueError, KeyError):
        return None


def _env_shared() -> dict[str, Any]:
    import json

    raw = os.environ.get("PYTEST_LLMBENCH_SHARED")
    return json.loads(raw) if raw else {}


__all__ = ["MISSING_KEY", "SIM_API_KEY", "CaseAccumulator", "RunState", "stop_message"]
