"""Tests of the stage store (loaq.store): keys, records, crash safety, locks, events, retention."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import zarr.storage

from loaq.store.locks import LEASE_ENV
from loaq.store import (
    CorruptRecord,
    IncompleteRecord,
    RecordBusy,
    RecordExists,
    Store,
    StoreLocked,
    StoreWriteError,
    canonical_json,
    default_keep,
    file_digest,
    gc,
    stage_key,
)

# -- keys ---------------------------------------------------------------------------------------


class QuantConfig(pydantic.BaseModel):
    bits: int = 4
    alpha: float = 0.5
    beta: float = 0.1
    group_size: int = 128


@dataclasses.dataclass
class CalibrationSpec:
    dataset: str = "wikitext"
    n_samples: int = 128
    seq_len: int = 2048


def test_key_does_not_depend_on_dict_order():
    a = stage_key("calibration", 1, model="m" * 32, spec={"n": 128, "seq": 2048, "ds": "wiki"})
    b = stage_key("calibration", 1, spec={"ds": "wiki", "seq": 2048, "n": 128}, model="m" * 32)
    assert a == b
    assert re.fullmatch(r"[0-9a-f]{32}", a)
    assert canonical_json({"b": 1, "a": [1.5, None, True]}) == '{"a":[1.5,null,true],"b":1}'


def test_key_changes_with_every_input():
    config = QuantConfig()
    base = stage_key("quant_layer", 1, prev="p" * 32, config=config)
    changed = [
        stage_key("quant_layer", 1, prev="p" * 32, config=config.model_copy(update={"alpha": 0.6})),
        stage_key("quant_layer", 1, prev="p" * 32, config=config.model_copy(update={"bits": 3})),
        stage_key("quant_layer", 2, prev="p" * 32, config=config),
        stage_key("quant_layer", "1", prev="p" * 32, config=config),
        stage_key("quant_layer", 1, prev="q" * 32, config=config),
        stage_key("clean_layer", 1, prev="p" * 32, config=config),
        stage_key("quant_layer", 1, prev="p" * 32, config=config, extra=None),
    ]
    assert len({base, *changed}) == len(changed) + 1
    # The model and its plain-dict dump are the same input; dataclasses likewise.
    assert base == stage_key("quant_layer", 1, prev="p" * 32, config=config.model_dump())
    spec = CalibrationSpec()
    assert stage_key("c", 1, spec=spec) == stage_key("c", 1, spec=dataclasses.asdict(spec))
    # Values that compare equal in Python but are different inputs stay different.
    assert len({stage_key("s", 1, x=v) for v in (1, 1.0, True, "1")}) == 4
    assert stage_key("s", 1, x=float("inf")) != stage_key("s", 1, x=float("nan"))
    with pytest.raises(TypeError):
        stage_key("s", 1, x=torch.zeros(2))


def test_file_digest_is_content_based_and_streamed(tmp_path):
    shard = tmp_path / "ckpt" / "model-00001.safetensors"
    shard.parent.mkdir()
    shard.write_bytes(b"x" * 1000 + b"y")
    (tmp_path / "ckpt" / "model-00002.safetensors").write_bytes(b"second shard")
    (tmp_path / "ckpt" / "README.md").write_bytes(b"not a shard")
    assert file_digest(shard, chunk_bytes=7) == hashlib.sha256(shard.read_bytes()).hexdigest()
    before = file_digest(shard.parent, chunk_bytes=7)
    (tmp_path / "ckpt" / "README.md").write_bytes(b"edited, but not a shard")
    assert file_digest(shard.parent) == before
    shard.write_bytes(b"x" * 1000 + b"z")  # same size, other content
    assert file_digest(shard.parent) != before


# -- records: round trip ------------------------------------------------------------------------


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=generator, dtype=dtype)


def _bits(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor: equality of these is bit-exactness (bf16 included)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip_in_micro_batches(store_url, dtype):
    store = Store(store_url)
    key = stage_key("clean_layer", 1, prev="p" * 32, layer=3, dtype=str(dtype))
    hidden = _sample(dtype, (50, 3, 8))
    with store.writer(key, kind="clean_state", attrs={"layer": 3}) as w:
        w.create("hidden", hidden.shape, dtype, chunk_tokens=8)
        for start in range(0, 50, 16):  # micro-batches of 2 chunks, the last one partial
            w.write("hidden", start, hidden[start : start + 16])
        w.put("scale", hidden[0, 0])
        w.put("zeros", torch.zeros(20, 4, dtype=dtype))  # all-zero chunks are stored too
        assert not store.is_complete(key)  # the mark comes last
    assert store.is_complete(key)
    record = store.open(key)
    assert record.kind == "clean_state" and record.attrs == {"layer": 3}
    assert record.names == ["hidden", "scale", "zeros"]
    assert record.shape("hidden") == (50, 3, 8) and record.dtype("hidden") == dtype
    assert record.nbytes == hidden.nbytes + hidden[0, 0].nbytes + 20 * 4 * hidden.itemsize
    whole = record.read("hidden")
    assert whole.dtype == dtype and _bits(whole) == _bits(hidden)
    assert _bits(record.read("hidden", 5, 21)) == _bits(hidden[5:21])
    assert _bits(record.read("hidden", start=40)) == _bits(hidden[40:])
    assert _bits(record.read("scale")) == _bits(hidden[0, 0])
    assert not record.read("zeros").any()
    assert store.verify(key)
    assert store.size(key) > 0


def test_float32_arrays_are_stored_raw_and_the_others_compressed(tmp_path):
    """zstd barely shrinks float32 hidden states and slows every read of them: float32/float64
    chunks are stored raw (still checksummed), bf16 and integer ones compressed; a store given
    its own codec uses it for every array."""
    from zarr.codecs import ZstdCodec

    def codecs(store: Store) -> dict[str, list[str]]:
        key = stage_key("clean_layer", 1, layer=0)
        with store.writer(key, kind="clean_state") as w:
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.int8):
                name = str(dtype).removeprefix("torch.")
                w.put(name, torch.zeros(64, 8, dtype=dtype))
        record = store.open(key)
        return {n: [type(c).__name__ for c in record._array(n).compressors] for n in record.names}

    assert codecs(Store(tmp_path / "default")) == {
        "float32": ["Crc32cCodec"], "float64": ["Crc32cCodec"],
        "bfloat16": ["ZstdCodec", "Crc32cCodec"], "int8": ["ZstdCodec", "Crc32cCodec"]}
    chosen = codecs(Store(tmp_path / "chosen", compressor=ZstdCodec(level=3)))
    assert set(map(tuple, chosen.values())) == {("ZstdCodec", "Crc32cCodec")}


def test_round_trip_of_numpy_arrays_on_a_memory_url():
    store = Store(f"memory://loaq-test-{uuid.uuid4().hex}")
    key = stage_key("calibration", 1, model="m", spec={"n": 4})
    tokens = np.arange(4 * 16, dtype=np.int64).reshape(4, 16)
    with store.writer(key, kind="calibration") as w:
        w.put("input_ids", tokens)
        w.put("empty", np.zeros((0, 5), dtype=np.float32))
    record = store.open(key)
    assert torch.equal(record.read("input_ids"), torch.from_numpy(tokens))
    assert record.read("empty").shape == (0, 5)
    assert [i.key for i in store.list(kind="calibration")] == [key]
    assert pickle.loads(pickle.dumps(store)).open(key).shape("input_ids") == (4, 16)
    store.delete(key)
    assert not store.is_complete(key)


def test_writer_rejects_wrong_dtype_shape_overlap_and_missing_rows(tmp_path):
    store = Store(tmp_path)
    key = stage_key("s", 1)
    with pytest.raises(ValueError, match=r"rows \[8, 10\) were never written"):
        with store.writer(key, kind="stats") as w:
            w.create("h", (10, 4), torch.float16, chunk_tokens=4)
            with pytest.raises(TypeError):
                w.write("h", 0, torch.zeros(4, 4))  # float32 into a float16 array
            with pytest.raises(ValueError):
                w.write("h", 8, torch.zeros(4, 4, dtype=torch.float16))  # past the end
            w.write("h", 0, torch.zeros(8, 4, dtype=torch.float16))
            with pytest.raises(ValueError, match="overlap"):
                w.write("h", 4, torch.zeros(2, 4, dtype=torch.float16))
    assert not store.is_complete(key)


# -- records: incomplete, corrupt, disk full ----------------------------------------------------


def _write_states(store: Store, key: str, seed: int, kind="clean_state", **attrs) -> torch.Tensor:
    hidden = _sample(torch.bfloat16, (64, 16), seed=seed)
    with store.writer(key, kind=kind, attrs=attrs) as w:
        w.create("hidden", hidden.shape, hidden.dtype, chunk_tokens=16)
        for start in range(0, 64, 16):
            w.write("hidden", start, hidden[start : start + 16])
    return hidden


def _group_metadata(store_root: Path, key: str) -> Path:
    return store_root / "records" / key[:2] / key / "zarr.json"


def _record_file(store: Store, key: str, *parts: str) -> str:
    """A file of record ``key`` as a path of the store's own filesystem (any backend)."""
    return store._path("records", key[:2], key, *parts)


def test_crash_inside_writer_leaves_an_incomplete_record_that_is_rewritten(store_url):
    store = Store(store_url)
    key = stage_key("clean_layer", 1, layer=0)
    with pytest.raises(RuntimeError, match="killed"):
        with store.writer(key, kind="clean_state") as w:
            w.create("hidden", (64, 16), torch.bfloat16, chunk_tokens=16)
            w.write("hidden", 0, torch.ones(16, 16, dtype=torch.bfloat16))
            raise RuntimeError("killed")
    assert not store.is_complete(key)
    with pytest.raises(IncompleteRecord):
        store.open(key)
    hidden = _write_states(store, key, seed=1)
    assert _bits(store.open(key).read("hidden")) == _bits(hidden)
    with pytest.raises(RecordExists):
        store.writer(key, kind="clean_state").__enter__()


def test_record_without_its_mark_is_never_read_and_rewritten_clean(store_url):
    store = Store(store_url)
    key = stage_key("clean_layer", 1, layer=1)
    _write_states(store, key, seed=2)
    with store.writer(key, kind="clean_state", overwrite=True) as w:
        w.put("extra", torch.arange(3))
    # Simulate a crash just before the mark: the data is there, the mark is not.
    metadata = _record_file(store, key, "zarr.json")
    document = json.loads(store.fs.cat_file(metadata))
    del document["attributes"]["loaq_complete"]
    store.fs.pipe_file(metadata, json.dumps(document).encode())
    assert not store.is_complete(key)
    with pytest.raises(IncompleteRecord, match="no completion mark"):
        store.open(key)
    assert [(i.key, i.complete) for i in store.list()] == [(key, False)]
    hidden = _write_states(store, key, seed=3)  # starts from a clean group
    record = store.open(key)
    assert record.names == ["hidden"] and not store.fs.exists(_record_file(store, key, "extra", "zarr.json"))
    assert _bits(record.read("hidden")) == _bits(hidden)
    store.fs.pipe_file(metadata, b'{"attributes": {"loaq_comp')  # unreadable metadata: incomplete
    assert not store.is_complete(key)


def _truncate(data: bytes) -> bytes:
    return data[:-9]


def _flip_one_bit(data: bytes) -> bytes:  # same length: only the checksum can tell
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :]


@pytest.mark.parametrize("damage", [_truncate, _flip_one_bit])
def test_damaged_chunk_is_detected(store_url, damage):
    store = Store(store_url)
    key = stage_key("quant_layer", 1, layer=0)
    _write_states(store, key, seed=4)
    chunk = _record_file(store, key, "hidden", "c", "2", "0")
    store.fs.pipe_file(chunk, damage(store.fs.cat_file(chunk)))
    record = store.open(key)
    assert record.read("hidden", 0, 32).shape == (32, 16)  # other chunks still read
    with pytest.raises(CorruptRecord, match=f"record {key}, array 'hidden'"):
        record.read("hidden")
    assert store.verify(key) is False
    assert not store.is_complete(key)  # the mark is gone: the record gets recomputed


def test_missing_chunk_is_detected_not_read_as_zeros(store_url):
    store = Store(store_url)
    key = stage_key("quant_layer", 1, layer=1)
    _write_states(store, key, seed=5)
    store.fs.rm_file(_record_file(store, key, "hidden", "c", "3", "0"))
    with pytest.raises(CorruptRecord, match="missing"):
        store.open(key).read("hidden", 50, 60)
    assert store.verify(key) is False


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_disk_full_midway_keeps_the_store_intact(tmp_path, monkeypatch):
    store = Store(tmp_path)
    done_key = stage_key("clean_layer", 1, layer=0)
    done = _write_states(store, done_key, seed=6)
    done_dir = _group_metadata(tmp_path, done_key).parent
    files_before = _tree_bytes(done_dir)

    original_set = zarr.storage.LocalStore.set
    chunk_writes = []

    async def set_until_disk_full(self, key, value):
        if "/c/" in key:
            chunk_writes.append(key)
            if len(chunk_writes) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", key)
        return await original_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_until_disk_full)
    failing_key = stage_key("clean_layer", 1, layer=1)
    with pytest.raises(StoreWriteError) as caught:
        _write_states(store, failing_key, seed=7)
    assert str(caught.value) == (
        f"writing record {failing_key} (clean_state): No space left on device"
    )
    monkeypatch.setattr(zarr.storage.LocalStore, "set", original_set)

    assert not store.is_complete(failing_key)
    assert store.size(failing_key) == 0  # the partial data was removed to free the disk
    assert _tree_bytes(done_dir) == files_before
    assert _bits(store.open(done_key).read("hidden")) == _bits(done)
    assert store.verify(done_key)
    recomputed = _write_states(store, failing_key, seed=7)
    assert _bits(store.open(failing_key).read("hidden")) == _bits(recomputed)


def test_second_writer_of_a_key_in_one_process_is_refused(store_url):
    store = Store(store_url)
    key = stage_key("s", 1)
    with store.writer(key, kind="stats") as w:
        with pytest.raises(RecordBusy):
            with Store(store_url).writer(key, kind="stats"):
                pass
        w.put("h", torch.zeros(2))
    assert store.is_complete(key)


# -- locks --------------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from loaq.store import Store
    with Store(sys.argv[1]).lock("run"):
        print("held", flush=True)
        sys.stdin.readline()
    """
)


def test_run_lock_excludes_a_second_process_until_released(tmp_path):
    store = Store(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(StoreLocked) as caught:
            with store.lock("run", timeout=0.5):
                pass
        assert time.monotonic() - started >= 0.5
        assert f"held by pid {holder.pid} on host" in str(caught.value)
        with store.lock("other-lock"):  # other names are independent
            pass
    finally:
        holder.stdin.close()  # lets the holder leave its `with` block
        assert holder.wait(timeout=30) == 0
    with store.lock("run", timeout=5) as lock:
        assert lock.holder()["pid"] != holder.pid
    assert lock.holder() is None  # the info file is removed on release


def test_lock_excludes_a_second_holder_until_released(store_url):
    store = Store(store_url)
    with store.lock("run") as held:
        with pytest.raises(StoreLocked, match="is held by pid"):
            store.lock("run", timeout=0.2).acquire()
        with store.lock("other-lock"):  # other names are independent
            pass
        assert held.holder()["pid"] == os.getpid()
    assert held.holder() is None
    with store.lock("run"):
        pass


def test_a_lease_renewed_by_its_holder_outlives_it_and_a_lapsed_one_is_taken_over(monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "0.6")
    store = Store(f"memory://loaq-test-{uuid.uuid4().hex}")
    holder = store.lock("run").acquire()
    time.sleep(1.5)  # two and a half leases: renewed meanwhile, so still held
    with pytest.raises(StoreLocked, match="lease ending"):
        store.lock("run", timeout=0.0).acquire()
    holder._stop_renewing.set()  # the holder stops renewing, as a stalled or dead one does
    holder._renewer.join()
    holder._renewer = None
    with store.lock("run", timeout=5.0) as taker:
        holder._stop_renewing.clear()
        renewal = threading.Thread(target=holder._renew)  # it comes back: its next renewal finds the lock taken
        renewal.start()
        renewal.join(timeout=5)
        with pytest.raises(StoreLocked, match="ran out"):
            holder.check()
        taker.check()


class _TakeoverFirst:
    """A stand-in for a lock's store access whose first write (``rm_file`` or ``replace``) lets
    ``taker`` take the lock over just before it: the window between a holder's look at the lock and
    its own write."""

    def __init__(self, inner, taker):
        self._inner, self._taker = inner, taker

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in ("rm_file", "replace"):
            return attr

        def write(*args, **kwargs):
            if not self._taker.held:
                self._taker.acquire()
            return attr(*args, **kwargs)

        return write


@pytest.mark.parametrize("backend", ["memory", "s3"])
def test_a_lapsed_holder_releasing_leaves_the_lock_that_was_taken_over_in_place(backend, monkeypatch, request):
    """A holder stalls past its lease, another process takes the lock over at the moment the first
    one releases it: the lock stays the new holder's, so a third process cannot take it as well."""
    monkeypatch.setenv(LEASE_ENV, "0.3")
    url = (f"memory://loaq-test-{uuid.uuid4().hex}/store" if backend == "memory"
           else request.getfixturevalue("s3_server").new_bucket() + "/store")
    store = Store(url)
    stalled = store.lock("run").acquire()
    stalled._stop_renewing.set()
    stalled._renewer.join()
    stalled._renewer = None
    time.sleep(0.5)  # its lease has run out
    taker = store.lock("run", timeout=5.0)
    stalled._fs, stalled._ops = _TakeoverFirst(stalled._fs, taker), _TakeoverFirst(stalled._ops, taker)
    stalled.release()
    assert taker.held and taker.holder()["token"] == taker.holder_token() == taker._token
    with pytest.raises(StoreLocked, match="is held by pid"):
        store.lock("run", timeout=0.0).acquire()
    taker.check()
    taker.release()
    assert taker.holder() is None
    with store.lock("run", timeout=0.0):  # a released lock is free at once
        pass


def test_a_writer_whose_record_lock_lapsed_leaves_the_record_taken_over_intact(monkeypatch):
    """A writer stalls past its record lease; another writer takes the record over and completes it.
    When the first comes back, its next write is refused and leaving deletes nothing of the record."""
    from loaq.store.writer import _BEING_WRITTEN

    monkeypatch.setenv(LEASE_ENV, "0.3")
    store = Store(f"memory://loaq-test-{uuid.uuid4().hex}/store")
    key = stage_key("stats", 1, layer=0)
    with pytest.raises(StoreLocked, match="ran out"):
        with store.writer(key, kind="stats") as stalled:
            stalled.put("h", torch.zeros(4))
            lock = stalled._record_lock
            lock._stop_renewing.set()  # stalled: no renewal from here on
            lock._renewer.join()
            time.sleep(0.5)  # its lease has run out
            _BEING_WRITTEN.discard(stalled._claim)  # the writer below stands for another process
            with store.writer(key, kind="stats") as taker:
                taker.put("h", torch.ones(4))
            stalled.put("late", torch.ones(2))
    assert store.is_complete(key)
    record = store.open(key)
    assert sorted(record.names) == ["h"] and torch.equal(record.read("h"), torch.ones(4))


def test_a_record_is_being_written_only_while_another_writer_holds_its_lock(monkeypatch):
    """What ``loaq gc`` asks before it drops an unmarked record on a store with record locks."""
    monkeypatch.setenv(LEASE_ENV, "0.3")
    store = Store(f"memory://loaq-test-{uuid.uuid4().hex}/store")
    key = stage_key("stats", 1, layer=0)
    other = store.lock(f"record-{key}").acquire()  # another process's writer of the record
    assert store.being_written(key)
    other._stop_renewing.set()  # it stalls: its lease runs out
    other._renewer.join()
    time.sleep(0.5)
    assert not store.being_written(key)
    other.release()
    assert not store.being_written(key)


def _lock_process(url: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("lockproc.py")), url, *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _say(proc: subprocess.Popen, line: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_two_processes_racing_for_the_run_lock_on_s3_exactly_one_wins(s3_server):
    url = s3_server.new_bucket() + "/store"
    procs = [_lock_process(url), _lock_process(url)]
    try:
        for race in range(50):
            for proc in procs:  # both start their attempt before either answers
                proc.stdin.write("try\n")
                proc.stdin.flush()
            answers = sorted(proc.stdout.readline().strip() for proc in procs)
            assert answers == ["lost", "won"], (race, answers)
            assert [_say(proc, "release") for proc in procs] == ["ok", "ok"]
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=30)


def test_a_holder_killed_on_another_host_stops_blocking_after_its_lease(s3_server):
    url = s3_server.new_bucket() + "/store"
    lease = 4.0
    holder = subprocess.Popen([sys.executable, str(Path(__file__).with_name("lockproc.py")), url, "--host", "elsewhere"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, LEASE_ENV: str(lease)})
    key = stage_key("s", 1)
    try:
        assert _say(holder, "try") == "won"
        assert _say(holder, "write " + key) == "writing"
        acquired_at = time.monotonic()
        holder.kill()  # SIGKILL: no release, no cleanup
        holder.wait(timeout=30)
        store = Store(url)
        with pytest.raises(StoreLocked, match="pid .* on host elsewhere"):
            store.lock("run", timeout=0.0).acquire()
        with pytest.raises(RecordBusy, match="another process"):  # one writer per record
            store.writer(key, kind="stats").__enter__()
        with store.lock("run", timeout=3 * lease):
            waited = time.monotonic() - acquired_at
        assert lease - 1.0 < waited < lease + 3.0, waited
        with store.writer(key, kind="stats") as w:  # the record's lock lapsed with it
            w.put("h", torch.zeros(2))
        assert store.is_complete(key)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)


# -- events -------------------------------------------------------------------------------------


def test_events_per_run(store_url):
    store = Store(store_url)
    keys = [stage_key("clean_layer", 1, layer=i) for i in range(3)]
    for key in keys:
        store.log_event("run-1", "clean_layer", key, "computed", seconds=0.5, nbytes=1024)
    for key in keys:
        store.log_event("run-2", "clean_layer", key, "reused")
    first, second = store.events("run-1"), store.events("run-2")
    assert [(e["key"], e["action"]) for e in first] == [(k, "computed") for k in keys]
    assert first[0]["seconds"] == 0.5 and first[0]["nbytes"] == 1024
    assert all(e["action"] == "reused" and e["run_id"] == "run-2" for e in second)
    assert len(store.events()) == 6 and store.events("never-ran") == []
    with pytest.raises(ValueError):
        store.log_event("run-1", "clean_layer", keys[0], "skipped")
    store.log_event("run-3", "zoo-member", "tiny-gptq-w4", "failed", seconds=1.5, detail="unsupported architecture")
    (failed,) = store.events("run-3")
    assert (failed["action"], failed["detail"], failed["seconds"]) == ("failed", "unsupported architecture", 1.5)
    assert first[0]["detail"] is None


# -- retention ----------------------------------------------------------------------------------


def _released_record_locks(store: Store) -> list[str]:
    if store.is_local:
        return []
    paths = store.fs.ls(f"{store.root}/locks", detail=False) if store.fs.exists(f"{store.root}/locks") else []
    return [p for p in paths if Path(p).name.startswith("record-") and json.loads(store.fs.cat_file(p)).get("released")]


def test_gc_default_policy_drops_only_old_quant_states(store_url):
    store = Store(store_url)
    quant = {}
    for chain, layers in (("A", range(4)), ("B", range(2))):
        for layer in layers:
            key = stage_key("quant_layer", 1, chain=chain, layer=layer)
            _write_states(store, key, seed=layer, kind="quant_state", chain=chain, layer=layer)
            quant[chain, layer] = key
    clean = stage_key("clean_layer", 1, layer=0)
    _write_states(store, clean, seed=9, kind="clean_state", layer=0)
    stats = stage_key("stats", 1, layer=0)
    _write_states(store, stats, seed=10, kind="stats", layer=0)
    old = [quant["A", 0], quant["A", 1], quant["A", 2], quant["B", 0]]
    expected_freed = sum(store.size(k) for k in old)
    # On an object store each record's writer lock is left marked released, and gc deletes those marks.
    assert len(_released_record_locks(store)) == (0 if store.is_local else 8)

    freed = gc(store, default_keep(store.list()))
    assert freed == expected_freed > 0
    remaining = {info.key for info in store.list()}
    assert remaining == {quant["A", 3], quant["B", 1], clean, stats}
    assert store.is_complete(quant["A", 3]) and store.is_complete(clean)
    assert _released_record_locks(store) == []

    assert gc(store, default_keep(store.list(), drop_stats=True)) > 0
    assert {info.key for info in store.list()} == {quant["A", 3], quant["B", 1], clean}
    with store.lock("run"):  # gc refuses to run beside a run
        with pytest.raises(StoreLocked):
            gc(store, lambda info: False)
