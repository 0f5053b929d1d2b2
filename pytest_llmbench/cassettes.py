"""Cassettes: record a suite's HTTP traffic once, replay it with no key and no network.

vcrpy glue; vcrpy itself is imported on the first cassette, so ``pytest --help`` stays fast.

- **Layout**: one YAML file per case, ``cassettes/<module stem>/<test name>.yaml`` beside the
  suite. A case runs in one xdist worker, so no two processes write one file.
- **Matching**: the origin (the base URL, or the built-in simulator, filed under
  ``SIM_BASE`` whatever its port), method, path, body as canonical JSON, and the case: the
  fetch stage sends every case's planned calls from one process (:func:`case_scope`). A
  recording replays only for the server it was recorded on, so the simulator's answers
  never stand in for the real API's.
- **Scrubbing**: only ``content-type`` and ``x-request-id`` headers are written. Rate limits,
  server errors and auth failures are not recorded: a replay never waits for them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from .errors import LLMCallError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from .runtime import RunState

#: where the built-in simulator's requests are filed (it listens on a new port every run)
SIM_BASE = "http://simulator.llmbench.invalid/v1"
#: in memory only, never sent nor written: the case a fetch-stage request belongs to
CASE_HEADER = "x-llmbench-case"
REQUEST_HEADERS = frozenset({"content-type"})
RESPONSE_HEADERS = frozenset({"content-type", "x-request-id"})
KEY_PLACEHOLDER = "<OPENAI_API_KEY>"
#: the SDK needs some key to build a request; in record mode none no request leaves
REPLAY_KEY = "sk-fake-cassette-replay-nothing-is-sent"
MAX_NAME_BYTES = 120
_FORBIDDEN = "<>?%*:|\"'/\\"
# vcrpy's mode for each of ours; "once" is decided per case file in _Policy.protected
_VCR_MODE = {"none": "none", "once": "new_episodes", "new_episodes": "new_episodes", "all": "all"}
# only httpx2 (openai 3.x) needs patching; vcrpy 9 can leave the other libraries alone
_SKIP_PATCHERS = ("httplib", "requests", "boto3", "urllib3", "httplib2", "tornado", "aiohttp")

_case: ContextVar[str | None] = ContextVar("llmbench_cassette_case", default=None)


class CassetteMissError(LLMCallError):
    """A request has no recorded answer and the record mode forbids sending it (an
    LLMCallError: never retried, and the case reports an error, not a wrong answer)."""


def cassette_name(nodeid: str) -> str:
    """``Class.test_name[param]`` as a file name. As pytest-recording: forbidden characters
    become ``-`` and a name too long keeps its start and a hash. Unlike it, a replaced
    character adds a short hash, so two cases never share a file (nor two workers)."""
    raw = nodeid.partition("::")[2].replace("::", ".")
    name = "".join("-" if ch in _FORBIDDEN or ord(ch) < 32 else ch for ch in raw)
    digest = hashlib.sha256(raw.encode()).hexdigest()
    if name != raw:
        name += f"~{digest[:8]}"
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    head = name.encode()[: MAX_NAME_BYTES - 19].decode(errors="ignore")
    return f"{head}...{digest[:16]}"


def cassette_path(nodeid: str, rootpath: Path, cassette_dir: Path | None) -> Path:
    """The one file that holds a case's interactions."""
    module = Path(nodeid.partition("::")[0])
    if cassette_dir is None:
        base = (rootpath / module).parent / "cassettes" / module.stem
    else:  # the module's path below DIR: two test_x.py in different folders never share
        base = cassette_dir.joinpath(*[p for p in module.with_suffix("").parts if p != ".."])
    return base / f"{cassette_name(nodeid)}.yaml"


def any_cassettes(config: pytest.Config, cassette_dir: Path | None) -> bool:
    """Whether the suites this run selects have cassettes (stops at the first found)."""
    if cassette_dir is not None:
        return cassette_dir.is_dir() and any(cassette_dir.rglob("*.yaml"))
    prune = [".*", "__*", "node_modules", *map(str, config.getini("norecursedirs") or [])]
    for arg in config.args:
        path = config.invocation_params.dir / str(arg).partition("::")[0]
        if path.is_file() and any((path.parent / "cassettes" / path.stem).glob("*.yaml")):
            return True
        for top, dirs, _files in os.walk(path):  # a file walks nothing; pruned as pytest does
            dirs[:] = [d for d in dirs if not any(fnmatch(d, p) for p in prune)]
            if "cassettes" in dirs and any(Path(top, "cassettes").glob("*/*.yaml")):
                return True
    return False


def configure(config: pytest.Config, state: RunState, shared: dict[str, Any]) -> None:
    """Decide the run's record mode (the controller; children inherit it) and its effects."""
    given = state.options.cassette_dir
    if given is not None:
        state.cassette_dir = given if given.is_absolute() else config.rootpath / given
    controller = not hasattr(config, "workerinput") and state.phase == "run"
    mode = shared.get("record_mode", state.options.record_mode)
    if "record_mode" not in shared:
        # precedence: an explicit mode; else replay when there is no key, no simulator,
        # and cassettes to play; else no cassettes at all
        cfg = state.llm_config
        asked_help = getattr(config.option, "help", False) or getattr(config.option, "version", 0)
        keyless = cfg.api_key is None and not (state.sim_enabled or cfg.batch.enabled)
        if mode is None and controller and keyless and not asked_help:
            mode = "none" if any_cassettes(config, state.cassette_dir) else None
    state.record_mode = mode
    if mode is None:
        return
    if state.llm_config.batch.enabled:
        raise pytest.UsageError(
            "--llm-record-mode: cassettes cannot be combined with --batch-api "
            "(batch uploads are multipart with a random boundary); drop one of the two"
        )
    if state.fresh_since is None:
        # recording must reach HTTP, and a replay must come from the cassettes, not from
        # answers an earlier run left in the store
        state.fresh_since = state.started_at
    if mode == "none":
        # a replay sends nothing: nothing to pace (whatever limits an earlier live run
        # left in the budget's state), and no key is needed nor sent
        changes: dict[str, Any] = {"rpm": None, "tpm": None, "budget_url": "none"}
        if state.llm_config.api_key is None:
            changes["api_key"] = REPLAY_KEY
        state.llm_config = state.llm_config.with_changes(**changes)


@contextlib.contextmanager
def case_scope(nodeid: str) -> Iterator[None]:
    """Files the requests sent inside (one asyncio task of the fetch stage) under ``nodeid``."""
    token = _case.set(nodeid)
    try:
        yield
    finally:
        _case.reset(token)


def case_cassette(state: RunState, nodeid: str) -> AbstractContextManager[Any]:
    """The cassette of one case, around its test (the ``llm`` fixture)."""
    return _use(state, [nodeid], default_case=nodeid)


def fetch_cassette(state: RunState, nodeids: Iterable[str]) -> AbstractContextManager[Any]:
    """One in-memory cassette of every planned case, saved back split per case."""
    if state.record_mode is None:
        return contextlib.nullcontext()
    return _use(state, nodeids, default_case=None)


def _use(
    state: RunState, nodeids: Iterable[str], default_case: str | None
) -> AbstractContextManager[Any]:
    from vcr.cassette import CassetteContextDecorator  # type: ignore[import-untyped]

    from .store import SIM_ORIGIN

    root, cfg, started = state.config.rootpath, state.llm_config, int(state.started_at * 1e9)
    paths = {n: cassette_path(n, root, state.cassette_dir) for n in dict.fromkeys(nodeids)}
    secret = cfg.api_key.get_secret_value() if cfg.api_key is not None else None
    base = cfg.endpoint.rstrip("/")
    filed = SIM_BASE if state.origin == SIM_ORIGIN else base
    policy = _Policy(
        str(state.record_mode), started, base, filed, root, secret, paths, default_case
    )
    return CassetteContextDecorator.from_args(  # type: ignore[no-any-return]
        _cassette_class(),
        path=str(policy.paths[default_case]) if default_case else "<llmbench fetch stage>",
        policy=policy,
        persister=policy,
        serializer=_serializer(),
        record_mode=_VCR_MODE[policy.mode],
        match_on=(_same_request,),
        before_record_request=policy.filter_request,
        before_record_response=policy.filter_response,
        **_patcher_options(),
    )


@functools.cache
def _patcher_options() -> dict[str, Any]:
    """``skip_patchers=`` where vcrpy has it (9.x, Python 3.11+). vcrpy 8.x, the newest for
    Python 3.10, has no such argument and patches every library it knows for the cassette's
    duration: nothing of ours speaks HTTP through them, so that costs time, not behaviour."""
    from vcr.cassette import Cassette

    if "skip_patchers" in inspect.signature(Cassette.__init__).parameters:
        return {"skip_patchers": _SKIP_PATCHERS}
    return {}


@dataclass(frozen=True)
class _Policy:
    """What a cassette may do, how requests and responses are filtered, and (as vcrpy's
    persister) how the cases' files are read as one cassette and written back apart."""

    mode: str
    started_ns: int
    base_url: str  # where requests go
    filed_base: str  # where they are filed: the origin the cassette records
    rootpath: Path
    # never in the repr: vcrpy logs its filters (bound methods of this object) at INFO
    secret: str | None = field(repr=False)
    paths: dict[str, Path]  # node id -> its cassette
    default_case: str | None  # the case of requests sent outside case_scope

    def path_of(self, request: Any) -> Path:
        return self.paths[request.headers.get(CASE_HEADER)]

    def protected(self, request: Any) -> bool:
        """Whether a request with no recorded answer must fail instead of being sent."""
        if self.mode != "once":
            return self.mode == "none"
        # "once" closes a case's cassette once it exists; a file written during this run
        # (the fetch stage recorded the case's first call) still takes its later calls
        try:
            return self.path_of(request).stat().st_mtime_ns < self.started_ns
        except OSError:
            return False

    def miss(self, request: Any, elsewhere: set[str]) -> CassetteMissError:
        """The error of a request with no recorded answer; ``elsewhere`` names the other
        servers the same request was recorded on."""
        path = self.path_of(request)
        shown = os.path.relpath(path, self.rootpath) if path.is_relative_to(self.rootpath) else path
        fix = (
            "the cassette exists: add the request with --llm-record-mode new_episodes"
            if self.mode == "once"
            else "record it with a key and --llm-record-mode new_episodes"
        )
        if elsewhere:
            names = ", ".join(sorted(_describe(o) for o in elsewhere))
            fix = (
                f"it was recorded on {names}, not on {_describe(_origin(request))}: answers "
                "replay only for the server that gave them (--llm-sim for the simulator's)"
            )
        return CassetteMissError(
            f"no recorded answer in cassette {shown} for {request.method} "
            f"{request.parsed_uri.path} {_excerpt(_body(request))} (--llm-record-mode "
            f"{self.mode}: nothing was sent; {fix})"
        )

    # -- filters, applied by vcrpy before matching and before recording
    def filter_request(self, request: Any) -> Any:
        request = copy.deepcopy(request)
        if request.uri.startswith(self.base_url + "/"):
            request.uri = self.filed_base + request.uri[len(self.base_url) :]
        keep = REQUEST_HEADERS | {CASE_HEADER}
        headers = {k: v for k, v in request.headers.items() if k.lower() in keep}
        case = _case.get() or headers.get(CASE_HEADER) or self.default_case
        request.headers = {**headers, CASE_HEADER: case} if case else headers
        request.body = _pretty_json(request.body, sort_keys=True)
        return request

    def filter_response(self, response: dict[str, Any]) -> dict[str, Any] | None:
        from vcr.filters import decode_response  # type: ignore[import-untyped]

        status = int(response["status"]["code"])
        if not (status < 300 or status in (400, 404, 422)):
            return None  # a 429, 5xx or auth failure is not the answer to the request
        response = decode_response(response)
        headers = response["headers"].items()
        response["headers"] = {k: v for k, v in headers if k.lower() in RESPONSE_HEADERS}
        body = response.get("body") or {}
        body["string"] = _pretty_json(body.get("string"), sort_keys=False)
        return response

    # -- vcrpy's persister interface
    def load_cassette(self, cassette_path: str, serializer: Any) -> tuple[list[Any], list[Any]]:
        from vcr.persisters.filesystem import CassetteNotFoundError  # type: ignore[import-untyped]

        loaded = []
        if self.mode != "all":  # "all" records everything anew; merged per case on save
            for nodeid, path in self.paths.items():
                for request, response in _read(path):
                    request.headers[CASE_HEADER] = nodeid
                    loaded.append((request, response))
        if not loaded:
            raise CassetteNotFoundError()
        return [q for q, _ in loaded], [s for _, s in loaded]

    def save_cassette(self, cassette_path: str, cassette_dict: Any, serializer: Any) -> None:
        groups: dict[Path, list[tuple[Any, Any]]] = {}
        for request, response in zip(
            cassette_dict["requests"], cassette_dict["responses"], strict=True
        ):
            nodeid = request.headers.get(CASE_HEADER)
            if nodeid in self.paths:
                request = copy.deepcopy(request)
                del request.headers[CASE_HEADER]  # the file says whose it is
                groups.setdefault(self.paths[nodeid], []).append((request, response))
        for path, new in groups.items():
            if self.mode == "all":  # vcrpy's "all": keep what was not recorded again
                fresh = {_key(q) for q, _ in new}
                new = [(q, s) for q, s in _read(path) if _key(q) not in fresh] + new
            self._write(path, new)

    def _write(self, path: Path, interactions: list[tuple[Any, Any]]) -> None:
        """One case's cassette, written atomically; an unchanged file is not touched."""
        from vcr.serialize import serialize  # type: ignore[import-untyped]

        requests, responses = [q for q, _ in interactions], [s for _, s in interactions]
        text = serialize({"requests": requests, "responses": responses}, _serializer())
        if self.secret:
            text = text.replace(self.secret, KEY_PLACEHOLDER)  # defence in depth
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == text:
                return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def _read(path: Path) -> list[tuple[Any, Any]]:
    from vcr.serialize import deserialize

    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not text.strip():
        return []
    requests, responses, *_metadata = deserialize(text, _serializer())
    return list(zip(requests, responses, strict=True))


def _cassette_class() -> Any:
    # not cached: vcrpy may be imported afresh (pytester), and must catch its own NotFound
    from vcr.cassette import Cassette

    class LLMCassette(Cassette):  # type: ignore[misc]
        """Finds interactions by index (vcrpy compares with every recorded one: quadratic
        over a fetch stage), and fails a miss with CassetteMissError before any I/O."""

        def __init__(self, *, policy: _Policy, **kwargs: Any) -> None:
            self.policy = policy
            self._index: dict[tuple[Any, ...], list[int]] = {}
            self._origins: dict[tuple[Any, ...], set[str]] = {}  # key less origin -> origins
            self._indexed = 0
            super().__init__(**kwargs)

        def _responses(self, request: Any) -> Iterator[tuple[int, Any]]:
            self._catch_up()
            request = self._before_record_request(request)
            for i in self._index.get(_key(request), ()) if request else ():
                yield i, self.data[i][1]

        def _catch_up(self) -> None:
            for i in range(self._indexed, len(self.data)):  # self.data only grows
                recorded = self.data[i][0]
                key = _key(recorded)
                self._index.setdefault(key, []).append(i)
                self._origins.setdefault(key[1:], set()).add(key[0])
            self._indexed = len(self.data)

        @property
        def write_protected(self) -> bool:
            return self.policy.mode in ("none", "once")  # then vcrpy asks filter_request

        def filter_request(self, request: Any) -> Any:
            filtered = super().filter_request(request)
            if filtered is not None and self.policy.protected(filtered):
                self._catch_up()
                elsewhere = self._origins.get(_key(filtered)[1:], set()) - {_origin(filtered)}
                raise self.policy.miss(filtered, elsewhere)
            return None  # not refused: the request is sent and recorded

    return LLMCassette


def _key(request: Any) -> tuple[Any, ...]:
    """What two requests must share to match (the origin first)."""
    case, path, query = request.headers.get(CASE_HEADER), request.path or "/", request.query
    body = _canonical(_body(request))
    return (_origin(request), case, request.method, path, tuple(query), body)


def _origin(request: Any) -> str:
    """The server a (filtered) request is filed under: scheme and host of its URI."""
    parts = urlsplit(request.uri)
    return f"{parts.scheme}://{parts.netloc}"


def _describe(origin: str) -> str:
    return "the built-in simulator (--llm-sim)" if SIM_BASE.startswith(origin) else origin


def _same_request(r1: Any, r2: Any) -> bool:
    return _key(r1) == _key(r2)


def _body(request: Any) -> Any:
    from vcr.util import read_body  # type: ignore[import-untyped]

    return read_body(request)  # bytes (or a file-like body read at once)


@functools.lru_cache(maxsize=4096)
def _canonical(body: bytes | str | None) -> str | bytes:
    if not body:
        return b""
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"))
    except (ValueError, UnicodeDecodeError):
        return body.encode() if isinstance(body, str) else body


def _pretty_json(body: Any, *, sort_keys: bool) -> Any:
    """JSON one field a line, for short diffs; anything else unchanged."""
    if not isinstance(body, (bytes, str)) or not body:
        return body
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    return (json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n").encode()


def _excerpt(body: Any, limit: int = 90) -> str:
    try:
        data = json.loads(body or "")
        if isinstance(data, dict) and "messages" in data:
            data = {"messages": data["messages"], **data}  # the prompt first
        text = json.dumps(data, ensure_ascii=False)
    except (ValueError, UnicodeDecodeError):
        text = repr(body)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@functools.cache
def _serializer() -> Any:
    """vcrpy's YAML format; multi-line strings as blocks, so a changed answer is one line."""
    import yaml  # type: ignore[import-untyped]
    from vcr.serializers import yamlserializer  # type: ignore[import-untyped]

    class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
        pass

    def text(dumper: Any, data: str) -> Any:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    dump = functools.partial(yaml.dump, Dumper=Dumper, allow_unicode=True, width=4096)
    return SimpleNamespace(serialize=dump, deserialize=yamlserializer.deserialize)
