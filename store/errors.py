"""Exceptions raised by the stage store.

Every error names the record key (and, where it applies, the array) so that a message in a
Prefect log is enough to find the record on disk: ``<root>/records/<key[:2]>/<key>/``.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by ``loaq.store``."""


class IncompleteRecord(StoreError):
    """The record does not exist or has no completion mark: it must be (re)computed."""


class CorruptRecord(StoreError):
    """A complete record whose data fails its checks (checksum, missing or truncated chunk)."""

    def __init__(self, key: str, name: str | None, reason: str) -> None:
        where = f"record {key}" + (f", array {name!r}" if name is not None else "")
        super().__init__(f"{where} is corrupt: {reason}")
        self.key = key
        self.name = name
        self.reason = reason


class StoreWriteError(StoreError):
    """The storage failed (disk full, I/O error, permission) while a record was written."""


class RecordExists(StoreError):
    """``writer`` was asked for a key that is already complete (pass ``overwrite=True``)."""


class RecordBusy(StoreError):
    """Another writer in this process is writing the same key right now."""


class StoreLocked(StoreError):
    """A store lock could not be taken within its timeout; the message names the holder."""
