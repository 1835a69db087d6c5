"""Writing one record: arrays streamed in micro-batches, completion mark last.

Protocol (``Store.writer`` returns a :class:`RecordWriter`)::

    with store.writer(key, kind="clean_state", attrs={"layer": 3}) as w:
        w.create("hidden", shape=(n_tokens, width), dtype=torch.bfloat16, chunk_tokens=512)
        for start, batch in micro_batches:            # any order, no overlaps
            w.write("hidden", start, batch)           # rows [start, start + len(batch))
        w.put("scale", small_tensor)                  # a whole small tensor at once

* Entering wipes whatever an earlier, interrupted attempt left at this key (it has no mark and
  is never read), so every attempt starts from a clean group. A *complete* record is refused
  (``RecordExists``) unless ``overwrite=True``: with input-derived keys it is already right.
* Leaving without an exception checks that every row of every array was written, then writes
  the completion mark together with the manifest (shapes, dtypes, per-slice crc32) in one
  final write of the group's ``zarr.json``.
* Leaving with an exception (or failing to commit) deletes the partial data, best effort, to
  give the disk space back; the exception propagates unchanged. A killed process leaves its
  partial data behind, unmarked, for the next writer of that key (or ``gc``) to remove.
* A writer whose record lock lapsed (its lease ran out, see ``locks``) writes, marks and deletes
  nothing more: another writer may have taken the record over.
* Any ``OSError`` of the storage (disk full, I/O error, permissions) is re-raised as
  ``StoreWriteError("writing record <key> (<kind>): <strerror>")``. Only this record's own
  directory is ever written or deleted, so nothing complete in the store is lost or altered.

Micro-batches should be aligned to ``chunk_tokens`` (a chunk is the unit Zarr writes; an
unaligned batch makes Zarr read, merge and rewrite the chunk it shares with its neighbour).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.abc.store import Store as ZarrStore
from zarr.codecs import Crc32cCodec

from .dtypes import logical_dtype_name, stored_numpy_dtype, to_stored_array
from .errors import RecordBusy, RecordExists, StoreError, StoreLocked, StoreWriteError
from .keys import to_jsonable
from .locks import StoreLock
from .layout import (
    ARRAY_ATTR_DTYPE,
    ATTR_COMPLETE,
    ATTR_MANIFEST,
    ATTR_RECORD,
    ATTR_USER,
    FORMAT_VERSION,
    check_name,
    record_path,
    slice_crc32,
)

log = logging.getLogger(__name__)

#: Chunk size aimed at when the caller gives no ``chunk_tokens``: big enough that per-chunk
#: overhead (one file or object each) is negligible, small enough to stream.
TARGET_CHUNK_BYTES = 16 * 1024 * 1024


# Records being written in this process, as (store identity, key): a second writer of the same key
# (two parallel tasks computing one shared upstream record) fails fast instead of interleaving.
_BEING_WRITTEN: set[tuple[str, str]] = set()
_BEING_WRITTEN_LOCK = threading.Lock()


def rows_of(shape: tuple[int, ...]) -> int:
    """Length of axis 0, the streaming axis; a 0-d array counts as one row."""
    return shape[0] if shape else 1


def default_chunk_tokens(shape: tuple[int, ...], itemsize: int) -> int:
    row_bytes = itemsize * math.prod(max(1, s) for s in shape[1:])
    return max(1, min(rows_of(shape), TARGET_CHUNK_BYTES // row_bytes))


@dataclass
class _ArrayInProgress:
    array: zarr.Array
    dtype: str  # logical
    shape: tuple[int, ...]
    chunk_tokens: int
    slices: list[tuple[int, int, str]] = field(default_factory=list)  # (start, stop, crc32)

    def check_no_overlap(self, name: str, start: int, stop: int) -> None:
        for done_start, done_stop, _ in self.slices:
            if start < done_stop and done_start < stop:
                raise ValueError(
                    f"array {name!r}: rows [{start}, {stop}) overlap rows "
                    f"[{done_start}, {done_stop}) written before"
                )

    def missing_rows(self) -> list[tuple[int, int]]:
        gaps, covered = [], 0
        for start, stop, _ in sorted(self.slices):
            if start > covered:
                gaps.append((covered, start))
            covered = max(covered, stop)
        if covered < rows_of(self.shape):
            gaps.append((covered, rows_of(self.shape)))
        return gaps

    def manifest(self) -> dict[str, Any]:
        stored = stored_numpy_dtype(self.dtype)
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "stored_dtype": stored.name,
            "chunk_tokens": self.chunk_tokens,
            "nbytes": stored.itemsize * math.prod(self.shape),
            "slices": [list(s) for s in sorted(self.slices)],
        }


class RecordWriter:
    """Writes one record; use through ``with store.writer(...) as w`` (see module docstring).

    What it needs of its store: ``zarr_store`` (the record is the group at ``record_path(key)``),
    ``store_id`` (names the store whatever URL reached it, for the in-process claim),
    ``compressors_for(stored_dtype)`` (the codecs of a new array), ``is_complete(key)`` and
    ``wipe(key)`` (delete the record's directory, its metadata first), and ``record_lock``: on
    stores with conditional writes, the leased lock that makes this the record's only writer
    across processes and hosts (None where the run lock guards).
    """

    def __init__(
        self,
        key: str,
        kind: str,
        attrs: dict[str, Any] | None,
        overwrite: bool,
        *,
        zarr_store: ZarrStore,
        store_id: str,
        compressors_for: Callable[[np.dtype], list[BytesBytesCodec]],
        is_complete: Callable[[str], bool],
        wipe: Callable[[str], None],
        record_lock: StoreLock | None = None,
    ) -> None:
        self.key = key
        self.kind = check_name(kind, "record kind")
        self.attrs = to_jsonable(attrs if attrs is not None else {})
        if not isinstance(self.attrs, dict):
            raise TypeError(f"record attrs must be a mapping or a model, not {type(attrs)}")
        self._zarr_store, self._claim = zarr_store, (store_id, key)
        self._compressors_for, self._is_complete, self._wipe = compressors_for, is_complete, wipe
        self._overwrite = overwrite
        self._record_lock = record_lock
        self._group: zarr.Group | None = None
        self._arrays: dict[str, _ArrayInProgress] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> RecordWriter:
        with _BEING_WRITTEN_LOCK:
            if self._claim in _BEING_WRITTEN:
                raise RecordBusy(f"record {self.key} is already being written in this process")
            _BEING_WRITTEN.add(self._claim)
        try:
            if self._record_lock is not None:
                try:
                    self._record_lock.acquire()
                except StoreLocked as e:
                    self._record_lock = None  # not ours to release
                    raise RecordBusy(f"record {self.key} is being written by another process: {e}") from None
            if not self._overwrite and self._is_complete(self.key):
                raise RecordExists(f"record {self.key} ({self.kind}) is already complete")
            with self._storage_errors():
                self._wipe(self.key)
                record_info = {
                    "format": FORMAT_VERSION,
                    "key": self.key,
                    "kind": self.kind,
                    "created": datetime.now(timezone.utc).isoformat(),
                }
                self._group = zarr.create_group(
                    store=self._zarr_store,
                    path=record_path(self.key),
                    attributes={ATTR_RECORD: record_info, ATTR_USER: self.attrs},
                )
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                try:
                    self._commit()
                except BaseException:
                    self._discard()
                    raise
            else:
                self._discard()
        finally:
            self._group = None
            self._release()
        return False  # never swallow the caller's exception

    # -- writing ----------------------------------------------------------------------------

    def create(
        self,
        name: str,
        shape: tuple[int, ...] | list[int],
        dtype: Any,
        chunk_tokens: int | None = None,
    ) -> None:
        """Declare array ``name`` of ``shape`` and (logical) ``dtype``, chunked along axis 0.

        ``chunk_tokens`` rows form one chunk (default: about ``TARGET_CHUNK_BYTES``); pick the
        micro-batch size or a divisor of it.
        """
        self._check_lock()
        group = self._require_open()
        check_name(name, "array name")
        if name in self._arrays:
            raise ValueError(f"record {self.key}: array {name!r} already created")
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"array {name!r}: negative dimension in shape {shape}")
        logical = logical_dtype_name(dtype)
        stored = stored_numpy_dtype(logical)
        if chunk_tokens is None:
            chunk_tokens = default_chunk_tokens(shape, stored.itemsize)
        if chunk_tokens < 1:
            raise ValueError(f"array {name!r}: chunk_tokens must be >= 1, got {chunk_tokens}")
        chunks = (chunk_tokens, *(max(1, s) for s in shape[1:])) if shape else ()
        with self._storage_errors():
            array = group.create_array(
                name,
                shape=shape,
                dtype=stored,
                chunks=chunks,
                # crc32c last: it checks the compressed bytes exactly as they are stored, so a
                # truncated or altered chunk fails to decode instead of decoding to garbage.
                compressors=[*self._compressors_for(stored), Crc32cCodec()],
                fill_value=0,
                # Write every chunk, even all-zero ones: a chunk missing on disk then always
                # means damage (Zarr would otherwise silently read it back as zeros).
                config={"write_empty_chunks": True},
                attributes={ARRAY_ATTR_DTYPE: logical},
            )
        self._arrays[name] = _ArrayInProgress(array, logical, shape, int(chunk_tokens))

    def write(self, name: str, start: int, data: Any) -> None:
        """Write ``data`` (tensor or array) into rows ``[start, start + len(data))`` of ``name``."""
        self._require_open()
        self._check_lock()
        entry = self._array(name)
        stored, logical = to_stored_array(data)
        if logical != entry.dtype:  # no silent casts: a wrong dtype is a bug upstream
            raise TypeError(f"array {name!r} is {entry.dtype}, got data of dtype {logical}")
        if not entry.shape:
            raise ValueError(f"array {name!r} is 0-d: use put()")
        if stored.ndim != len(entry.shape) or stored.shape[1:] != entry.shape[1:]:
            raise ValueError(
                f"array {name!r} has rows of shape {entry.shape[1:]}, "
                f"got data of shape {tuple(stored.shape)}"
            )
        start = int(start)
        stop = start + stored.shape[0]
        if start < 0 or stop > entry.shape[0]:
            raise ValueError(
                f"array {name!r}: rows [{start}, {stop}) outside [0, {entry.shape[0]})"
            )
        entry.check_no_overlap(name, start, stop)
        with self._storage_errors():
            entry.array[start:stop] = stored
        entry.slices.append((start, stop, slice_crc32(stored)))

    def put(self, name: str, data: Any) -> None:
        """Create array ``name`` from a whole (small) tensor or array and write it."""
        stored, logical = to_stored_array(data)
        self.create(name, stored.shape, logical)
        if stored.ndim == 0:
            entry = self._arrays[name]
            with self._storage_errors():
                entry.array[()] = stored
            entry.slices.append((0, 1, slice_crc32(stored)))
        else:
            self.write(name, 0, data)

    # -- internals --------------------------------------------------------------------------

    def _check_lock(self) -> None:
        """A writer whose record lock lapsed stops writing: the directory may be another writer's now."""
        if self._record_lock is not None:
            self._record_lock.check()

    def _release(self) -> None:
        if self._record_lock is not None:
            self._record_lock.release()
        with _BEING_WRITTEN_LOCK:
            _BEING_WRITTEN.discard(self._claim)

    def _require_open(self) -> zarr.Group:
        if self._group is None:
            raise RuntimeError("use the writer inside `with store.writer(...) as w:`")
        return self._group

    def _array(self, name: str) -> _ArrayInProgress:
        try:
            return self._arrays[name]
        except KeyError:
            raise KeyError(f"record {self.key}: no array {name!r}; create() it first") from None

    def _commit(self) -> None:
        group = self._require_open()
        for name, entry in self._arrays.items():
            gaps = entry.missing_rows()
            if gaps:
                raise ValueError(
                    f"record {self.key}: array {name!r} rows "
                    f"{', '.join(f'[{a}, {b})' for a, b in gaps)} were never written"
                )
        arrays = {name: entry.manifest() for name, entry in sorted(self._arrays.items())}
        manifest = {"nbytes": sum(a["nbytes"] for a in arrays.values()), "arrays": arrays}
        self._check_lock()  # a writer whose record lock lapsed marks nothing
        with self._storage_errors():
            # The completion mark: the last write of the record, in one document.
            group.update_attributes({ATTR_COMPLETE: True, ATTR_MANIFEST: manifest})

    def _discard(self) -> None:
        try:
            self._check_lock()
        except StoreLocked:
            return  # what is there may be the next writer's: the unmarked leftovers are its to wipe
        try:
            self._wipe(self.key)
        except Exception as e:  # best effort: the data has no mark and will never be read
            log.warning("could not remove the partial record %s: %s", self.key, e)

    @contextlib.contextmanager
    def _storage_errors(self) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as e:
            os_error = find_os_error(e)
            if os_error is None:
                raise
            raise StoreWriteError(
                f"writing record {self.key} ({self.kind}): {describe_os_error(os_error)}"
            ) from e


def find_os_error(exc: BaseException, _depth: int = 0) -> OSError | None:
    """The ``OSError`` in ``exc``, its cause/context chain or an exception group, if any."""
    if isinstance(exc, OSError):
        return exc
    if _depth > 10:
        return None
    for inner in (*getattr(exc, "exceptions", ()), exc.__cause__, exc.__context__):
        if inner is not None and (found := find_os_error(inner, _depth + 1)) is not None:
            return found
    return None


def describe_os_error(error: OSError) -> str:
    """``os.strerror`` of the errno ("No space left on device"), else the error's text."""
    if error.errno:
        return os.strerror(error.errno)
    return str(error) or type(error).__name__
