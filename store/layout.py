"""Where things live under a store root, and the names of the metadata fields.

::

    <root>/records/<key[:2]>/<key>/zarr.json     one Zarr v3 group per record (metadata below)
    <root>/records/<key[:2]>/<key>/<array>/...    one Zarr array per tensor, chunked on axis 0
    <root>/locks/<name>.lock, <name>.json         inter-process locks and their holder info
    <root>/events/<run_id>.jsonl                  append-only execution log, one file per run

The two-character fan-out keeps directories small on filesystems that dislike 10^4 entries.
(Zarr writes an empty ``zarr.json`` group document in ``<root>``, ``records/`` and the fan-out
directories when a record is first created there; they make the store a browsable Zarr
hierarchy and carry no loaq information.)

Group attributes of a record (its ``zarr.json``)::

    loaq_record:    {"format": 1, "key": ..., "kind": ..., "created": ISO-8601 UTC}
    attrs:          the caller's attributes (layer index, config, chain id, ...)
    loaq_complete:  true                       <- the completion mark, written last
    loaq_manifest:  {"nbytes": logical bytes, "arrays": {name: {shape, dtype, stored_dtype,
                     chunk_tokens, nbytes, slices: [[start, stop, crc32], ...]}}}

The mark and the manifest are written together in one final write of ``zarr.json`` (an atomic
rename on a local filesystem, a single PUT on an object store), so a record is complete exactly
when its data is.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

RECORDS_DIR = "records"
LOCKS_DIR = "locks"
EVENTS_DIR = "events"

#: Version of the on-disk record layout; records of another format are treated as incomplete.
FORMAT_VERSION = 1

GROUP_METADATA_FILE = "zarr.json"
ATTR_RECORD = "loaq_record"
ATTR_USER = "attrs"
ATTR_COMPLETE = "loaq_complete"
ATTR_MANIFEST = "loaq_manifest"
ATTR_INVALIDATED = "loaq_invalidated"
#: Array attribute naming the logical dtype (e.g. "bfloat16" for an array stored as uint16).
ARRAY_ATTR_DTYPE = "loaq_dtype"

#: Record kinds used by loaq's pipeline (documentation; any identifier is accepted).
KINDS = (
    "calibration",
    "embedding",
    "clean_state",
    "quant_state",
    "stats",
    "weights",
    "search",
    "eval",
    "export",
)

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{3,128}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_key(key: str) -> str:
    """A key must be usable as a single path component (keys from ``stage_key`` always are)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"invalid record key {key!r}: expected 3-128 characters [A-Za-z0-9_-]")
    return key


def check_name(name: str, what: str) -> str:
    """Array names, kinds, lock names and run ids must be plain path components."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == GROUP_METADATA_FILE:
        raise ValueError(
            f"invalid {what} {name!r}: expected [A-Za-z0-9_] then up to 127 of [A-Za-z0-9_.-]"
        )
    return name


def record_path(key: str) -> str:
    """Path of a record's group relative to the store root."""
    return f"{RECORDS_DIR}/{key[:2]}/{key}"


def slice_crc32(array: np.ndarray) -> str:
    """crc32 of an array's stored bytes (hex): the manifest's checksum of each written slice."""
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # no copy when contiguous
    return f"{zlib.crc32(raw):08x}"
