"""Cassettes: record a suite's HTTP traffic once, replay it with no key and no network.

vcrpy glue, imported by the plugin only when a record mode is active (vcrpy itself is
imported on the first cassette, so ``pytest --help`` stays fast).

- **Layout**: one YAML file per test case, ``cassettes/<module stem>/<test name>.yaml``
  beside the suite (``--llm-cassette-dir DIR``: ``DIR/<module path>/<test name>.yaml``).
  A case runs in exactly one xdist worker, so no two processes ever write one file, and
  an edited prompt changes one small file.
- **Matching**: method, path (the request URL rewritten onto the default base URL, so a
  recording made against the simulator replays against any ``--llm-base-url``) and the
  body as canonical JSON. Requests of the fetch stage, which runs every case's first
  call in the controlling process, also match on their case (:func:`case_scope`).
- **Scrubbing**: only ``content-type`` (requests) and ``content-type`` and
  ``x-request-id`` (responses) are written; keys, organisation and project ids, cookies
  and ``x-stainless-*`` never are. Rate limits, server errors and auth failures are not
  recorded at all, so a replay never waits and never replays a transient failure.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .errors import LLMCallError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from .runtime import RunState

RECORD_MODES = ("none", "once", "new_episodes", "all")
#: where requests are filed in a cassette, whatever base URL they were sent to
CANONICAL_BASE = "https://api.openai.com/v1"
#: in-memory only (never sent, never written): which case a fetch-stage request is for
CASE_HEADER = "x-llmbench-case"
REQUEST_HEADERS = frozenset({"content-type"})
RESPONSE_HEADERS = frozenset({"content-type", "x-request-id"})
KEY_PLACEHOLDER = "<OPENAI_API_KEY>"
MAX_NAME_BYTES = 120
_FORBIDDEN = "<>?%*:|\"'/\\"
# vcrpy's meaning of each mode; "once" is decided per case file (see _Policy.protected)
_VCR_MODE = {"none": "none", "once": "new_episodes", "new_episodes": "new_episodes", "all": "all"}
_SKIP_PATCHERS = ("httplib", "requests", "boto3", "urllib3", "httplib2", "tornado", "aiohttp")

_case: ContextVar[str | None] = ContextVar("llmbench_cassette_case", default=None)


class CassetteMissError(LLMCallError):
    """A request has no recorded answer and the record mode forbids sending it."""


# ------------------------------------------------------------------------ layout
def cassette_name(nodeid: str) -> str:
    """``Class.test_name[param]`` of a node id, safe as a file name (pytest-recording's rule:
    forbidden characters become ``-``; names too long for a file name keep a hashed tail)."""
    name = nodeid.partition("::")[2].replace("::", ".")
    name = "".join("-" if ch in _FORBIDDEN or ord(ch) < 32 else ch for ch in name)
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    prefix = name
    while len(f"{prefix}...{digest}".encode()) > MAX_NAME_BYTES:
        prefix = prefix[:-1]
    return f"{prefix}...{digest}"


def cassette_path(nodeid: str, rootpath: Path, cassette_dir: Path | None) -> Path:
    """The one file that holds a case's interactions."""
    module = Path(nodeid.partition("::")[0])
    if cassette_dir is None:
        base = (rootpath / module).parent / "cassettes" / module.stem
    else:
        # the module's path below DIR, so two test_x.py in different folders never share
        parts = [p for p in module.with_suffix("").parts if p not in ("", ".", "..")]
        base = cassette_dir.joinpath(*parts)
    return base / f"{cassette_name(nodeid)}.yaml"


def any_cassettes(config: pytest.Config, cassette_dir: Path | None) -> bool:
    """Whether the suites this run selects have recorded cassettes (stops at the first)."""
    if cassette_dir is not None:
        return cassette_dir.is_dir() and any(cassette_dir.rglob("*.yaml"))
    prune = [str(p) for p in (config.getini("norecursedirs") or [])]
    for arg in config.args:
        path = config.invocation_params.dir / str(arg).partition("::")[0]
        if path.is_file():
            if any((path.parent / "cassettes" / path.stem).glob("*.yaml")):
                return True
            continue
        for top, dirs, _files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".") and not _pruned(d, prune)]
            if "cassettes" in dirs and any(Path(top, "cassettes").glob("*/*.yaml")):
                return True
    return False


def _pruned(name: str, patterns: list[str]) -> bool:
    return name in ("__pycache__", "node_modules") or any(fnmatch(name, p) for p in patterns)


# ------------------------------------------------------------------------ settings
def configure(config: pytest.Config, state: RunState, shared: dict[str, Any]) -> None:
    """Decide this run's record mode (controller; children inherit it) and what it implies."""
    settings = state.settings
    given = settings.get("llm_cassette_dir")
    if given is not None:
        state.cassette_dir = given if given.is_absolute() else config.rootpath / given
    controller = not hasattr(config, "workerinput") and state.phase == "run"
    if "record_mode" in shared:
        mode = shared["record_mode"]
    else:
        mode = settings.get("llm_record_mode")
        # the default: with no key, no simulator and cassettes to play, replay them
        help_only = getattr(config.option, "help", False) or getattr(config.option, "version", 0)
        if (
            mode is None
            and controller
            and not help_only
            and state.llm_config.api_key is None
            and not state.sim_enabled
            and not state.llm_config.batch.enabled
            and any_cassettes(config, state.cassette_dir)
        ):
            mode = "none"
    state.record_mode = mode
    if mode is None:
        return
    if state.llm_config.batch.enabled:
        raise pytest.UsageError(
            "--llm-record-mode: cassettes cannot be combined with --batch-api "
            "(batch uploads are multipart with a random boundary); drop one of the two"
        )
    if state.fresh_since is None:
        # recording must reach HTTP and replay must come from the cassette, not from
        # answers a previous run left in the store
        state.fresh_since = state.started_at
    if mode == "none":
        # a replay sends nothing, so it has nothing to pace
        state.llm_config = state.llm_config.with_changes(rpm=None, tpm=None, budget_url=None)
    if controller:
        where = state.cassette_dir or "cassettes/ beside each suite"
        what = "replaying only" if mode == "none" else "recording"
        state.summary_notes.append(f"llmbench cassettes: {what} (mode {mode}) in {where}")


# ------------------------------------------------------------------------ vcrpy glue
@contextlib.contextmanager
def case_scope(nodeid: str) -> Iterator[None]:
    """Marks the requests sent inside (one asyncio task of the fetch stage) as ``nodeid``'s."""
    token = _case.set(nodeid)
    try:
        yield
    finally:
        _case.reset(token)


def case_cassette(state: RunState, nodeid: str) -> AbstractContextManager[Any]:
    """The cassette of one case, around its test (the ``llm`` fixture)."""
    path = cassette_path(nodeid, state.config.rootpath, state.cassette_dir)
    policy = _Policy.of(state, lambda _request: path)
    return _use(policy, str(path), _CasePersister(policy))


def fetch_cassette(state: RunState, nodeids: Iterable[str]) -> AbstractContextManager[Any]:
    """One in-memory cassette of every planned case, saved back split per case."""
    if state.record_mode is None:
        return contextlib.nullcontext()
    root, folder = state.config.rootpath, state.cassette_dir
    paths = {n: cassette_path(n, root, folder) for n in dict.fromkeys(nodeids)}

    def path_of(request: Any) -> Path:
        return paths[request.headers.get(CASE_HEADER)]

    policy = _Policy.of(state, path_of)
    return _use(policy, "<llmbench fetch stage>", _FetchPersister(policy, paths))


@dataclass(frozen=True)
class _Policy:
    mode: str
    started_ns: int
    base_url: str
    rootpath: Path
    secret: str | None
    path_of: Callable[[Any], Path]

    @classmethod
    def of(cls, state: RunState, path_of: Callable[[Any], Path]) -> _Policy:
        key = state.llm_config.api_key
        return cls(
            mode=str(state.record_mode),
            started_ns=int(state.started_at * 1e9),
            base_url=(state.llm_config.base_url or CANONICAL_BASE).rstrip("/"),
            rootpath=state.config.rootpath,
            secret=key.get_secret_value() if key is not None else None,
            path_of=path_of,
        )

    def protected(self, request: Any) -> bool:
        """Whether a request without a recorded answer must fail instead of being sent."""
        if self.mode == "none":
            return True
        if self.mode != "once":
            return False
        # "once": a case's cassette is closed once it exists. A file written during this
        # run (the fetch stage recorded the case's first call) still takes the rest.
        try:
            return self.path_of(request).stat().st_mtime_ns < self.started_ns
        except OSError:
            return False

    def miss(self, request: Any) -> CassetteMissError:
        from vcr.util import read_body  # type: ignore[import-untyped]

        path = self.path_of(request)
        try:
            shown = str(path.relative_to(self.rootpath))
        except ValueError:
            shown = str(path)
        excerpt = _excerpt(read_body(request))
        fix = (
            "the cassette exists; add it with --llm-record-mode new_episodes"
            if self.mode == "once"
            else "record it with a key and --llm-record-mode new_episodes"
        )
        return CassetteMissError(
            f"no recorded answer in cassette {shown} for {request.method} "
            f"{request.parsed_uri.path} {excerpt} (--llm-record-mode {self.mode}: nothing "
            f"was sent; {fix})"
        )

    # -- filters, applied to requests before matching and recording, and to responses
    def filter_request(self, request: Any) -> Any:
        request = copy.deepcopy(request)
        if request.uri.startswith(self.base_url + "/"):
            request.uri = CANONICAL_BASE + request.uri[len(self.base_url) :]
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in REQUEST_HEADERS or k.lower() == CASE_HEADER
        }
        case = _case.get()
        if case is not None:
            headers[CASE_HEADER] = case
        request.headers = headers
        request.body = _pretty_json(request.body, sort_keys=True)
        return request

    def filter_response(self, response: dict[str, Any]) -> dict[str, Any] | None:
        from vcr.filters import decode_response  # type: ignore[import-untyped]

        status = int(response["status"]["code"])
        if not (status < 300 or status in (400, 404, 422)):
            return None  # rate limits, server errors, auth failures: not part of the answer
        response = decode_response(response)
        response["headers"] = {
            k: v for k, v in response["headers"].items() if k.lower() in RESPONSE_HEADERS
        }
        body = response.get("body") or {}
        body["string"] = _pretty_json(body.get("string"), sort_keys=False)
        return response

    # -- files
    def write(self, path: Path, requests: list[Any], responses: list[Any]) -> None:
        """Write one case's cassette atomically; an unchanged file is left untouched."""
        from vcr.serialize import serialize  # type: ignore[import-untyped]

        if not requests:
            return
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


def _read(path: Path) -> tuple[list[Any], list[Any]] | None:
    from vcr.serialize import deserialize

    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.strip():
        return None
    requests, responses, *_meta = deserialize(text, _serializer())
    return list(requests), list(responses)


class _CasePersister:
    def __init__(self, policy: _Policy) -> None:
        self.policy = policy

    def load_cassette(self, cassette_path: str, serializer: Any) -> tuple[list[Any], list[Any]]:
        from vcr.persisters.filesystem import CassetteNotFoundError  # type: ignore[import-untyped]

        loaded = _read(Path(cassette_path))
        if loaded is None:
            raise CassetteNotFoundError()
        return loaded

    def save_cassette(self, cassette_path: str, cassette_dict: Any, serializer: Any) -> None:
        self.policy.write(
            Path(cassette_path), cassette_dict["requests"], cassette_dict["responses"]
        )


class _FetchPersister:
    """Loads the cassettes of many cases as one, tagging each request with its case, and
    saves each case's interactions back to its own file without the tag."""

    def __init__(self, policy: _Policy, paths: dict[str, Path]) -> None:
        self.policy = policy
        self.paths = paths

    def load_cassette(self, cassette_path: str, serializer: Any) -> tuple[list[Any], list[Any]]:
        from vcr.persisters.filesystem import CassetteNotFoundError

        requests: list[Any] = []
        responses: list[Any] = []
        for nodeid, path in self.paths.items():
            loaded = _read(path)
            if loaded is None:
                continue
            for request in loaded[0]:
                request.headers[CASE_HEADER] = nodeid
            requests += loaded[0]
            responses += loaded[1]
        if not requests:
            raise CassetteNotFoundError()
        return requests, responses

    def save_cassette(self, cassette_path: str, cassette_dict: Any, serializer: Any) -> None:
        groups: dict[str, tuple[list[Any], list[Any]]] = {}
        pairs = zip(cassette_dict["requests"], cassette_dict["responses"], strict=True)
        for request, response in pairs:
            nodeid = request.headers.get(CASE_HEADER)
            if nodeid not in self.paths:
                continue
            request = copy.deepcopy(request)
            del request.headers[CASE_HEADER]
            group = groups.setdefault(nodeid, ([], []))
            group[0].append(request)
            group[1].append(response)
        for nodeid, (requests, responses) in groups.items():
            self.policy.write(self.paths[nodeid], requests, responses)


def _use(policy: _Policy, path: str, persister: Any) -> AbstractContextManager[Any]:
    from vcr.cassette import CassetteContextDecorator  # type: ignore[import-untyped]

    return CassetteContextDecorator.from_args(  # type: ignore[no-any-return]
        _cassette_class(),
        path=path,
        policy=policy,
        persister=persister,
        serializer=_serializer(),
        record_mode=_VCR_MODE[policy.mode],
        match_on=(_match_method, _match_path, _match_body, _match_case),
        before_record_request=policy.filter_request,
        before_record_response=policy.filter_response,
        skip_patchers=_SKIP_PATCHERS,
    )


@functools.cache
def _cassette_class() -> Any:
    from vcr.cassette import Cassette

    class LLMCassette(Cassette):  # type: ignore[misc]
        """A cassette that fails a miss with :class:`CassetteMissError`, before any I/O."""

        def __init__(self, *, policy: _Policy, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.policy = policy

        @property
        def write_protected(self) -> bool:
            # vcrpy asks filter_request only when this is true; the policy decides per case
            return self.policy.mode in ("none", "once")

        def filter_request(self, request: Any) -> Any:
            filtered = super().filter_request(request)
            if filtered is not None and self.policy.protected(filtered):
                raise self.policy.miss(filtered)
            return None  # nothing to refuse: the request is sent and recorded

    return LLMCassette


# ------------------------------------------------------------------------ matchers
def _match_method(r1: Any, r2: Any) -> None:
    if r1.method != r2.method:
        raise AssertionError(f"{r1.method} != {r2.method}")


def _match_path(r1: Any, r2: Any) -> None:
    if (r1.path, r1.query) != (r2.path, r2.query):
        raise AssertionError(f"{r1.path} != {r2.path}")


def _match_body(r1: Any, r2: Any) -> None:
    from vcr.util import read_body

    if _canonical(read_body(r1)) != _canonical(read_body(r2)):
        raise AssertionError("the bodies differ (compared as canonical JSON)")


def _match_case(r1: Any, r2: Any) -> None:
    if r1.headers.get(CASE_HEADER) != r2.headers.get(CASE_HEADER):
        raise AssertionError("recorded for another case")


# ------------------------------------------------------------------------ bodies and YAML
def _canonical(body: Any) -> Any:
    if isinstance(body, str):
        body = body.encode()
    if not body:
        return b""
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"))
    except (ValueError, UnicodeDecodeError):
        return bytes(body)


def _pretty_json(body: Any, *, sort_keys: bool) -> Any:
    """JSON one field a line (short diffs); anything else unchanged."""
    if not isinstance(body, (bytes, str)) or not body:
        return body
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    return (json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n").encode()


def _excerpt(body: Any, limit: int = 100) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        data = json.loads(body or "")
    except ValueError:
        text = str(body or "")
    else:
        if isinstance(data, dict) and "messages" in data:
            data = {"messages": data["messages"], **data}  # the prompt first
        text = json.dumps(data, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@functools.cache
def _serializer() -> Any:
    """vcrpy's YAML format (any vcrpy reads these files), with multi-line strings as blocks."""
    import yaml  # type: ignore[import-untyped]
    from vcr.serializers import yamlserializer  # type: ignore[import-untyped]

    base = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

    class Dumper(base):  # type: ignore[misc, valid-type]
        pass

    def text(dumper: Any, data: str) -> Any:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)

    class Serializer:
        @staticmethod
        def serialize(data: Any) -> str:
            return str(yaml.dump(data, Dumper=Dumper, allow_unicode=True, width=4096))

        @staticmethod
        def deserialize(text: str) -> Any:
            return yamlserializer.deserialize(text)

    return Serializer()
