"""Rows of a Hugging Face dataset (``dataset="hf:ORG/NAME"``), read with the ``datasets``
library.

Only :mod:`pytest_llmbench.dataset` imports this module, and only for an ``hf:`` source,
so ``datasets`` (the ``hf`` extra) is imported the first time a suite names such a
dataset, never when the plugin loads. Downloads and the prepared Arrow files live in the
library's own caches (``HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``,
and the hub's ``HF_HUB_CACHE``); ``HF_DATASETS_OFFLINE=1`` reads them without network.

This module turns rows into plain JSON values and raises :class:`DatasetError`; ids,
required fields and the in-process cache are :mod:`pytest_llmbench.dataset`'s work.
"""

from __future__ import annotations

import datetime
import decimal
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DatasetError

__all__ = ["DEFAULT_SPLIT", "PREFIX", "HFSource", "load_rows", "parse_source", "to_json_value"]

PREFIX = "hf:"
#: the split a suite gets when it names none: benchmarks are scored on their test split
DEFAULT_SPLIT = "test"
EXTRA_HINT = "pip install 'pytest-llmbench[hf]'"

_BATCH = 1000
_LAST_PART = re.compile(r"[^/\\]*$")


@dataclass(frozen=True)
class HFSource:
    """A parsed ``hf:`` source: what to pass to ``datasets`` and how to name it."""

    given: str  # the marker's string, for messages
    name: str  # a hub id (ORG/NAME) or an absolute local directory
    shown: str  # the name as given, without the compact :CONFIG and @SPLIT
    config: str | None
    split: str
    revision: str | None
    split_defaulted: bool  # no split given: DEFAULT_SPLIT

    @property
    def canonical(self) -> str:
        """``hf:NAME[:CONFIG]@SPLIT``, NAME as given (``Item.source``)."""
        config = f":{self.config}" if self.config else ""
        return f"{PREFIX}{self.shown}{config}@{self.split}"

    @property
    def local(self) -> bool:
        """A directory on this machine, not a hub id."""
        return Path(self.name).is_absolute()

    @property
    def where(self) -> str:
        """The dataset, config and split, for messages about its rows."""
        return f"dataset {self.canonical!r}"


def parse_source(
    given: str,
    *,
    base_dir: Path | None = None,
    config: str | None = None,
    split: str | None = None,
    revision: str | None = None,
) -> HFSource:
    """Parse ``hf:NAME[:CONFIG][@SPLIT]`` plus the marker's ``hf_*`` arguments.

    ``NAME`` is a hub id (``ORG/NAME``) or a local dataset directory: an absolute path, one
    starting with ``.`` or ``~``, or one that exists relative to ``base_dir`` (the test
    file's directory) is a directory, resolved like a file dataset's path. The compact
    ``:CONFIG`` and ``@SPLIT`` are read from the name's last path component only; giving
    one both ways is an error.
    """
    label = f"dataset {given!r}"
    rest = given[len(PREFIX) :].strip()
    last = _last_part(rest)
    head = rest[: len(rest) - len(last)]
    last, at, compact_split = last.partition("@")
    last, colon, compact_config = last.partition(":")
    name = head + last
    if not name:
        raise DatasetError("needs a dataset after 'hf:' (hf:ORG/NAME)", path=label)
    config = _one_of("config", compact_config if colon else None, config, "hf_config", label)
    split = _one_of("split", compact_split if at else None, split, "hf_split", label)
    if revision is not None and not (isinstance(revision, str) and revision):
        raise DatasetError(f"hf_revision must be a non-empty string, got {revision!r}", path=label)
    return HFSource(
        given=given,
        name=_local_or_hub(name, base_dir, label),
        shown=name,
        config=config,
        split=DEFAULT_SPLIT if split is None else split,
        revision=revision,
        split_defaulted=split is None,
    )


def _last_part(path: str) -> str:
    match = _LAST_PART.search(path)
    return match.group(0) if match else path


def _one_of(what: str, compact: str | None, argument: object, kwarg: str, label: str) -> str | None:
    if compact is not None and argument is not None:
        raise DatasetError(
            f"the {what} is given twice: {compact!r} in the name and {kwarg}={argument!r}",
            path=label,
        )
    value = compact if compact is not None else argument
    if value is not None and not (isinstance(value, str) and value.strip()):
        raise DatasetError(f"the {what} must be a non-empty string, got {value!r}", path=label)
    return value.strip() if isinstance(value, str) else None


def _local_or_hub(name: str, base_dir: Path | None, label: str) -> str:
    path = Path(name).expanduser()
    explicit = path.is_absolute() or name.startswith((".", "~"))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.exists():
        return str(path.resolve())
    if explicit:
        raise DatasetError(f"directory not found (resolved to {path.resolve()})", path=label)
    return name


# ---------------------------------------------------------------------------- loading
def load_rows(source: HFSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row index, row)`` of the source's split, values as JSON values.

    The row index counts from 0, as ``dataset[i]`` does. Raises :class:`DatasetError`.
    """
    datasets = _import_datasets(source)
    table = _load_split(datasets, source)
    index = 0
    for batch in table.with_format("arrow").iter(batch_size=_BATCH):
        for row in batch.to_pylist():
            yield index, _convert_row(row, source, index)
            index += 1


def _import_datasets(source: HFSource) -> Any:
    try:
        import datasets  # type: ignore[import-untyped]
    except ImportError:
        raise DatasetError(
            f"needs the datasets package: {EXTRA_HINT}", path=f"dataset {source.given!r}"
        ) from None
    return datasets


def _load_split(datasets: Any, source: HFSource) -> Any:
    """The split as a ``datasets.Dataset``: what ``datasets.load_dataset(name, config,
    split=..., revision=...)`` does, with the config and split checked before the data
    is downloaded."""
    builder, problem = None, None
    try:
        builder = datasets.load_dataset_builder(
            source.name, source.config, revision=source.revision
        )
    except Exception as exc:
        problem = _builder_problem(datasets, source, exc)
    if builder is not None:
        problem = _check_split(source, _split_names(builder))
    if builder is not None and problem is None:
        try:
            builder.download_and_prepare()
            return builder.as_dataset(split=source.split)
        except Exception as exc:
            problem = _split_problem(source, builder, exc) or _load_problem(datasets, source, exc)
    # raised outside the except blocks: one message, without a "during handling" chain
    raise DatasetError(problem or "cannot load it", path=f"dataset {source.given!r}")


def _split_names(builder: Any) -> list[str] | None:
    """The builder's splits without downloading the data: from the dataset's info (the
    hub's card, a cached copy), else from its data files; None when neither says."""
    splits = getattr(builder.info, "splits", None)
    if splits:
        return [str(name) for name in splits]
    data_files = getattr(builder.config, "data_files", None)
    if data_files:
        return [str(name) for name in data_files]
    return None


def _check_split(source: HFSource, known: list[str] | None) -> str | None:
    if known is None:
        return None
    # "test[:100]" and "train+test" are the library's split syntax: check their names
    wanted = [part.split("[", 1)[0].strip() for part in source.split.split("+")]
    missing = [name for name in wanted if name not in known]
    if not missing:
        return None
    default = " (the default)" if source.split_defaulted else ""
    config = f" in config {source.config!r}" if source.config else ""
    return (
        f"no split {missing[0]!r}{default}{config}; its splits: {', '.join(known)} "
        f"(choose one with hf_split=... or hf:NAME@SPLIT)"
    )


def _split_problem(source: HFSource, builder: Any, exc: Exception) -> str | None:
    """An unknown split the builder only knew of once prepared."""
    if isinstance(exc, ValueError) and "split" in str(exc).lower():
        return _check_split(source, _split_names(builder))
    return None


def _builder_problem(datasets: Any, source: HFSource, exc: Exception) -> str:
    if isinstance(exc, ValueError):
        configs = _config_names(datasets, source)
        if configs and source.config is None:
            return (
                f"has several configs and none is the default; choose one with "
                f"hf_config=... or hf:NAME:CONFIG: {', '.join(configs)}"
            )
        if configs and source.config not in configs:
            return (
                f"no config {source.config!r}; its configs: {', '.join(configs)} "
                f"(choose one with hf_config=... or hf:NAME:CONFIG)"
            )
    return _load_problem(datasets, source, exc)


def _config_names(datasets: Any, source: HFSource) -> list[str]:
    try:
        names = datasets.get_dataset_config_names(source.name, revision=source.revision)
    except Exception:
        return []
    return [str(name) for name in names or ()]


def _load_problem(datasets: Any, source: HFSource, exc: Exception) -> str:
    offline = _offline(datasets)
    unreachable = not source.local and (
        isinstance(exc, ConnectionError) or (offline and isinstance(exc, FileNotFoundError))
    )
    cache = getattr(datasets.config, "HF_DATASETS_CACHE", "the datasets cache")
    if unreachable and offline:
        return (
            f"not in the local cache ({cache}) and offline mode (HF_DATASETS_OFFLINE=1) "
            "forbids downloading it; run once with network to cache it"
        )
    if unreachable:
        return (
            f"cannot reach the Hugging Face hub and no copy is cached ({cache}): check the "
            "network; once a copy is cached, HF_DATASETS_OFFLINE=1 uses it without network"
        )
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"cannot load it ({detail})"


def _offline(datasets: Any) -> bool:
    config = datasets.config
    return bool(getattr(config, "HF_HUB_OFFLINE", getattr(config, "HF_DATASETS_OFFLINE", False)))


# ---------------------------------------------------------------------------- values
class _NotJSON(Exception):
    def __init__(self, value: object) -> None:
        super().__init__(type(value).__name__)
        self.value = value


def _convert_row(row: Mapping[str, Any], source: HFSource, index: int) -> dict[str, Any]:
    converted: dict[str, Any] = {}
    for field, value in row.items():
        try:
            converted[str(field)] = to_json_value(value)
        except _NotJSON as exc:
            raise DatasetError(
                f"holds {type(exc.value).__name__}, which a dataset row cannot carry (rows "
                "hold JSON values); to leave the column out, load the dataset yourself and "
                "pass its rows: dataset=lambda: ...",
                path=f"{source.where}, row {index}",
                field=str(field),
            ) from None
    return converted


def to_json_value(value: Any) -> Any:
    """``value`` as the JSON value a JSONL row would hold.

    numpy scalars and arrays become Python numbers and lists, decimals numbers, dates and
    times ISO 8601 strings, tuples lists; anything else that JSON cannot hold (bytes, an
    image) raises an error naming its type.
    """
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(key): to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist) and type(value).__module__ == "numpy":
        return to_json_value(tolist())
    raise _NotJSON(value)
