"""Reading records: :class:`Record` (one complete record) and :class:`RecordInfo` (a listing).

A :class:`Record` is only ever made from a record that carries its completion mark (see
``Store.open``); its shapes and dtypes come from the manifest written with the mark, so what is
read is checked against what was written:

* every chunk is stored with a crc32c checksum (Zarr's ``crc32c`` codec, applied to the
  compressed bytes): a truncated or altered chunk fails to decode;
* a chunk that is missing on disk (Zarr would read it back as zeros) is detected before the
  read, since the writer stores every chunk, even all-zero ones;

and either raises :class:`~loaq.store.errors.CorruptRecord` naming the key and the array.
:meth:`Record.check` additionally compares every written slice with the crc32 in the manifest
(``Store.verify``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from zarr.abc.store import Store as ZarrStore

from .dtypes import from_stored_array, stored_numpy_dtype, torch_dtype
from .errors import CorruptRecord
from .layout import ATTR_MANIFEST, ATTR_RECORD, ATTR_USER, record_path, slice_crc32


@dataclass(frozen=True)
class RecordInfo:
    """One record as listed by ``Store.list``.

    ``nbytes`` is the size on disk (compressed, all files of the record), which is what
    deleting it frees. ``kind``/``created`` are None when the metadata is unreadable.
    """

    key: str
    kind: str | None
    attrs: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    nbytes: int = 0
    created: str | None = None


class Record:
    """A complete record, open for reading. Obtain it with ``Store.open(key)``.

    ``zarr_store`` is the store's Zarr store (the record is the group at ``record_path(key)``);
    ``exists(path)`` tells whether a file below the store's root exists (chunk presence checks).
    """

    def __init__(self, key: str, group_attributes: dict[str, Any], zarr_store: ZarrStore,
                 exists: Callable[[str], bool]) -> None:
        info = group_attributes[ATTR_RECORD]
        self.key: str = key
        self.kind: str = info["kind"]
        self.created: str = info["created"]
        #: The caller's attributes given to ``Store.writer`` (layer index, config, ...).
        self.attrs: dict[str, Any] = group_attributes.get(ATTR_USER, {})
        self._zarr_store = zarr_store
        self._exists = exists
        self._arrays_manifest: dict[str, dict[str, Any]] = group_attributes[ATTR_MANIFEST][
            "arrays"
        ]
        self._group: zarr.Group | None = None
        self._open_arrays: dict[str, zarr.Array] = {}

    # -- what is in it ----------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Names of the record's arrays, sorted."""
        return sorted(self._arrays_manifest)

    def __contains__(self, name: str) -> bool:
        return name in self._arrays_manifest

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """The logical dtype (``torch.bfloat16`` for a bf16 tensor stored as raw bits)."""
        return torch_dtype(self._entry(name)["dtype"])

    @property
    def nbytes(self) -> int:
        """Uncompressed size of all arrays, i.e. the memory needed to read them all."""
        return sum(entry["nbytes"] for entry in self._arrays_manifest.values())

    def __repr__(self) -> str:
        arrays = ", ".join(
            f"{n}{tuple(e['shape'])}:{e['dtype']}" for n, e in sorted(self._arrays_manifest.items())
        )
        return f"Record({self.key}, kind={self.kind!r}, arrays=[{arrays}])"

    # -- reading ----------------------------------------------------------------------------

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of array ``name`` as a CPU tensor of its logical dtype.

        ``start``/``stop`` follow Python slice rules (None: from the start / to the end,
        negative: from the end). Raises ``CorruptRecord`` if the data fails its checks.
        """
        entry = self._entry(name)
        return from_stored_array(self.read_stored(name, start, stop), entry["dtype"])

    def read_stored(
        self, name: str, start: int | None = None, stop: int | None = None
    ) -> np.ndarray:
        """Like :meth:`read` but the stored numpy array (bf16 comes back as its uint16 bits)."""
        entry = self._entry(name)
        shape = tuple(entry["shape"])
        array = self._array(name)
        if not shape:
            if start is not None or stop is not None:
                raise ValueError(f"array {name!r} is 0-d: read it without start/stop")
            self._check_chunks_present(name, array, entry, 0, 1)
            selection: Any = ()
        else:
            rows = range(shape[0])[slice(start, stop)]
            start, stop = rows.start, max(rows.start, rows.stop)
            self._check_chunks_present(name, array, entry, start, stop)
            selection = slice(start, stop)
        try:
            data = np.asarray(array[selection])
        except Exception as e:  # checksum mismatch, truncated or undecodable chunk, I/O error
            raise CorruptRecord(self.key, name, f"{type(e).__name__}: {e}") from e
        expected_shape = (stop - start, *shape[1:]) if shape else ()
        if data.shape != expected_shape:
            raise CorruptRecord(
                self.key, name, f"read shape {data.shape}, expected {expected_shape}"
            )
        return data

    def check(self) -> None:
        """Read every written slice and compare it with the crc32 the writer recorded for it;
        ``CorruptRecord`` on the first mismatch (or on any damage the reads themselves find)."""
        for name in self.names:
            for start, stop, crc in self._entry(name)["slices"]:
                stored = self.read_stored(name, start, stop) if self.shape(name) else self.read_stored(name)
                if slice_crc32(stored) != crc:
                    raise CorruptRecord(self.key, name, f"rows [{start}, {stop}): crc32 mismatch")

    # -- internals --------------------------------------------------------------------------

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self._arrays_manifest[name]
        except KeyError:
            raise KeyError(f"record {self.key} has no array {name!r} (has {self.names})") from None

    def _array(self, name: str) -> zarr.Array:
        if name in self._open_arrays:
            return self._open_arrays[name]
        entry = self._entry(name)
        try:
            if self._group is None:
                self._group = zarr.open_group(
                    store=self._zarr_store, path=record_path(self.key), mode="r"
                )
            array = self._group[name]
        except Exception as e:
            raise CorruptRecord(self.key, name, f"cannot open the array: {e}") from e
        expected_dtype = stored_numpy_dtype(entry["dtype"])
        if not isinstance(array, zarr.Array) or tuple(array.shape) != tuple(entry["shape"]):
            raise CorruptRecord(self.key, name, "array metadata does not match the manifest")
        if np.dtype(array.dtype) != expected_dtype:
            raise CorruptRecord(
                self.key, name, f"stored dtype {array.dtype}, manifest says {expected_dtype}"
            )
        self._open_arrays[name] = array
        return array

    def _check_chunks_present(
        self, name: str, array: zarr.Array, entry: dict[str, Any], start: int, stop: int
    ) -> None:
        """Raise if a chunk under rows [start, stop) is missing on disk.

        Zarr reads a missing chunk as the fill value; since the writer stores every chunk, a
        missing one can only be damage (a deleted or never-synced file).
        """
        shape = tuple(entry["shape"])
        if stop <= start or any(s == 0 for s in shape):
            return
        if shape:
            chunk_tokens = entry["chunk_tokens"]
            first, last = start // chunk_tokens, math.ceil(stop / chunk_tokens)
            coordinates = [(i, *([0] * (len(shape) - 1))) for i in range(first, last)]
        else:
            coordinates = [()]
        base = f"{record_path(self.key)}/{name}"
        for coords in coordinates:
            chunk_key = array.metadata.encode_chunk_key(coords)
            if not self._exists(f"{base}/{chunk_key}"):
                raise CorruptRecord(self.key, name, f"chunk {chunk_key} is missing")
