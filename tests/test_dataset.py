from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_llmbench import dataset
from pytest_llmbench.dataset import (
    Item,
    case_id,
    format_temperature,
    load_dataset,
    sanitize_id,
    select,
)
from pytest_llmbench.errors import DatasetError


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    dataset.clear_cache()
    yield
    dataset.clear_cache()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# ---------------------------------------------------------------------------- formats
def test_jsonl_with_id_field_and_lines(tmp_path: Path) -> None:
    write(tmp_path / "qa.jsonl", '{"id": "q1", "q": "a"}\n\n{"id": 2, "q": "b"}\n')

    items = load_dataset("qa.jsonl", base_dir=tmp_path, id_field="id")

    assert [(i.id, i.line, i.data["q"]) for i in items] == [("q1", 1, "a"), ("2", 3, "b")]
    assert items[0].source == "qa.jsonl"
    assert items[0]["q"] == "a"


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    write(tmp_path / "d.jsonl", '{"q": "a\u2028b\u0085c"}\r\n{"q": "d"}\n')
    items = load_dataset("d.jsonl", base_dir=tmp_path)
    assert [(i.data["q"], i.line) for i in items] == [("a\u2028b\u0085c", 1), ("d", 2)]
    write(tmp_path / "d.csv", 'q,r\n"a\u2028b",1\n')
    assert load_dataset("d.csv", base_dir=tmp_path)[0].data == {"q": "a\u2028b", "r": "1"}


def test_ndjson_and_absolute_path(tmp_path: Path) -> None:
    path = write(tmp_path / "x.NDJSON", jsonl([{"id": "a"}]))
    assert [i.id for i in load_dataset(path, id_field="id")] == ["a"]


def test_json_array_reports_start_lines(tmp_path: Path) -> None:
    write(tmp_path / "d.json", '[\n  {"id": "a"},\n  {\n    "id": "b"\n  }\n]\n')

    items = load_dataset("d.json", base_dir=tmp_path, id_field="id")

    assert [(i.id, i.line) for i in items] == [("a", 2), ("b", 3)]


def test_csv_values_are_strings_and_lines_follow_quoted_newlines(tmp_path: Path) -> None:
    write(tmp_path / "d.csv", 'id,question,answer\n1,"two\nlines",4\n\n2,q,5\n')

    items = load_dataset("d.csv", base_dir=tmp_path, id_field="id", required=["answer"])

    assert [(i.id, i.line) for i in items] == [("1", 2), ("2", 5)]
    assert items[0].data == {"id": "1", "question": "two\nlines", "answer": "4"}


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_bytes("\ufeffid,q\nx,y\n".encode())
    assert load_dataset(tmp_path / "d.csv", id_field="id")[0].id == "x"


def test_iterables_generators_and_callables() -> None:
    rows = [{"id": "a"}, {"id": "b"}]

    def gen() -> Iterator[dict[str, str]]:
        yield from rows

    for source in (rows, gen(), gen, tuple(rows)):
        items = load_dataset(source, id_field="id")
        assert [(i.id, i.line) for i in items] == [("a", None), ("b", None)]
    assert load_dataset(gen)[0].source == "test_iterables_generators_and_callables.<locals>.gen()"


# -------------------------------------------------------------------------------- ids
def test_content_hash_ids_are_stable_and_position_free() -> None:
    a, b = {"q": "x", "n": 1}, {"q": "y"}

    first = load_dataset([a, b])
    reordered = load_dataset([{"q": "z"}, b, {"n": 1, "q": "x"}])

    assert first[0].id == reordered[2].id
    assert first[1].id == reordered[1].id
    assert len(first[0].id) == 8 and int(first[0].id, 16) >= 0


def test_content_hash_is_sha256_of_canonical_json() -> None:
    row = {"b": "é", "a": [1, 2]}
    canonical = json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert load_dataset([row])[0].id == hashlib.sha256(canonical.encode()).hexdigest()[:8]


def test_identical_rows_are_an_error_naming_both_lines(tmp_path: Path) -> None:
    write(tmp_path / "d.jsonl", jsonl([{"q": 1}, {"q": 2}, {"q": 1}]))

    with pytest.raises(DatasetError) as info:
        load_dataset("d.jsonl", base_dir=tmp_path)

    assert str(info.value).startswith("d.jsonl:3: identical to the row on line 1")


def test_hash_prefix_collision_between_different_rows_gets_longer_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = dataset._digest

    def colliding(text: str) -> str:  # every row's digest starts with the same 8 digits
        return "deadbeef" + real(text)[8:]

    monkeypatch.setattr(dataset, "_digest", colliding)
    items = load_dataset([{"q": 1}, {"q": 2}])

    assert [len(i.id) for i in items] == [16, 16] and items[0].id != items[1].id


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    write(tmp_path / "d.jsonl", jsonl([{"id": "a"}, {"id": "b"}, {"id": "a"}]))

    with pytest.raises(DatasetError, match=r"^d\.jsonl:3: duplicate id 'a' \(also on line 1\)"):
        load_dataset("d.jsonl", base_dir=tmp_path, id_field="id")


def test_ids_colliding_after_sanitising_are_an_error() -> None:
    with pytest.raises(DatasetError, match=r"<iterable>:2: id 'a_b' becomes 'a_b'.*on item 1"):
        load_dataset([{"id": "a b"}, {"id": "a_b"}], id_field="id")


def test_missing_or_empty_id_field(tmp_path: Path) -> None:
    write(tmp_path / "d.jsonl", jsonl([{"id": "a"}, {"q": 1}]))
    with pytest.raises(DatasetError, match=r"^d\.jsonl:2: field 'id': id field missing"):
        load_dataset("d.jsonl", base_dir=tmp_path, id_field="id")
    with pytest.raises(DatasetError, match=r"<iterable>:1: field 'id'"):
        load_dataset([{"id": ""}], id_field="id")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("q0042", "q0042"),
        ("a/b c::d[1]", "a_b_c__d_1_"),
        ("ü-1.5_x", "_-1.5_x"),
        ("x" * 40, "x" * 40),
    ],
)
def test_sanitize_id(raw: str, expected: str) -> None:
    assert sanitize_id(raw) == expected


def test_long_ids_are_truncated_with_a_hash_that_keeps_them_distinct() -> None:
    a, b = sanitize_id("p" * 50 + "1"), sanitize_id("p" * 50 + "2")
    assert len(a) == len(b) == 40
    assert a[:33] == "p" * 32 + "-" and a != b


def test_unserialisable_row_without_id_field() -> None:
    with pytest.raises(DatasetError, match=r"not JSON-serialisable.*id_field"):
        load_dataset([{"when": object()}])


# ----------------------------------------------------------------------------- errors
def test_missing_file_names_given_and_resolved_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("nope.jsonl", base_dir=tmp_path)
    message = str(info.value)
    assert message.startswith("nope.jsonl: file not found")
    assert str(tmp_path / "nope.jsonl") in message


def test_unreadable_path(tmp_path: Path) -> None:
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DatasetError, match=r"^dir\.jsonl: cannot read"):
        load_dataset("dir.jsonl", base_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("d.jsonl", '{"a": 1}\n{"a": \n', r"^d\.jsonl:2: invalid JSON: Expecting value"),
        ("d.jsonl", '{"a": 1}\n[1, 2]\n', r"^d\.jsonl:2: expected a JSON object, got an array"),
        ("d.jsonl", "\n\n", r"^d\.jsonl: dataset is empty$"),
        ("d.json", '{"items": []}', r"^d\.json:1: expected a JSON array of objects, got an obj"),
        ("d.json", "[]", r"^d\.json: dataset is empty$"),
        ("d.json", '[{"a": 1},\n "x"]', r"^d\.json:2: expected a JSON object, got a string"),
        ("d.json", '[{"a": 1}\n {"a": 2}]', r"^d\.json:2: invalid JSON: expected ','"),
        ("d.json", '[{"a": 1},\n {"a": }]', r"^d\.json:2: invalid JSON: Expecting value"),
        ("d.json", '[{"a": 1}] x', r"^d\.json:1: invalid JSON: extra data"),
        ("d.csv", "a,b\n1,2\n1,2,3\n", r"^d\.csv:3: expected 2 columns \(as in the h.*got 3"),
        ("d.csv", "a,a\n1,2\n", r"^d\.csv:1: field 'a': duplicate column"),
        ("d.csv", "", r"^d\.csv: dataset is empty$"),
        ("d.csv", "a,b\n", r"^d\.csv: dataset is empty$"),
        ("d.txt", "{}", r"^d\.txt: unknown extension '\.txt'; supported: \.jsonl, \.ndj"),
    ],
)
def test_file_errors(tmp_path: Path, name: str, text: str, pattern: str) -> None:
    write(tmp_path / name, text)
    with pytest.raises(DatasetError, match=pattern):
        load_dataset(name, base_dir=tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset("d.jsonl", base_dir=tmp_path)


def test_required_fields(tmp_path: Path) -> None:
    write(tmp_path / "d.jsonl", jsonl([{"q": 1, "a": 2}, {"q": 3}]))
    with pytest.raises(DatasetError, match=r"^d\.jsonl:2: field 'a': required field missing"):
        load_dataset("d.jsonl", base_dir=tmp_path, required=("q", "a"))


def test_iterable_errors() -> None:
    with pytest.raises(DatasetError, match="dataset is empty"):
        load_dataset([])
    with pytest.raises(DatasetError, match=r"<iterable>:2: expected a mapping, got list"):
        load_dataset([{"a": 1}, [1]])  # type: ignore[list-item]
    with pytest.raises(DatasetError, match="single mapping"):
        load_dataset(cast(Any, {"a": 1}))
    with pytest.raises(DatasetError, match="expected an iterable of rows, got int"):
        load_dataset(lambda: 3)  # type: ignore[arg-type,return-value]


# ------------------------------------------------------------------------------ cache
def test_file_is_loaded_once_until_it_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl([{"id": "a"}]))
    first = load_dataset(path, id_field="id")
    second = load_dataset(path, id_field="id")
    assert first == second and first is not second
    assert first[0] is second[0]  # served from the cache

    write(path, jsonl([{"id": "a"}, {"id": "b"}]))
    os.utime(path, ns=(0, 10**18))  # a distinct mtime even on coarse file systems
    assert [i.id for i in load_dataset(path, id_field="id")] == ["a", "b"]


def test_cache_is_keyed_by_id_field(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl([{"id": "a", "k": "z"}]))
    assert load_dataset(path, id_field="id")[0].id == "a"
    assert load_dataset(path, id_field="k")[0].id == "z"


# ----------------------------------------------------------------------------- subset
def make_items(n: int) -> list[Item]:
    return [Item(f"q{i:04d}", {"i": i}, i + 1, "mem") for i in range(n)]


def test_limit_keeps_the_first_items() -> None:
    items = make_items(10)
    assert select(items, limit=3) == items[:3]
    assert select(items, limit=30) == items
    assert select(items) == items


def test_sample_is_seeded_order_independent_and_in_file_order() -> None:
    items = make_items(100)

    picked = select(items, sample=10, seed=7)

    assert len(picked) == 10
    assert picked == sorted(picked, key=items.index)
    assert select(list(reversed(items)), sample=10, seed=7) == list(reversed(picked))
    assert select(items, sample=10, seed="7") == picked  # f"{seed}" is all that counts
    assert select(items, sample=10, seed=8) != picked


def test_sample_is_stable_when_items_are_appended() -> None:
    items = make_items(200)
    before = {i.id for i in select(items[:100], sample=10, seed=1)}
    after = {i.id for i in select(items, sample=10, seed=1)}
    # Appended rows can displace picks, but never reshuffle which old rows are picked.
    assert after & {i.id for i in items[:100]} <= before


def test_sample_is_pinned_across_machines() -> None:
    # Pins the algorithm: a change here silently re-samples every user's suite.
    assert [i.id for i in select(make_items(20), sample=3, seed=0)] == ["q0000", "q0006", "q0016"]


def test_limit_then_sample() -> None:
    items = make_items(50)
    assert select(items, limit=20, sample=5, seed=3) == select(items[:20], sample=5, seed=3)


def test_negative_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="limit"):
        select(make_items(3), limit=-1)


# ------------------------------------------------------------------------ case ids
@pytest.mark.parametrize(
    ("t", "expected"), [(0, "t0"), (0.0, "t0"), (-0.0, "t0"), (0.5, "t0.5"), (1, "t1"), (1.0, "t1")]
)
def test_format_temperature(t: float, expected: str) -> None:
    assert format_temperature(t) == expected


def test_case_id() -> None:
    assert case_id("q0042", 0.5, None) == "q0042-t0.5"
    assert case_id("q0042", 0.5, 3) == "q0042-t0.5-s3"
    assert case_id("q0042", 1.0) == "q0042-t1"
