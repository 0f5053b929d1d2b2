from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.pool
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pytest_llmbench
from pytest_llmbench.errors import StoreError, UnusableStoreError
from pytest_llmbench.run_dir import check_store
from pytest_llmbench.store import (
    STORE_FILENAME,
    PlannedRequest,
    ResponseStore,
    StoredResponse,
    ensure_run_dir,
    request_key,
)

ENDPOINT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "2+2?"}]}
ANSWER = {"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant", "content": "4"}}]}
REPO = Path(pytest_llmbench.__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResponseStore]:
    with ResponseStore.open(tmp_path / ".llmbench") as opened:
        yield opened


def put(store: ResponseStore, key: str, **overrides: Any) -> bool:
    fields: dict[str, Any] = dict(
        nodeid="tests/test_x.py::test_q[q1-t0]",
        ordinal=0,
        endpoint=ENDPOINT,
        request=BODY,
        response=ANSWER,
        headers={"x-request-id": "req_1"},
        latency_s=0.25,
        source="live",
    )
    fields.update(overrides)
    return store.put(key, **fields)


# ------------------------------------------------------------------------ request_key
def test_request_key_is_sha256_hex_and_ignores_key_order() -> None:
    reordered = {"messages": BODY["messages"], "temperature": 0, "model": "gpt-4o-mini"}
    key = request_key("t::a", 0, ENDPOINT, BODY)
    assert key == request_key("t::a", 0, ENDPOINT, reordered)
    assert len(key) == 64 and int(key, 16) >= 0


def test_request_key_changes_with_every_part() -> None:
    key = request_key("t::a", 0, ENDPOINT, BODY)
    assert key != request_key("t::b", 0, ENDPOINT, BODY)
    assert key != request_key("t::a", 1, ENDPOINT, BODY)
    assert key != request_key("t::a", 0, "/v1/responses", BODY)
    assert key != request_key("t::a", 0, ENDPOINT, {**BODY, "temperature": 0.5})


def test_request_key_is_pinned() -> None:
    # Pins the canonical form: a change here orphans every stored response and batch line.
    # printf '["n",0,"/e",{"a":1,"b":"é"}]' | sha256sum
    assert request_key("n", 0, "/e", {"b": "é", "a": 1}) == (
        "09fd818d15f1f2a26c1a1f80d37885a7a161717815eea457a27c3a94dcf94564"
    )


# ------------------------------------------------------------------------ basic API
def test_put_get_roundtrip(store: ResponseStore) -> None:
    assert put(store, "k1", batch_id="batch_1", source="batch")

    got = store.get("k1")

    assert isinstance(got, StoredResponse)
    assert (got.key, got.nodeid, got.ordinal, got.endpoint) == (
        "k1",
        "tests/test_x.py::test_q[q1-t0]",
        0,
        ENDPOINT,
    )
    assert got.request == BODY and got.response == ANSWER
    assert got.headers == {"x-request-id": "req_1"}
    assert (got.latency_s, got.source, got.batch_id) == (0.25, "batch", "batch_1")
    assert got.created_at > 1.6e9  # wall-clock time, comparable across processes
    assert store.get("missing") is None


def test_first_write_wins(store: ResponseStore) -> None:
    assert put(store, "k", response={"first": True})
    assert not put(store, "k", response={"second": True}, source="batch")
    stored = store.get("k")
    assert stored is not None and stored.response == {"first": True}
    assert put(store, "k", response={"third": True}, replace=True)
    stored = store.get("k")
    assert stored is not None and stored.response == {"third": True}


def test_container_protocol_and_clear(store: ResponseStore) -> None:
    for key in ("a", "b", "c"):
        put(store, key)
    store.set_state("batch", "b1")
    assert len(store) == 3 and "b" in store and "z" not in store and 3 not in store
    assert store.keys() == ["a", "b", "c"]

    store.clear()

    assert len(store) == 0 and store.get_state("batch") is None


def test_get_many_spans_chunks(store: ResponseStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pytest_llmbench.store._CHUNK", 7)
    for i in range(40):
        put(store, f"k{i}", ordinal=i)
    found = store.get_many([f"k{i}" for i in range(0, 60, 2)] + ["k0"])
    assert sorted(found) == sorted(f"k{i}" for i in range(0, 40, 2))
    assert found["k38"].ordinal == 38
    assert store.get_many([]) == {}


def test_credentials_never_reach_the_file(tmp_path: Path) -> None:
    with ResponseStore.open(tmp_path) as store:
        put(
            store,
            "k",
            headers={
                "Authorization": "Bearer sk-secret1",
                "api-key": "sk-secret2",
                "X-Api-Key": "sk-secret3",
                "Set-Cookie": "__cf_bm=secret4",
                "x-ratelimit-remaining-requests": "99",
            },
        )
        stored = store.get("k")
    assert stored is not None
    assert stored.headers == {"x-ratelimit-remaining-requests": "99"}
    for file in tmp_path.iterdir():
        assert b"secret" not in file.read_bytes()


def test_source_is_validated(store: ResponseStore) -> None:
    with pytest.raises(ValueError, match="source must be one of"):
        put(store, "k", source="cache")


def test_unserialisable_response(store: ResponseStore) -> None:
    with pytest.raises(StoreError, match="cannot store"):
        put(store, "k", response={"x": object()})


def test_state(store: ResponseStore) -> None:
    assert store.get_state("jobs") is None
    store.set_state("jobs", {"round": 1, "ids": ["batch_a"]})
    store.set_state("jobs", {"round": 2, "ids": ["batch_b"]})
    assert store.get_state("jobs") == {"round": 2, "ids": ["batch_b"]}
    store.delete_state("jobs")
    store.delete_state("jobs")
    assert store.get_state("jobs") is None


def test_closed_store_raises(tmp_path: Path) -> None:
    store = ResponseStore.open(tmp_path)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get("k")
    assert "closed" in repr(store)


def test_threads_share_a_store(store: ResponseStore) -> None:
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i in range(50):
                put(store, f"t{thread}-{i}", source="prefetch")
                assert f"t{thread}-{i}" in store
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(store) == 400


# ---------------------------------------------------------------------------- run dir
def test_run_dir_is_created_with_a_gitignore(tmp_path: Path) -> None:
    run_dir = tmp_path / "a" / ".llmbench"
    with ResponseStore.open(run_dir) as store:
        assert store.path == run_dir / STORE_FILENAME
    assert (run_dir / ".gitignore").read_text().splitlines()[-1] == "*"
    assert (run_dir / "CACHEDIR.TAG").exists()
    assert sorted(p.name for p in tmp_path.joinpath("a").iterdir()) == [".llmbench"]
    assert ensure_run_dir(run_dir) == run_dir  # idempotent


def test_wal_mode_and_full_sync(store: ResponseStore) -> None:
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


# ---------------------------------------------------------------------- bad files
def test_garbage_file_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    path.write_bytes(b"this is not a database, just some junk\n" * 200)

    with pytest.raises(StoreError) as info:
        ResponseStore(path)

    message = str(info.value)
    assert str(path) in message and "move it aside or delete it" in message
    assert "\n" not in message and isinstance(info.value, UnusableStoreError)
    assert path.read_bytes().startswith(b"this is not a database")  # never deleted


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    with ResponseStore(path):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    conn.close()

    with pytest.raises(StoreError, match=r"newer pytest-llmbench \(store schema 99") as info:
        ResponseStore(path)
    assert not isinstance(info.value, UnusableStoreError)  # never set aside: not broken


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()

    with pytest.raises(StoreError, match="some other program"):
        ResponseStore(path)


def test_check_store_sets_an_unusable_file_aside_with_its_wal(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    path.write_bytes(b"not a database" * 100)
    path.with_name(STORE_FILENAME + "-wal").write_bytes(b"frames")

    line = check_store(tmp_path)

    (aside,) = tmp_path.glob(f"{STORE_FILENAME}.unusable-*[0-9]")
    assert line is not None and str(path) in line and f"set aside as {aside.name}" in line
    assert aside.read_bytes() == b"not a database" * 100
    assert aside.with_name(aside.name + "-wal").read_bytes() == b"frames"  # kept beside it
    assert not path.with_name(STORE_FILENAME + "-wal").exists()  # a new store never pairs it
    assert check_store(tmp_path) is None and ResponseStore(path).keys() == []


def test_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        ResponseStore(tmp_path / "nope" / STORE_FILENAME)


# ------------------------------------------------------------------ many processes
@contextlib.contextmanager
def process_pool(size: int) -> Iterator[multiprocessing.pool.Pool]:
    """Worker processes that each open their own store, like xdist workers.

    fork where available: spawn re-imports pytest_llmbench (and openai) in every child,
    about 2 s each. No store is open in the parent while the pool forks.
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():  # 3.12+ warns about fork() when threads exist
        warnings.simplefilter("ignore", DeprecationWarning)
        with multiprocessing.get_context(method).Pool(size) as pool:
            yield pool


def _writer(path: str, worker: int, count: int) -> int:
    with ResponseStore(path) as store:
        for i in range(count):
            put(store, f"w{worker}-{i}", ordinal=i, source="prefetch")
    return worker


def test_concurrent_writer_processes(tmp_path: Path) -> None:
    path = str(tmp_path / STORE_FILENAME)
    with process_pool(8) as pool:
        results = [pool.apply_async(_writer, (path, w, 200)) for w in range(8)]
        done = [result.get(timeout=25) for result in results]

    assert sorted(done) == list(range(8))
    with ResponseStore(path) as store:
        assert len(store) == 1600
        assert len(store.get_many(f"w{w}-{i}" for w in range(8) for i in range(200))) == 1600


def _open_at(paths: list[str], start: float, worker: int) -> int:
    for n, path in enumerate(paths):
        while time.time() < start + 0.1 * n:  # all processes open the file at once
            pass
        _writer(path, worker, 1)
    return worker


def test_processes_opening_a_fresh_store_at_once(tmp_path: Path) -> None:
    # Switching a new file to WAL used to fail with "database is locked" under this race.
    paths = [str(tmp_path / f"{n}-{STORE_FILENAME}") for n in range(20)]
    with process_pool(8) as pool:
        start = time.time() + 1.0  # every worker has started by then
        args = [(paths, start, w) for w in range(8)]
        assert sorted(pool.starmap_async(_open_at, args).get(timeout=25)) == list(range(8))
    for path in paths:
        with ResponseStore(path) as store:
            assert len(store) == 8


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_opens_its_own_connection(store: ResponseStore) -> None:
    put(store, "parent")
    with warnings.catch_warnings():  # 3.12+ warns when other tests left threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        try:
            ok = "parent" in store and put(store, "child")
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.keys() == ["parent", "child"]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pytest_llmbench.store import ResponseStore

    store = ResponseStore(sys.argv[1])
    start = int(sys.argv[2])
    for i in range(start, start + 100_000):
        store.put(
            f"k{i}", nodeid="t", ordinal=i, endpoint="/v1/chat/completions",
            request={"i": i}, response={"text": "x" * 2000}, headers=None,
            latency_s=0.1, source="live",
        )
        print(f"k{i}", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_9_loses_nothing_that_was_reported(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    reported: list[str] = []
    for start in (0, 100_000):  # twice: the second writer starts on a killed file
        # Given a writer that prints each key once its put returned
        with (tmp_path / "stderr.txt").open("w+") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-c", KILL_SCRIPT, str(path), str(start)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
            watchdog = threading.Timer(20, proc.kill)  # a hung writer must not hang the test
            watchdog.start()
            try:
                assert proc.stdout is not None
                for count, line in enumerate(proc.stdout, start=1):
                    reported.append(line.strip())
                    if count == 100:
                        # When it is killed mid-loop
                        proc.send_signal(signal.SIGKILL)
                        break
                reported.extend(line.strip() for line in proc.stdout)  # printed before the kill
                proc.stdout.close()
                code = proc.wait(timeout=10)
            finally:
                watchdog.cancel()
                proc.kill()
                proc.wait()
            stderr.seek(0)
            assert code == -signal.SIGKILL, stderr.read()
            assert len(reported) >= 100 * (1 + start // 100_000)

    # Then the file opens fine and holds every reported key
    with ResponseStore(path) as store:
        found = store.get_many(reported)
        assert set(found) == set(reported)
        assert store._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---------------------------------------------------------------------------------------
# The fetch's group commit (saver.py): committed at the end of each turn of the event
# loop without an fsync, the write-ahead log fsynced at most SYNC_EVERY_S later and by
# flush()


class CountingStore(ResponseStore):
    syncs = 0
    broken = False

    def sync(self) -> None:
        self.syncs += 1
        if self.broken:
            raise StoreError(f"{self.path}: cannot sync the store: [Errno 5] I/O error")
        super().sync()


def planned(i: int) -> PlannedRequest:
    nodeid = f"tests/test_x.py::test_q[q{i}-t0]"
    return PlannedRequest(request_key(nodeid, 0, ENDPOINT, BODY), nodeid, 0, ENDPOINT, BODY)


def test_a_turns_answers_are_one_commit_readable_at_once_and_synced_by_flush(
    tmp_path: Path,
) -> None:
    from pytest_llmbench.response import Answer
    from pytest_llmbench.saver import GroupSaver

    store = CountingStore.open(tmp_path / ".llmbench")
    assert isinstance(store, CountingStore)
    handed: list[list[str]] = []
    saver = GroupSaver(
        store,
        source="prefetch",
        replace=False,
        saved=lambda batch: handed.append([r.key for r, _ in batch]),
        unsaved=lambda batch, exc: pytest.fail(str(exc)),
    )
    requests = [planned(i) for i in range(5)]

    async def one_turn() -> None:
        for req in requests:
            saver.add(req, Answer(ANSWER, {"x-request-id": "r"}, 0.1, 1))
        assert handed == []  # queued: written at the end of this turn
        await asyncio.sleep(0)

    asyncio.run(one_turn())
    assert saver.commits == 1 and handed == [[r.key for r in requests]]
    with ResponseStore.open(tmp_path / ".llmbench") as other:  # another connection
        assert len(other) == 5
    saver.flush()
    assert store.syncs == 1  # the commit without an fsync is made durable at the end
    saver.flush()
    assert store.syncs == 1  # nothing new: nothing to sync
    store.close()


def test_a_store_that_cannot_sync_keeps_what_it_wrote_and_reports_the_error(
    tmp_path: Path,
) -> None:
    from pytest_llmbench.response import Answer
    from pytest_llmbench.saver import GroupSaver

    store = CountingStore.open(tmp_path / ".llmbench")
    assert isinstance(store, CountingStore)
    store.broken = True
    errors: list[tuple[int, str]] = []
    handed: list[int] = []
    saver = GroupSaver(
        store,
        source="prefetch",
        replace=False,
        saved=lambda batch: handed.append(len(batch)),
        unsaved=lambda batch, exc: errors.append((len(batch), str(exc))),
    )
    saver.add(planned(0), Answer(ANSWER, {}, 0.1, 1))  # no loop: written and synced now
    # the answer is in the store and handed on as saved; the sync's error alone goes to
    # unsaved, with no answers (the fetch stops the run on it)
    assert handed == [1] and store.get(planned(0).key) is not None
    assert errors == [(0, f"{store.path}: cannot sync the store: [Errno 5] I/O error")]
    store.close()


def test_a_fetchs_fsync_waits_in_a_thread_and_its_failure_is_reported_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from pytest_llmbench import saver as saver_module
    from pytest_llmbench.response import Answer

    monkeypatch.setattr(saver_module, "SYNC_EVERY_S", 0.0)  # every write's fsync is due

    class ThreadedStore(CountingStore):
        threads: list[int] = []

        def sync(self) -> None:
            self.threads.append(threading.get_ident())
            super().sync()

    store = ThreadedStore.open(tmp_path / ".llmbench")
    assert isinstance(store, ThreadedStore)
    store.broken = True
    errors: list[tuple[int, int]] = []  # (answers in the batch, the thread it was told on)
    handed: list[int] = []
    saver = saver_module.GroupSaver(
        store,
        source="prefetch",
        replace=False,
        saved=lambda batch: handed.append(len(batch)),
        unsaved=lambda batch, exc: errors.append((len(batch), threading.get_ident())),
    )
    loop_thread = threading.get_ident()

    async def turns() -> None:
        saver.add(planned(0), Answer(ANSWER, {}, 0.1, 1))
        await asyncio.sleep(0)  # committed, handed on; its fsync went to the thread
        assert handed == [1] and store.syncs <= 1
        syncing = saver._syncing
        assert syncing is not None
        await asyncio.wait([asyncio.wrap_future(syncing)])  # the loop goes on meanwhile
        assert errors == []  # told at the next write, on the loop
        saver.add(planned(1), Answer(ANSWER, {}, 0.1, 1))
        await asyncio.sleep(0)
        assert handed == [1, 1] and errors == [(0, loop_thread)]

    asyncio.run(turns())
    saver.flush()  # waits for the second fsync (also failed): told too
    assert errors == [(0, loop_thread), (0, loop_thread)]
    assert store.syncs == 2 and loop_thread not in store.threads
    assert len(store) == 2  # stored all the same
    store.close()


def test_sync_without_a_write_ahead_log_is_a_no_op(tmp_path: Path) -> None:
    with ResponseStore.open(tmp_path / ".llmbench") as store:
        put(store, "k" * 64)
        store.sync()  # the log exists: fsynced
    with ResponseStore.open(tmp_path / ".llmbench") as store:
        Path(f"{store.path}-wal").unlink(missing_ok=True)
        store.sync()


def test_an_answer_with_its_text_is_stored_as_the_server_sent_it(tmp_path: Path) -> None:
    from pytest_llmbench.response import Answer

    text = '{"id": "chatcmpl-1",  "choices": [{"message": {"content": "\\u00e9"}}]}'
    body = json.loads(text)
    req = planned(0)
    with ResponseStore.open(tmp_path / ".llmbench") as store:
        store.save_many(
            [(req, Answer(body, {}, 0.1, 1, text=text))], source="prefetch", replace=False
        )
        got = store.get(req.key)
        assert got is not None and got.response == body
        raw = store._query("SELECT response FROM responses WHERE key = ?", (req.key,))
        assert raw == [(text,)]  # not encoded again
