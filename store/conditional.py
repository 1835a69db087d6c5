"""Create-if-absent and compare-and-swap of one small object, on the stores that have them.

A lock on object storage needs one write that fails when someone else wrote first. S3 (and
S3-compatible servers that honour conditional writes) has it: a PUT with ``If-None-Match: *``
creates an object only if it is absent, and one with ``If-Match: <etag>`` replaces it only if it
is still that version. ``memory://`` lives in one process, where a process-wide mutex makes the
same two operations exact. Other filesystems get None from :func:`conditional_ops` (no such
primitive: locks there stay advisory).

Servers report a failed precondition differently (412 PreconditionFailed, 409
ConditionalRequestConflict, and s3fs translates them to ``FileExistsError`` or ``OSError``):
:func:`is_precondition_failure` treats them alike.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

_PRECONDITION_WORDS = ("pre-condition", "precondition", "conditionalrequestconflict", "412", "409")


class Lost(Exception):
    """The object was there already (create) or had changed (replace)."""


def is_precondition_failure(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412) or error.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return True
    text = str(exc).lower()
    return any(word in text for word in _PRECONDITION_WORDS)


class S3Conditional:
    """Conditional PUTs through s3fs (``put_object`` with IfNoneMatch / IfMatch)."""

    def __init__(self, fs) -> None:
        self._fs = fs

    def _put(self, path: str, data: bytes, **condition: str) -> str:
        bucket, key, _ = self._fs.split_path(path)
        try:
            response = self._fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except Exception as e:
            if is_precondition_failure(e):
                raise Lost(path) from None
            raise
        self._fs.invalidate_cache(path)
        return str(response.get("ETag", ""))

    def create(self, path: str, data: bytes) -> str:
        return self._put(path, data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, version: str) -> str:
        return self._put(path, data, IfMatch=version)

    def read(self, path: str) -> tuple[bytes, str] | None:
        """Content and version, read consistently (version before and after must agree)."""
        for _ in range(5):
            try:
                before = self._fs.info(path, refresh=True).get("ETag")
                data = self._fs.cat_file(path)
                after = self._fs.info(path, refresh=True).get("ETag")
            except FileNotFoundError:
                return None
            if before == after:
                return data, str(after)
        return None


_MEMORY_MUTEX = threading.Lock()


class MemoryConditional:
    """The same operations on fsspec's in-process ``memory://`` filesystem, under one mutex."""

    def __init__(self, fs) -> None:
        self._fs = fs

    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def create(self, path: str, data: bytes) -> str:
        with _MEMORY_MUTEX:
            if self._fs.exists(path):
                raise Lost(path)
            self._fs.pipe_file(path, data)
            return self._version(data)

    def replace(self, path: str, data: bytes, version: str) -> str:
        with _MEMORY_MUTEX:
            current = self._fs.cat_file(path) if self._fs.exists(path) else None
            if current is None or self._version(current) != version:
                raise Lost(path)
            self._fs.pipe_file(path, data)
            return self._version(data)

    def read(self, path: str) -> tuple[bytes, str] | None:
        with _MEMORY_MUTEX:
            if not self._fs.exists(path):
                return None
            data = self._fs.cat_file(path)
            return data, self._version(data)


def conditional_ops(fs: Any) -> S3Conditional | MemoryConditional | None:
    """The conditional operations of filesystem ``fs`` (unwrapping a retrying layer), or None."""
    inner = getattr(fs, "fs", fs)
    protocols = inner.protocol if isinstance(inner.protocol, (tuple, list)) else (inner.protocol,)
    if any(p in ("s3", "s3a") for p in protocols) and hasattr(inner, "call_s3"):
        return S3Conditional(inner)
    if "memory" in protocols:
        return MemoryConditional(inner)
    return None
