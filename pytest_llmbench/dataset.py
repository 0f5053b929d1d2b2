"""Loading benchmark datasets (JSONL, JSON, CSV, iterables, Hugging Face datasets) into
items with stable ids.

An item's id ends up in the pytest node id, which keys ``--lf`` history, cassettes and
stored responses. So ids come from an id field or from a hash of the row's content, never
from the row's position: inserting a row must not re-key the rows after it.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

from .errors import DatasetError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "DatasetSource",
    "Item",
    "case_id",
    "clear_cache",
    "format_temperature",
    "load_dataset",
    "sanitize_id",
    "select",
]

SUPPORTED_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv")

DatasetSource: TypeAlias = (
    str | os.PathLike[str] | Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]]
)

_MAX_ID_LEN = 40
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_JSON_WS = re.compile(r"[ \t\n\r]*")
_JSON_TYPES = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
_HF_PREFIX = "hf:"  # hf_dataset.PREFIX, without importing that module for every file dataset


@dataclass(frozen=True)
class Item:
    """One dataset row.

    ``id`` is safe to use in a pytest node id; ``line`` is the 1-based line the row starts
    on (None for rows from an iterable or a Hugging Face dataset); ``source`` is the path as
    given, ``hf:NAME[:CONFIG]@SPLIT`` for a Hugging Face dataset, or a name for an
    iterable. ``data`` is shared by every test that loads the same file: treat it as
    read-only.
    """

    id: str
    data: dict[str, Any]
    line: int | None
    source: str

    def __getitem__(self, field: str) -> Any:
        return self.data[field]


@dataclass(frozen=True)
class _Row:
    data: dict[str, Any]
    # the line for files, the 1-based position for iterables, the 0-based row index for hf
    where: int


# how _make_items names a row: "file:LINE", "name:POSITION", "dataset ..., row INDEX"
_Unit: TypeAlias = Literal["line", "item", "row"]
# (resolved path, mtime, size, id_field, required) for files; ("hf", name, config, split,
# revision, id_field, required) for Hugging Face datasets
_CacheKey: TypeAlias = tuple[object, ...]
_cache: dict[_CacheKey, list[Item]] = {}
_cache_lock = threading.Lock()


def load_dataset(
    source: DatasetSource,
    *,
    base_dir: Path | None = None,
    id_field: str | None = None,
    required: Sequence[str] = (),
    hf_config: str | None = None,
    hf_split: str | None = None,
    hf_revision: str | None = None,
) -> list[Item]:
    """Load a dataset and give every row a stable id.

    ``source`` is a path to a ``.jsonl``/``.ndjson``, ``.json`` (an array of objects) or
    ``.csv`` file (header row, values stay strings), relative to ``base_dir`` (the test
    file's directory); or an iterable of mappings, or a callable returning one; or
    ``"hf:ORG/NAME"`` (also ``hf:ORG/NAME:CONFIG@SPLIT``, or ``hf:`` and a local dataset
    directory), a Hugging Face dataset read with the ``datasets`` library (the ``hf``
    extra): ``hf_config`` names its config (default: the dataset's default), ``hf_split``
    its split (default ``"test"``), ``hf_revision`` a branch, tag or commit. Its values
    become JSON values (numpy numbers Python numbers, dates ISO strings); a column JSON
    cannot hold (bytes) is an error naming the row (0-based, as ``dataset[i]``) and field.

    The id is ``str(row[id_field])`` when ``id_field`` is given, else the first 8 hex
    digits of the sha256 of the row's canonical JSON (16 for rows whose first 8 collide).
    Either way it is sanitised for node ids (see :func:`sanitize_id`). Two rows with the
    same id are an error, and so are two identical rows without ``id_field``: identical
    content cannot get distinct stable ids.

    Files are cached per process by (resolved path, mtime, size, id_field, required), so a
    dataset used by several tests is read once; Hugging Face datasets by (name, config,
    split, revision, id_field, required). Raises :class:`DatasetError`.
    """
    hf_args = {"hf_config": hf_config, "hf_split": hf_split, "hf_revision": hf_revision}
    if isinstance(source, str) and source.startswith(_HF_PREFIX):
        return _load_hf(source, base_dir, id_field, tuple(required), hf_args)
    given = [name for name, value in hf_args.items() if value is not None]
    if given:
        raise DatasetError(
            f"{given[0]}= applies only to a Hugging Face dataset (dataset='hf:ORG/NAME')",
            path=str(source) if isinstance(source, (str, os.PathLike)) else None,
        )
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source), base_dir, id_field, tuple(required))
    if isinstance(source, Mapping):
        raise DatasetError("got a single mapping; pass a list of rows or a path")
    if callable(source):
        name = f"{getattr(source, '__qualname__', type(source).__name__)}()"
        rows = source()
    else:
        name, rows = "<iterable>", source
    try:
        iterator = iter(rows)
    except TypeError:
        raise DatasetError(f"expected an iterable of rows, got {type(rows).__name__}") from None
    parsed: list[_Row] = []
    for pos, row in enumerate(iterator, start=1):
        if not isinstance(row, Mapping):
            raise DatasetError(f"expected a mapping, got {type(row).__name__}", path=name, line=pos)
        parsed.append(_Row(dict(row), pos))
    return _make_items(parsed, name, id_field, tuple(required), unit="item")


def clear_cache() -> None:
    """Forget every dataset loaded from a file in this process."""
    with _cache_lock:
        _cache.clear()


def _load_file(
    given: Path, base_dir: Path | None, id_field: str | None, required: tuple[str, ...]
) -> list[Item]:
    display = str(given)
    path = given if given.is_absolute() or base_dir is None else base_dir / given
    resolved = path.resolve()
    try:
        st = resolved.stat()
    except FileNotFoundError:
        raise DatasetError(f"file not found (resolved to {resolved})", path=display) from None
    except OSError as exc:
        raise DatasetError(f"cannot read: {exc.strerror} ({resolved})", path=display) from None
    key: _CacheKey = (str(resolved), st.st_mtime_ns, st.st_size, id_field, required)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return list(cached)

    suffix = resolved.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        raise DatasetError(f"unknown extension {suffix!r}; supported: {supported}", path=display)
    try:
        raw = resolved.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read: {exc.strerror} ({resolved})", path=display) from None
    # utf-8-sig: spreadsheet exports often start with a BOM that would end up in a key.
    body = raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = body.count(b"\n", 0, exc.start) + 1
        column = exc.start - (body.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DatasetError(
            f"not UTF-8 text: byte 0x{body[exc.start]:02x} at column {column} ({exc.reason}); "
            "save the file as UTF-8",
            path=display,
            line=line,
        ) from None

    if suffix == ".csv":
        rows = _parse_csv(text, display)
    elif suffix == ".json":
        rows = _parse_json_array(text, display)
    else:
        rows = _parse_jsonl(text, display)
    items = _make_items(rows, display, id_field, required, unit="line")
    with _cache_lock:
        _cache[key] = items
    return list(items)


def _load_hf(
    given: str,
    base_dir: Path | None,
    id_field: str | None,
    required: tuple[str, ...],
    hf_args: Mapping[str, str | None],
) -> list[Item]:
    from .hf_dataset import load_rows, parse_source

    source = parse_source(
        given,
        base_dir=base_dir,
        config=hf_args["hf_config"],
        split=hf_args["hf_split"],
        revision=hf_args["hf_revision"],
    )
    key: _CacheKey = (
        "hf",
        source.name,
        source.config,
        source.split,
        source.revision,
        id_field,
        required,
    )
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return list(cached)
    rows = [_Row(data, index) for index, data in load_rows(source)]
    items = _make_items(
        rows, source.where, id_field, required, unit="row", item_source=source.canonical
    )
    with _cache_lock:
        _cache[key] = items
    return list(items)


def _parse_jsonl(text: str, path: str) -> list[_Row]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines cuts.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=lineno
            ) from None
        if not isinstance(value, dict):
            raise _not_an_object(value, path, lineno)
        rows.append(_Row(value, lineno))
    return rows


def _parse_json_array(text: str, path: str) -> list[_Row]:
    # Decoding element by element gives each row the line it starts on, for error messages.
    decoder = json.JSONDecoder()
    rows: list[_Row] = []
    line, counted = 1, 0

    def skip_ws(pos: int) -> int:
        match = _JSON_WS.match(text, pos)
        return match.end() if match else pos

    def fail(message: str, pos: int) -> DatasetError:
        return DatasetError(message, path=path, line=text.count("\n", 0, pos) + 1)

    pos = skip_ws(0)
    if not text.startswith("[", pos):
        if text.startswith("{", pos):
            raise fail("expected a JSON array of objects, got an object (use [...] or .jsonl)", pos)
        raise fail("expected a JSON array of objects", pos)
    pos = skip_ws(pos + 1)
    closed = text.startswith("]", pos)
    if closed:
        pos += 1
    while not closed:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"invalid JSON: {exc.msg}", path=path, line=exc.lineno) from None
        line += text.count("\n", counted, pos)
        counted = pos
        if not isinstance(value, dict):
            raise _not_an_object(value, path, line)
        rows.append(_Row(value, line))
        pos = skip_ws(end)
        if text.startswith(",", pos):
            pos = skip_ws(pos + 1)
        elif text.startswith("]", pos):
            pos, closed = pos + 1, True
        else:
            raise fail("invalid JSON: expected ',' or ']' after an array element", pos)
    if skip_ws(pos) != len(text):
        raise fail("invalid JSON: extra data after the array", skip_ws(pos))
    return rows


def _not_an_object(value: object, path: str, line: int) -> DatasetError:
    kind = _JSON_TYPES.get(type(value), "a number")
    return DatasetError(f"expected a JSON object, got {kind}", path=path, line=line)


def _parse_csv(text: str, path: str) -> list[_Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DatasetError(f"invalid CSV: {exc}", path=path, line=1) from None
    dupes = [name for i, name in enumerate(header) if name in header[:i]]
    if dupes:
        raise DatasetError("duplicate column in the header", path=path, line=1, field=dupes[0])
    rows = []
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DatasetError(f"invalid CSV: {exc}", path=path, line=start) from None
        if record:  # a blank line
            if len(record) != len(header):
                raise DatasetError(
                    f"expected {len(header)} columns (as in the header), got {len(record)}",
                    path=path,
                    line=start,
                )
            rows.append(_Row(dict(zip(header, record, strict=True)), start))
        start = reader.line_num + 1
    return rows


def _make_items(
    rows: list[_Row],
    source: str,
    id_field: str | None,
    required: tuple[str, ...],
    *,
    unit: _Unit,
    item_source: str | None = None,
) -> list[Item]:
    if not rows:
        raise DatasetError("dataset is empty", path=source)
    for row in rows:
        for name in required:
            if name not in row.data:
                raise _row_error("required field missing", source, unit, row, field=name)
    raw_ids = (
        _hash_ids(rows, source, unit)
        if id_field is None
        else _field_ids(rows, source, id_field, unit)
    )
    on = "in" if unit == "row" else "on"
    items: list[Item] = []
    first_seen: dict[str, tuple[int, str]] = {}
    for row, raw in zip(rows, raw_ids, strict=True):
        item_id = sanitize_id(raw)
        if item_id in first_seen:
            other_line, other_raw = first_seen[item_id]
            if id_field is None:
                message = (
                    f"identical to the row {on} {unit} {other_line}; identical rows cannot "
                    "get distinct stable ids (remove one, or add an id field)"
                )
            elif other_raw == raw:
                message = f"duplicate id {raw!r} (also {on} {unit} {other_line})"
            else:
                message = (
                    f"id {raw!r} becomes {item_id!r} in node ids, like {other_raw!r} {on} "
                    f"{unit} {other_line}"
                )
            raise _row_error(message, source, unit, row)
        first_seen[item_id] = (row.where, raw)
        line = row.where if unit == "line" else None
        items.append(Item(item_id, row.data, line, item_source or source))
    return items


def _row_error(
    message: str, source: str, unit: _Unit, row: _Row, field: str | None = None
) -> DatasetError:
    """``file:LINE: ...`` and ``name:POSITION: ...``; ``dataset ..., row INDEX: ...``."""
    if unit == "row":
        return DatasetError(message, path=f"{source}, row {row.where}", field=field)
    return DatasetError(message, path=source, line=row.where, field=field)


def _field_ids(rows: list[_Row], source: str, id_field: str, unit: _Unit) -> list[str]:
    ids = []
    for row in rows:
        value = row.data.get(id_field)
        if value is None or value == "":
            raise _row_error("id field missing or empty", source, unit, row, field=id_field)
        ids.append(str(value))
    return ids


def _digest(text: str) -> str:
    """The hex digest a content id is cut from: sha256 of ``text`` in UTF-8.

    Looked up at each use, so a test can replace it (to force prefix collisions) without
    patching ``hashlib`` for the whole process.
    """
    return hashlib.sha256(text.encode()).hexdigest()


def _hash_ids(rows: list[_Row], source: str, unit: _Unit) -> list[str]:
    digests = []
    for row in rows:
        try:
            canonical = json.dumps(
                row.data, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
        except (TypeError, ValueError) as exc:
            # Falling back to repr() could embed memory addresses: ids would differ between
            # xdist workers and the run would abort with "Different tests were collected".
            raise _row_error(
                f"row is not JSON-serialisable ({exc}); pass id_field=...", source, unit, row
            ) from None
        digests.append(_digest(canonical))
    # 8 hex digits collide between *different* rows with odds ~n^2/2^33 (about 1% at 10k
    # rows). Such rows get 16 digits; deciding by the set of rows, not their order, keeps
    # the choice stable when rows move.
    by_prefix: dict[str, set[str]] = {}
    for digest in digests:
        by_prefix.setdefault(digest[:8], set()).add(digest)
    return [d[:16] if len(by_prefix[d[:8]]) > 1 else d[:8] for d in digests]


def sanitize_id(raw: str) -> str:
    """Make ``raw`` safe for a pytest node id.

    Characters outside ``[A-Za-z0-9_.-]`` become ``_``. Ids longer than 40 characters are
    cut to 32 plus ``-`` and 7 hex digits of the sha256 of the original, so distinct long
    ids stay distinct.
    """
    safe = _UNSAFE_ID_CHARS.sub("_", raw)
    if len(safe) > _MAX_ID_LEN:
        safe = f"{safe[:32]}-{hashlib.sha256(raw.encode()).hexdigest()[:7]}"
    return safe


def select(
    items: Sequence[Item],
    *,
    limit: int | None = None,
    sample: int | None = None,
    seed: int | str = 0,
) -> list[Item]:
    """Keep a deterministic subset of ``items``, in their original order.

    ``limit`` keeps the first N items. ``sample`` then keeps the N items whose
    ``sha256(f"{seed}::{id}")`` sorts lowest, which picks the same items on every process
    and machine and keeps picking them when rows are appended to the dataset. With both,
    the sample is drawn from the first ``limit`` items.
    """
    for name, value in (("limit", limit), ("sample", sample)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    chosen = list(items if limit is None else items[:limit])
    if sample is not None and sample < len(chosen):

        def rank(item: Item) -> str:
            return hashlib.sha256(f"{seed}::{item.id}".encode()).hexdigest()

        picked = sorted(range(len(chosen)), key=lambda i: rank(chosen[i]))[:sample]
        chosen = [chosen[i] for i in sorted(picked)]
    return chosen


def format_temperature(t: float) -> str:
    """The node-id form of a temperature: ``t0``, ``t0.5``, ``t1``.

    ``0`` and ``0.0`` give the same id (plain ``str()`` would not).
    """
    return f"t{(t + 0.0):g}"  # + 0.0 turns -0.0 into 0.0


def case_id(item_id: str, temperature: float, sample: int | None = None) -> str:
    """The parametrize id of one case: ``q0042-t0.5``, or ``q0042-t0.5-s3`` for sample 3."""
    base = f"{item_id}-{format_temperature(temperature)}"
    return base if sample is None else f"{base}-s{sample}"
