"""The pytest11 entry point: options, hooks and fixtures. Thin; the work lives elsewhere."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Literal

import pytest

from .errors import DatasetError, LLMCallError, LLMPending, RunStopped
from .options import OPTIONS
from .runtime import MISSING_KEY, CaseAccumulator, RunState, is_worker, stop_message

if TYPE_CHECKING:
    from .client import LLMClient
    from .config import LLMConfig
    from .controller import Controller
    from .plan import Recorder

STATE = pytest.StashKey[RunState]()
CONTROLLER: pytest.StashKey[Controller] = pytest.StashKey()
CASE = pytest.StashKey[CaseAccumulator]()
PARAM_FIXTURE = "case"  # the indirect parameter: (item, temperature, sample)
MARKER_KWARGS = frozenset(
    {"dataset", "temperatures", "id", "samples", "plan", "required", "normalize"}
    | {"hf_config", "hf_split", "hf_revision"}  # dataset="hf:ORG/NAME" (README)
    | {"reasoning_effort"}  # reasoning models (README "Reasoning models")
)
CHECKED = pytest.StashKey[dict[str, Any]]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmbench", "LLM benchmarks (pytest-llmbench)")
    for o in OPTIONS:
        if o.flag:
            if o.kind == "flag":
                group.addoption(
                    o.flag, action="store_true", dest=o.dest, default=False, help=o.help
                )
            elif o.kind == "append":
                group.addoption(
                    o.flag, action="append", dest=o.dest, default=[], metavar=o.metavar, help=o.help
                )
            else:
                group.addoption(o.flag, dest=o.dest, default=None, metavar=o.metavar, help=o.help)
        kind: Literal["linelist", "string"] = "linelist" if o.kind == "append" else "string"
        parser.addini(o.dest, o.help, type=kind)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "llmbench(dataset, temperatures=None, id=None, samples=1, plan=True, "
        "reasoning_effort=None): run the test "
        "once per dataset item x temperature (x sample) with the `case` and `llm` fixtures",
    )
    state = RunState.from_config(config)
    from .cassettes import configure as configure_cassettes

    configure_cassettes(config, state, state.shared)
    config.stash[STATE] = state
    if state.options.estimate and state.phase == "run" and not is_worker(config):
        # --llm-estimate runs no test: no xdist workers to start (as xdist does for --pdb)
        config.option.dist, config.option.tx = "no", []
    # one plugin object per role, registered only in the process that has the role
    name = f"llmbench-{id(config)}"
    if state.phase == "plan":
        config.pluginmanager.register(Planner(), f"{name}-planner")
    elif is_worker(config):
        config.pluginmanager.register(Worker(config, state), f"{name}-worker")
    else:
        from .controller import Controller, XdistController

        controller = Controller(config, state)
        controller.start()
        config.stash[CONTROLLER] = controller
        config.pluginmanager.register(controller, f"{name}-controller")
        from .linear_failures import LinearFailures

        config.pluginmanager.register(LinearFailures(), f"{name}-linear-failures")
        if config.pluginmanager.hasplugin("xdist"):
            config.pluginmanager.register(XdistController(controller), f"{name}-xdist")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE, None)
    if state is not None and not is_worker(session.config):  # a worker's: Worker's
        state.freeze_at_session_end(session.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    controller = config.stash.get(CONTROLLER, None)
    if controller is not None:
        controller.close()
    state = config.stash.get(STATE, None)
    if state is not None:
        state.close()


class Planner:
    """The plan subprocess's role: run only the tests that may call the model."""

    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        from .plan import plan_filter

        keep, drop = plan_filter(items)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep


class Worker:
    """An xdist worker's role: tell the controller, which never collects, what there is
    to plan (the tests run here; their results travel in the reports)."""

    def __init__(self, config: pytest.Config, state: RunState) -> None:
        self.config = config
        self.state = state

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        from .plan import calls_model, llm_nodeids, write_collection_flag

        nodeids = llm_nodeids(session.items)
        write_collection_flag(self.config, self.state, nodeids, calls_model(session.items))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            self.state.collect_as_it_goes(self.config)

    @pytest.hookimpl(tryfirst=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """The worker's collection and freeze (``RunState.freeze_at_session_end``) come
        after its session has ended, not in it: xdist tells the controller the worker is
        done after the last session-finish hook, and the controller's end (its
        teardown of the workers, the summary) need not wait the 0.05-0.1 s of a full
        collection; the worker has that long to wait for the controller anyway. pytest
        still listens for unraisable exceptions here, but a worker's warnings no longer
        reach the controller once it is done: a finalizer failing in this collection is
        as silent as one failing in pytest's own collections at a worker's end."""
        self.state.freeze_at_session_end(config)


# ---------------------------------------------------------------------- parametrization
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("llmbench")
    if marker is None:
        return
    from .dataset import case_id, load_dataset, select

    state = metafunc.config.stash[STATE]
    where = f"{metafunc.definition.nodeid}: @pytest.mark.llmbench"
    _check_kwargs(where, marker)
    source = marker.kwargs.get("dataset", marker.args[0] if marker.args else None)
    if source is None:
        pytest.fail(pytrace=False, reason=f"{where}: needs dataset=PATH or an iterable of dicts")
    temps = _temperatures(metafunc, marker, state)
    samples = int(marker.kwargs.get("samples", 1))
    if samples < 1:
        pytest.fail(pytrace=False, reason=f"{where}: samples must be at least 1")
    normalizer = marker.kwargs.get("normalize")
    if normalizer is not None and not callable(normalizer):
        pytest.fail(pytrace=False, reason=f"{where}: normalize must be a function (str -> str)")
    problem: str | None = None
    try:
        items = load_dataset(
            source,
            base_dir=metafunc.definition.path.parent,
            id_field=marker.kwargs.get("id"),
            required=tuple(marker.kwargs.get("required", ())),
            hf_config=marker.kwargs.get("hf_config"),
            hf_split=marker.kwargs.get("hf_split"),
            hf_revision=marker.kwargs.get("hf_revision"),
        )
    except DatasetError as exc:
        problem = str(exc)
    if problem is not None:
        # raised outside the except block: one message, no "during handling of" chain
        pytest.fail(problem, pytrace=False)
    items = select(
        items,
        limit=state.options.limit,
        sample=state.options.sample,
        seed=state.options.seed or 0,
    )
    params = []
    for item in items:
        for t in temps:
            for s in range(samples):
                sample = s if samples > 1 else None
                ident = (
                    case_id(item.id, t, sample)
                    if t is not None
                    else item.id + (f"-s{s}" if sample is not None else "")
                )
                params.append(pytest.param((item, t, sample), id=ident))
    if PARAM_FIXTURE not in metafunc.fixturenames:
        metafunc.fixturenames.append(PARAM_FIXTURE)
    metafunc.parametrize(PARAM_FIXTURE, params, indirect=True)


def _check_kwargs(where: str, marker: pytest.Mark) -> None:
    unknown = set(marker.kwargs) - MARKER_KWARGS
    if unknown:
        allowed = ", ".join(sorted(MARKER_KWARGS))
        pytest.fail(
            pytrace=False,
            reason=f"{where}: unknown argument(s) {sorted(unknown)}; allowed: {allowed}",
        )


def _temperatures(
    metafunc: pytest.Metafunc, marker: pytest.Mark, state: RunState
) -> list[float | None]:
    """The suite's temperatures (``--llm-temperatures`` first; ``[None]``: none).

    Refuses, before any request, what a reasoning model would refuse request after
    request: a temperature other than 1, an unknown ``reasoning_effort=``.
    """
    from .reasoning import check_effort, temperature_problem

    temperatures = state.options.temperatures or marker.kwargs.get("temperatures")
    temps: list[float | None] = [None] if not temperatures else [float(t) for t in temperatures]
    suite = metafunc.definition.nodeid
    problem = temperature_problem(
        state.llm_config.model, suite, temps, from_option=bool(state.options.temperatures)
    )
    effort = marker.kwargs.get("reasoning_effort")
    if effort is not None:
        try:
            check_effort(str(effort))
        except ValueError as exc:
            problem = f"{suite}: @pytest.mark.llmbench: {exc}"
    if problem is not None:  # raised outside the except block: one message, no chain
        pytest.fail(problem, pytrace=False)
    return temps


# ---------------------------------------------------------------------- fixtures
def _param(request: pytest.FixtureRequest) -> Any:
    """The case's (item, temperature, sample), or None outside an llmbench suite."""
    callspec = getattr(request.node, "callspec", None)
    return None if callspec is None else callspec.params.get(PARAM_FIXTURE)


@pytest.fixture
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The dataset item of this test case (a dict)."""
    # `case` is itself the parametrized fixture, so a case costs one fixture less
    param = getattr(request, "param", None)
    if param is None:
        raise pytest.UsageError("the `case` fixture needs @pytest.mark.llmbench(dataset=...)")
    return dict(param[0].data)


@pytest.fixture
def temperature(request: pytest.FixtureRequest) -> float | None:
    """The temperature of this test case (None when the suite names none)."""
    param = _param(request)
    return None if param is None else param[1]


@pytest.fixture
def sample_index(request: pytest.FixtureRequest) -> int | None:
    """The sample number of this case when the suite asks for ``samples=K``."""
    param = _param(request)
    return None if param is None else param[2]


@pytest.fixture(scope="session")
def llm_config(pytestconfig: pytest.Config) -> LLMConfig:
    """The resolved configuration (options > environment > ini > defaults)."""
    return pytestconfig.stash[STATE].llm_config


@pytest.fixture
def llm(request: pytest.FixtureRequest) -> LLMClient:
    """A client bound to this case: its temperature, the shared budget, the store."""
    # reads the parameter from the node instead of depending on `temperature`: one
    # fixture less per case, which is measurable in a replay of 30,000 cases
    state = request.config.stash[STATE]
    if state.phase == "run" and not state.has_credentials():
        pytest.exit(MISSING_KEY, returncode=pytest.ExitCode.USAGE_ERROR)
    reason = state.stopped() if state.phase == "run" else None
    if reason is not None:
        # a fatal refusal stopped the run (here or in another worker): nothing more runs
        request.session.shouldstop = stop_message(reason)
        pytest.skip(f"llmbench: the run stopped: {reason}")
    acc = request.node.stash.setdefault(CASE, CaseAccumulator())
    recorder = _recorder(request.config) if state.phase == "plan" else None
    param = _param(request)
    temperature = None if param is None else param[1]
    marker = request.node.get_closest_marker("llmbench")
    # --llm-reasoning-effort overrides the marker, as --llm-temperatures does
    effort = state.llm_config.reasoning_effort or (
        marker.kwargs.get("reasoning_effort") if marker is not None else None
    )
    client = state.bound_client(request.node.nodeid, temperature, acc, recorder, effort)
    if state.phase == "run" and state.record_mode is not None:
        from .cassettes import case_cassette

        # calls the fetch stage could not answer ahead (dependent, unplanned) go through
        # the case's own cassette: one file per case, written by the one worker that runs it
        scope = case_cassette(state, request.node.nodeid)
        scope.__enter__()
        request.addfinalizer(lambda: scope.__exit__(None, None, None))
    return client


def _recorder(config: pytest.Config) -> Recorder:
    from .plan import plan_recorder

    return plan_recorder(config)


# ---------------------------------------------------------------------- reports
API_ERROR = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Turn the plan signal, API errors and benchmark assertions into short outcomes.

    pytest formats a full traceback for every failure, parsing source files for each
    frame (~50 ms each); a benchmark with thousands of wrong answers would spend minutes
    there. Raising pytest's own outcomes here gives one-line reports instead.
    """
    from .scoring import CHECKED as CHECK_SINK

    sink: dict[str, Any] = {}
    item.stash[CHECKED] = sink
    token = CHECK_SINK.set(sink)
    try:
        return (yield)
    except LLMPending:
        # plan phase: the test stopped at its first unanswered call; not a result
        message = None
    except RunStopped as exc:
        item.session.shouldstop = item.session.shouldstop or f"llmbench: {exc}"
        message = ""
    except LLMCallError as exc:
        item.stash[API_ERROR] = str(exc)
        message = f"API error: {exc}"
        if exc.fatal:
            # every other request would get the same refusal: stop the session (xdist
            # carries shouldstop to the controller, which stops the other workers)
            item.session.shouldstop = stop_message(str(exc))
    except AssertionError as exc:
        short = item.config.option.tbstyle == "auto" and bool(str(exc))
        if item.get_closest_marker("llmbench") is None or not short:
            raise
        message = str(exc)
    finally:
        CHECK_SINK.reset(token)
    # raised outside the except blocks, so pytest shows the message once, without
    # "During handling of the above exception, another exception occurred"
    if message is None:
        pytest.skip("llmbench: planned")
    if not message:
        pytest.skip("llmbench: the run stopped before this case's answer arrived")
    pytest.fail(message, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    tracked = CASE in item.stash or item.get_closest_marker("llmbench") is not None
    final = call.when == "call" or (call.when == "setup" and report.outcome != "passed")
    if tracked and final and item.config.stash[STATE].phase == "run":
        # on the item: junitxml writes the properties of the teardown report, which
        # pytest builds later from item.user_properties (xdist carries them too)
        for name, value in _case_properties(item, report, call.excinfo).items():
            item.user_properties.append((f"llm.{name}", value))
    return report


def _case_properties(item: pytest.Item, report: pytest.TestReport, excinfo: Any) -> dict[str, Any]:
    counted = item.stash.get(CASE, None)
    acc = counted.result if counted is not None else CaseAccumulator().result
    callspec = getattr(item, "callspec", None)
    param = callspec.params.get(PARAM_FIXTURE) if callspec is not None else None
    outcome: str = report.outcome
    error = None
    api_error = item.stash.get(API_ERROR, None)
    if api_error is not None:
        outcome = "error"
        error = api_error.splitlines()[0][:300]
    elif excinfo is not None and report.when != "call":
        outcome = "error"
        error = (str(excinfo.value).splitlines() or [excinfo.typename])[0][:300]
    elif outcome == "failed" and excinfo is not None:
        error = (str(excinfo.value).splitlines() or [excinfo.typename])[0][:300]
    # the case's own result, finished in place (it is this item's alone)
    acc.nodeid, acc.module = item.nodeid, item.nodeid.split("::", 1)[0]
    acc.suite = getattr(item, "originalname", item.name)
    if param:
        acc.item_id, acc.temperature, acc.sample = param[0].id, param[1], param[2]
    _grade_fields(item, acc, param)
    acc.outcome, acc.error = outcome, error
    acc.latency_s, acc.duration_s = round(acc.latency_s, 6), round(report.duration, 6)
    return acc.to_dict()


def _grade_fields(item: pytest.Item, acc: Any, param: Any) -> None:
    """The question, expected answer and normalised answer the report shows."""
    from .scoring import graded_fields

    marker = item.get_closest_marker("llmbench")
    normalizer = marker.kwargs.get("normalize") if marker is not None else None
    data = dict(param[0].data) if param else None
    try:
        acc.question, acc.expected, acc.answer = graded_fields(
            item.stash.get(CHECKED, None), data, acc.response, normalizer
        )
    except Exception as exc:  # a suite's normalizer must not lose the case's result
        acc.answer = f"<normalize failed: {type(exc).__name__}: {exc}>"[:300]
