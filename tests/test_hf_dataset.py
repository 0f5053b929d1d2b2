"""Hugging Face datasets as a dataset source (``dataset="hf:..."``), offline.

Each test builds its dataset with the ``datasets`` library in a temporary directory laid
out as a hub repository is (parquet files per config and split, named by the YAML header
of its README.md), and loads it as ``hf:`` + that directory: ``datasets.load_dataset_builder``
reads it through the same packaged parquet builder a hub dataset goes through. The
library runs in offline mode (``HF_DATASETS_OFFLINE=1``) with its cache in the test's
temporary directory, so nothing is downloaded and the user's cache is never touched.
"""

from __future__ import annotations

import datetime
import decimal
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench import dataset
from pytest_llmbench.dataset import load_dataset
from pytest_llmbench.errors import DatasetError

from .helpers import answer_key

try:
    import datasets  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - the test extra installs it
    datasets = None

pytestmark = pytest.mark.skipif(
    datasets is None,
    reason="needs the datasets package (pip install -e '.[test]' or '.[hf]')",
)

ROWS = [{"qid": f"q{i}", "question": f"What is item {i}?", "answer": f"A{i}"} for i in range(4)]
TRAIN = [{"qid": f"t{i}", "question": f"Train {i}?", "answer": f"T{i}"} for i in range(2)]
OTHER = [{"qid": "x0", "question": "Other?", "answer": "X"}]


def write_hub_dataset(
    root: Path, configs: dict[str, dict[str, list[dict[str, Any]]]], default: str | None = None
) -> Path:
    """A dataset directory as on the hub: one parquet file per config and split, written
    by ``datasets``, and the README.md card whose YAML header lists them."""
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card.append(f"- config_name: {config}")
        if config == default:
            card.append("  default: true")
        card.append("  data_files:")
        for split, rows in splits.items():
            relative = f"{config}/{split}-00000-of-00001.parquet"
            (root / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(root / relative))
            card += [f"  - split: {split}", f"    path: {relative}"]
    card.append("---")
    (root / "README.md").write_text("\n".join(card) + "\n", encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Offline mode and a fresh cache, for this process and the ones it starts.

    ``datasets`` and ``huggingface_hub`` read the environment when first imported, so the
    settings they derived from it are patched too.
    """
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    if datasets is not None:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        for name, value in (
            ("HF_HUB_OFFLINE", True),
            ("HF_DATASETS_OFFLINE", True),
            ("HF_DATASETS_CACHE", cache),
            ("DOWNLOADED_DATASETS_PATH", cache / "downloads"),
            ("EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted"),
        ):
            monkeypatch.setattr(datasets.config, name, value, raising=False)
    dataset.clear_cache()
    yield cache
    dataset.clear_cache()


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    """A dataset with a default config (test and train splits) and a second config."""
    return write_hub_dataset(
        tmp_path / "bench",
        {"main": {"test": ROWS, "train": TRAIN}, "other": {"test": OTHER}},
        default="main",
    )


def error(source: str, base_dir: Path | None = None, **kwargs: Any) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(source, base_dir=base_dir, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------- items
def test_items_and_ids_from_an_id_field(hub: Path) -> None:
    items = load_dataset(f"hf:{hub}", id_field="qid", required=["question", "answer"])

    assert [i.id for i in items] == ["q0", "q1", "q2", "q3"]
    assert [i.data for i in items] == ROWS
    assert items[0]["answer"] == "A0"
    assert items[0].line is None and items[0].source == f"hf:{hub}@test"


def test_content_hash_ids_are_those_of_the_same_rows_anywhere_else(
    hub: Path, tmp_path: Path
) -> None:
    (tmp_path / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), "utf-8")

    hf_ids = [i.id for i in load_dataset(f"hf:{hub}")]

    assert hf_ids == [i.id for i in load_dataset("same.jsonl", base_dir=tmp_path)]
    assert hf_ids == [i.id for i in load_dataset(ROWS)]


def test_a_relative_directory_is_found_beside_the_test_file(hub: Path, tmp_path: Path) -> None:
    items = load_dataset("hf:bench", base_dir=tmp_path, id_field="qid")
    assert [i.id for i in items] == ["q0", "q1", "q2", "q3"]
    assert items[0].source == "hf:bench@test"


@pytest.mark.parametrize(
    ("source", "kwargs", "ids", "shown"),
    [
        ("hf:bench", {"hf_split": "train"}, ["t0", "t1"], "hf:bench@train"),
        ("hf:bench@train", {}, ["t0", "t1"], "hf:bench@train"),
        ("hf:bench", {"hf_config": "other"}, ["x0"], "hf:bench:other@test"),
        ("hf:bench:other@test", {}, ["x0"], "hf:bench:other@test"),
        ("hf:bench:main", {"hf_split": "train"}, ["t0", "t1"], "hf:bench:main@train"),
        ("hf:bench@test[:2]", {}, ["q0", "q1"], "hf:bench@test[:2]"),
    ],
)
def test_split_and_config_selection(
    hub: Path, tmp_path: Path, source: str, kwargs: dict[str, str], ids: list[str], shown: str
) -> None:
    items = load_dataset(source, base_dir=tmp_path, id_field="qid", **kwargs)
    assert [i.id for i in items] == ids
    assert {i.source for i in items} == {shown}


def test_values_become_json_values(tmp_path: Path) -> None:
    row = {
        "qid": "a",
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "day": datetime.date(2024, 1, 2),
        "price": decimal.Decimal("1.50"),
        "count": decimal.Decimal("3"),
        "scores": [0.5, 1.0],
        "meta": {"n": 1, "tags": ["x"]},
    }
    write_hub_dataset(tmp_path / "typed", {"default": {"test": [row]}})

    (item,) = load_dataset(f"hf:{tmp_path / 'typed'}")

    assert item.data == {
        "qid": "a",
        "when": "2024-01-02T03:04:05",
        "day": "2024-01-02",
        "price": 1.5,
        "count": 3,
        "scores": [0.5, 1.0],
        "meta": {"n": 1, "tags": ["x"]},
    }
    assert len(item.id) == 8  # a content hash: the row is JSON now


def test_numpy_values_become_python_values() -> None:
    import numpy as np

    from pytest_llmbench.hf_dataset import to_json_value

    value = {
        "i": np.int64(3),
        "f": np.float32(0.5),
        "b": np.bool_(True),
        "a": np.array([[1, 2], [3, 4]]),
        "t": (np.int8(1), "x"),
        "s": np.str_("text"),
    }
    converted = to_json_value(value)
    assert converted == {
        "i": 3,
        "f": 0.5,
        "b": True,
        "a": [[1, 2], [3, 4]],
        "t": [1, "x"],
        "s": "text",
    }
    assert json.loads(json.dumps(converted)) == converted


def test_loaded_once_per_process(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    real = datasets.load_dataset_builder

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append((*args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset_builder", counting)
    first = load_dataset(f"hf:{hub}", id_field="qid")
    assert load_dataset(f"hf:{hub}", id_field="qid") == first
    assert calls == [(str(hub), None, {"revision": None})]
    load_dataset(f"hf:{hub}", hf_split="train", id_field="qid")
    load_dataset(f"hf:{hub}:other", hf_revision="v1.0", id_field="qid")
    assert calls[1:] == [
        (str(hub), None, {"revision": None}),
        (str(hub), "other", {"revision": "v1.0"}),
    ]


# ---------------------------------------------------------------------------- errors
def test_unknown_split_names_the_splits(hub: Path) -> None:
    assert error(f"hf:{hub}", hf_split="validation") == (
        f"dataset 'hf:{hub}': no split 'validation'; its splits: test, train "
        "(choose one with hf_split=... or hf:NAME@SPLIT)"
    )


def test_default_split_missing_says_it_is_the_default(tmp_path: Path) -> None:
    write_hub_dataset(tmp_path / "d", {"default": {"train": TRAIN, "validation": OTHER}})
    assert error("hf:d", tmp_path) == (
        "dataset 'hf:d': no split 'test' (the default); its splits: train, validation "
        "(choose one with hf_split=... or hf:NAME@SPLIT)"
    )


def test_unknown_config_names_the_configs(hub: Path) -> None:
    assert error(f"hf:{hub}", hf_config="nope") == (
        f"dataset 'hf:{hub}': no config 'nope'; its configs: main, other "
        "(choose one with hf_config=... or hf:NAME:CONFIG)"
    )


def test_several_configs_without_a_default(tmp_path: Path) -> None:
    write_hub_dataset(tmp_path / "d", {"a": {"test": ROWS}, "b": {"test": OTHER}})
    assert error("hf:d", tmp_path) == (
        "dataset 'hf:d': has several configs and none is the default; choose one with "
        "hf_config=... or hf:NAME:CONFIG: a, b"
    )


def test_missing_id_names_the_row_index_and_field(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [dict(r) for r in ROWS]
    rows[2]["qid"] = None
    write_hub_dataset(tmp_path / "d", {"default": {"test": rows}})
    assert error("hf:d", tmp_path, id_field="qid") == (
        "dataset 'hf:d@test', row 2: field 'qid': id field missing or empty"
    )
    assert error("hf:d", tmp_path, id_field="nope") == (
        "dataset 'hf:d@test', row 0: field 'nope': id field missing or empty"
    )


def test_missing_required_field_and_duplicates(hub: Path, tmp_path: Path) -> None:
    assert error("hf:bench", tmp_path, required=["question", "choices"]) == (
        "dataset 'hf:bench@test', row 0: field 'choices': required field missing"
    )
    write_hub_dataset(tmp_path / "dup", {"default": {"test": [ROWS[0], ROWS[1], ROWS[0]]}})
    assert error("hf:dup", tmp_path, id_field="qid") == (
        "dataset 'hf:dup@test', row 2: duplicate id 'q0' (also in row 0)"
    )
    assert error("hf:dup", tmp_path).startswith(
        "dataset 'hf:dup@test', row 2: identical to the row in row 0;"
    )


def test_bytes_are_reported_with_row_and_field(tmp_path: Path) -> None:
    rows = [{"qid": "a", "image": b"\x89PNG"}, {"qid": "b", "image": b"\x89PNG"}]
    write_hub_dataset(tmp_path / "d", {"default": {"test": rows}})
    message = error("hf:d", tmp_path, id_field="qid")
    assert message.startswith(
        "dataset 'hf:d@test', row 0: field 'image': holds bytes, which a dataset row cannot "
    )
    assert "dataset=lambda: ..." in message


def test_hub_dataset_not_cached_in_offline_mode(offline: Path) -> None:
    assert error("hf:no-such-org/no-such-dataset") == (
        f"dataset 'hf:no-such-org/no-such-dataset': not in the local cache ({offline}) and "
        "offline mode (HF_DATASETS_OFFLINE=1) forbids downloading it; run once with network "
        "to cache it"
    )


def test_hub_unreachable_without_offline_mode(
    offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what load_dataset_builder raises when the network is down and nothing is cached
    # (observed: after the hub client's own retries, some 20 s)
    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False, raising=False)
    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    assert error("hf:org/name") == (
        f"dataset 'hf:org/name': cannot reach the Hugging Face hub and no copy is cached "
        f"({offline}): check the network; once a copy is cached, HF_DATASETS_OFFLINE=1 uses "
        "it without network"
    )


def test_without_the_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    assert error("hf:org/name") == (
        "dataset 'hf:org/name': needs the datasets package: pip install 'pytest-llmbench[hf]'"
    )


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        ("hf:", {}, "dataset 'hf:': needs a dataset after 'hf:' (hf:ORG/NAME)"),
        (
            "hf:org/name:a",
            {"hf_config": "b"},
            "dataset 'hf:org/name:a': the config is given twice: 'a' in the name and hf_config='b'",
        ),
        (
            "hf:org/name@test",
            {"hf_split": "test"},
            "dataset 'hf:org/name@test': the split is given twice: 'test' in the name and "
            "hf_split='test'",
        ),
        (
            "hf:org/name@",
            {},
            "dataset 'hf:org/name@': the split must be a non-empty string, got ''",
        ),
        (
            "hf:org/name",
            {"hf_revision": ""},
            "dataset 'hf:org/name': hf_revision must be a non-empty string, got ''",
        ),
        (
            "data.jsonl",
            {"hf_split": "test"},
            "data.jsonl: hf_split= applies only to a Hugging Face dataset (dataset='hf:ORG/NAME')",
        ),
    ],
)
def test_bad_sources(source: str, kwargs: dict[str, Any], message: str) -> None:
    assert error(source, **kwargs) == message


def test_missing_local_directory(tmp_path: Path) -> None:
    assert error("hf:./nowhere", tmp_path) == (
        f"dataset 'hf:./nowhere': directory not found (resolved to {tmp_path / 'nowhere'})"
    )


# ---------------------------------------------------------------------------- the plugin
SUITE = """
import pytest

@pytest.mark.llmbench(dataset="hf:bench", hf_config="main", id="qid", temperatures=[0.0])
def test_hf(case, llm):
    r = llm.generate_response(case["question"], max_tokens=8)
    assert r.text == case["answer"], (case["question"], r.text)
"""


def test_a_suite_on_a_hf_dataset_passes_on_the_simulator(
    pytester: pytest.Pytester, offline: Path
) -> None:
    write_hub_dataset(pytester.path / "bench", {"main": {"test": ROWS, "train": TRAIN}})
    pytester.makepyfile(test_suite=SUITE)
    sim = {"answer_key": answer_key(ROWS), "p_correct": 1.0, "temperature_slope": 0.0}
    (pytester.path / "sim.json").write_text(json.dumps(sim), encoding="utf-8")

    # a subprocess: datasets reads HF_DATASETS_OFFLINE and HF_DATASETS_CACHE at import;
    # two workers and the plan phase each load the dataset, through the same cache
    result = pytester.runpytest_subprocess(
        "--llm-sim", "--llm-sim-config=sim.json", "--llm-report=r.json", "-n", "2", "-v", "-rN"
    )

    result.assert_outcomes(passed=4)
    for qid in ("q0", "q1", "q2", "q3"):  # the workers' lines come in any order
        assert f"PASSED test_suite.py::test_hf[{qid}-t0]" in result.stdout.str()
    report = json.loads((pytester.path / "r.json").read_text(encoding="utf-8"))
    assert sorted(c["item_id"] for c in report["cases"]) == ["q0", "q1", "q2", "q3"]
    assert offline.is_dir()  # the library's cache is where HF_DATASETS_CACHE says


def test_bad_hf_dataset_fails_collection_in_one_line(pytester: pytest.Pytester) -> None:
    write_hub_dataset(pytester.path / "bench", {"main": {"train": TRAIN}})
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llmbench(dataset="hf:bench", id="qid")
        def test_hf(case):
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        ["*ERROR collecting*", "*dataset 'hf:bench': no split 'test' (the default)*"]
    )
    assert "Traceback" not in result.stdout.str()
