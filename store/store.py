"""The stage store: records addressed by input-derived keys, in Zarr v3, on any fsspec URL.

A record is written once (``writer``), marked complete last, and from then on only read
(``open``), verified (``verify``), listed (``list``) or deleted (``delete``/``gc``). See
``layout`` for the on-disk layout, ``writer`` for the write protocol, ``records`` for the read
checks, ``locks`` for the consistency model and ``events`` for the execution log.

URLs: a plain path or ``file://`` URL is a local directory (Zarr ``LocalStore``, real
``flock`` locks). Any other fsspec URL (``memory://``, ``s3://``, ``gs://`` ...) goes through
Zarr's ``FsspecStore``; there the completion mark is a single PUT of the record's ``zarr.json``
and locks are leased conditional PUTs on S3 and ``memory://``, advisory elsewhere (see
``locks``). Local directories, ``memory://`` and S3 (a server on loopback) are tested.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from . import events as events_module
from .conditional import conditional_ops
from .errors import CorruptRecord, IncompleteRecord
from .layout import (
    ATTR_COMPLETE,
    ATTR_INVALIDATED,
    ATTR_MANIFEST,
    ATTR_RECORD,
    ATTR_USER,
    FORMAT_VERSION,
    GROUP_METADATA_FILE,
    RECORDS_DIR,
    check_key,
    record_path,
)
from .locks import StoreLock
from .records import Record, RecordInfo
from .resilient import RetryingStore
from .writer import RecordWriter


def default_compressor() -> BytesBytesCodec:
    """zstd level 1, for the arrays it pays on (see ``Store.compressors_for``).

    On bf16 activations the exponent bits are low-entropy, so a fast codec saves about a fifth of
    the bytes (the codecs compared: ``bench/README.md``). Pass ``Store(url, compressor=...)`` to
    choose another codec for every array.
    """
    return ZstdCodec(level=1)


# float32 / float64 arrays (hidden states, Hessians) are stored uncompressed by default: a 23-bit
# mantissa is noise to a codec, so it saves little and slows the clean stream's read-back, which
# every layer does (``bench/README.md``).
_STORED_RAW = {np.dtype(np.float32), np.dtype(np.float64)}


class Store:
    """A store of records at ``url`` (a local directory by default, or any fsspec URL)."""

    def __init__(
        self, url: str | os.PathLike, *, compressor: BytesBytesCodec | None = None
    ) -> None:
        url = os.fspath(url)
        if "://" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        self.url: str = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.is_local: bool = isinstance(self.fs, LocalFileSystem)
        self.compressor: BytesBytesCodec | None = compressor  # None: the default policy below
        self.fs.makedirs(self.root, exist_ok=True)
        if self.is_local:
            self._zarr_store = LocalStore(self.root)
        else:
            self._zarr_store = FsspecStore.from_url(url)
        self._zarr_store = RetryingStore(self._zarr_store)  # transient errors retried (``resilient``)
        self._events = events_module.EventLog(self.fs, self.root)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def compressors_for(self, stored_dtype: np.dtype) -> list[BytesBytesCodec]:
        """The compression of a new array: the store's own codec when one was given, else zstd-1
        except for float32/float64 arrays, which it barely shrinks (see ``_STORED_RAW``)."""
        if self.compressor is not None:
            return [self.compressor]
        return [] if np.dtype(stored_dtype) in _STORED_RAW else [default_compressor()]

    def __reduce__(self):
        # Pickled as its URL (e.g. for process-pool task runners): fsspec and Zarr handles
        # are re-created on the other side.
        return (_reopen_store, (self.url, self.compressor))

    # -- writing ----------------------------------------------------------------------------

    def writer(
        self,
        key: str,
        kind: str,
        attrs: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> RecordWriter:
        """A writer for record ``key``; use as ``with store.writer(key, kind=...) as w:``.

        ``attrs`` (JSON-able; pydantic models and dataclasses accepted) are stored with the
        record. A complete record is refused unless ``overwrite`` (see ``writer`` module).
        """
        return RecordWriter(check_key(key), kind, attrs, overwrite, zarr_store=self._zarr_store,
                            store_id=self._identity(), compressors_for=self.compressors_for,
                            is_complete=self.is_complete, wipe=self._wipe, record_lock=self._record_lock(key))

    # -- reading ----------------------------------------------------------------------------

    def is_complete(self, key: str) -> bool:
        """True iff the record exists, its metadata is readable and it carries the mark."""
        return _is_complete_metadata(self._group_attributes(check_key(key)))

    def open(self, key: str) -> Record:
        """The complete record ``key``; ``IncompleteRecord`` if it is missing or unmarked."""
        attributes = self._group_attributes(check_key(key))
        if attributes is None:
            raise IncompleteRecord(f"record {key} does not exist (or its metadata is unreadable)")
        if not _is_complete_metadata(attributes):
            raise IncompleteRecord(f"record {key} has no completion mark: recompute it")
        return Record(key, attributes, self._zarr_store, self._exists)

    def verify(self, key: str) -> bool:
        """Read every written slice of a complete record and check it against the manifest.

        On damage (checksum, truncated or missing chunk, crc32 mismatch) the completion mark is
        removed (:meth:`invalidate`), so the record is recomputed, and False is returned. An
        incomplete or missing record also gives False.
        """
        try:
            record = self.open(key)
        except IncompleteRecord:
            return False
        try:
            record.check()
        except CorruptRecord as e:
            self.invalidate(key, reason=str(e))
            return False
        return True

    def invalidate(self, key: str, reason: str = "invalidated") -> None:
        """Remove the completion mark of ``key`` (the data stays until rewritten or ``gc``)."""
        check_key(key)
        if self._group_attributes(key) is None:
            metadata_path = self._path(record_path(key), GROUP_METADATA_FILE)
            if self.fs.exists(metadata_path):  # unreadable metadata: removing it unmarks it
                self.fs.rm_file(metadata_path)
            return
        group = zarr.open_group(store=self._zarr_store, path=record_path(key), mode="r+")
        # One metadata write each; the first one removes the mark, so an interruption after
        # it leaves an unmarked (recomputed) record, never a marked damaged one.
        if ATTR_COMPLETE in group.attrs:
            del group.attrs[ATTR_COMPLETE]
        group.update_attributes({ATTR_INVALIDATED: reason})

    # -- housekeeping -----------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Delete record ``key`` (no error if it does not exist)."""
        self._wipe(check_key(key))

    def size(self, key: str) -> int:
        """Bytes the record takes on disk (0 if it does not exist)."""
        path = self._path(record_path(check_key(key)))
        if not self.fs.exists(path):
            return 0
        return int(self.fs.du(path, total=True))

    def list(self, kind: str | None = None) -> list[RecordInfo]:
        """All records (complete or not), optionally only those of ``kind``, oldest first."""
        infos = []
        for key in self._keys():
            attributes = self._group_attributes(key)
            record = (attributes or {}).get(ATTR_RECORD, {})
            info = RecordInfo(
                key=key,
                kind=record.get("kind"),
                attrs=(attributes or {}).get(ATTR_USER, {}),
                complete=_is_complete_metadata(attributes),
                nbytes=self.size(key),
                created=record.get("created"),
            )
            if kind is None or info.kind == kind:
                infos.append(info)
        return sorted(infos, key=lambda i: (i.created or "", i.key))

    # -- locks and events -------------------------------------------------------------------

    def lock(self, name: str = "run", timeout: float | None = 0.0) -> StoreLock:
        """An exclusive inter-process lock on this store; use as ``with store.lock(...):``.

        ``timeout`` seconds to wait (0: try once, None: wait forever); on timeout
        ``StoreLocked`` names the holder (pid, host, since). See ``locks`` for the model.
        """
        return StoreLock(self.fs, self.root, name, timeout=timeout, native=self.is_local)

    def log_event(
        self,
        run_id: str,
        stage: str,
        key: str,
        action: str,
        *,
        seconds: float | None = None,
        nbytes: int | None = None,
        detail: str | None = None,
        result: Any = None,
    ) -> dict[str, Any]:
        """Append one event (``action`` "computed", "reused" or "failed") to run ``run_id``'s log;
        ``detail``: why it failed, ``result``: anything JSON-able a reader of the log needs."""
        return self._events.append(run_id, stage, key, action, seconds=seconds, nbytes=nbytes, detail=detail,
                                   result=result)

    def events(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """The events of run ``run_id`` (of all runs if None), in the order they were logged."""
        return self._events.read(run_id)

    # -- internals --------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join((self.root.rstrip("/"), *parts))

    def _exists(self, relative_path: str) -> bool:
        return self.fs.exists(self._path(relative_path))

    def _group_document(self, key: str) -> dict[str, Any] | None:
        """The record group's parsed ``zarr.json``, or None if missing or unreadable."""
        try:
            raw = self.fs.cat_file(self._path(record_path(key), GROUP_METADATA_FILE))
            document = json.loads(raw)
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def _group_attributes(self, key: str) -> dict[str, Any] | None:
        document = self._group_document(key)
        if document is None or not isinstance(document.get("attributes"), dict):
            return None
        return document["attributes"]

    def _keys(self) -> list[str]:
        records_dir = self._path(RECORDS_DIR)
        if not self.fs.exists(records_dir):
            return []
        keys = []
        for fan_out in self.fs.ls(records_dir, detail=True):
            if fan_out["type"] != "directory":
                continue  # Zarr's zarr.json of the records/ group
            for entry in self.fs.ls(fan_out["name"], detail=True):
                if entry["type"] == "directory":
                    keys.append(entry["name"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(keys)

    def _wipe(self, key: str) -> None:
        """Delete a record directory, its metadata (and so its mark) first.

        Removing ``zarr.json`` first means an interrupted delete can never leave a record that
        is marked complete but lacks some chunks.
        """
        path = self._path(record_path(key))
        metadata_path = f"{path}/{GROUP_METADATA_FILE}"
        if self.fs.exists(metadata_path):
            self.fs.rm_file(metadata_path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def being_written(self, key: str) -> bool:
        """True while a writer in another process holds record ``key``'s lock (stores with conditional
        writes); elsewhere False: there the run lock keeps writers and ``gc`` apart."""
        lock = self._record_lock(check_key(key))
        return lock is not None and lock.held_elsewhere()

    def _record_lock(self, key: str) -> StoreLock | None:
        """A leased lock per record where the store has conditional writes (see ``locks``), so one
        writer per record holds across processes and hosts; None elsewhere (the run lock guards)."""
        if self.is_local or conditional_ops(self.fs) is None:
            return None
        return self.lock(f"record-{key}", timeout=0.0)

    def _identity(self) -> str:
        """Names the store whatever URL spelling reached it ("/x" and "file:///x" alike)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.root}"


def _reopen_store(url: str, compressor: BytesBytesCodec) -> Store:
    return Store(url, compressor=compressor)


def _is_complete_metadata(attributes: dict[str, Any] | None) -> bool:
    if not attributes or attributes.get(ATTR_COMPLETE) is not True:
        return False
    record = attributes.get(ATTR_RECORD)
    manifest = attributes.get(ATTR_MANIFEST)
    return (
        isinstance(record, dict)
        and record.get("format") == FORMAT_VERSION
        and isinstance(manifest, dict)
        and isinstance(manifest.get("arrays"), dict)
    )
