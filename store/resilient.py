"""Transient storage errors retried with backoff, and faults injected to test that.

An object store drops a connection or answers 503 (SlowDown) now and then; one such answer must
not fail a run that has computed for an hour. :class:`RetryingStore` wraps the Zarr store of a
:class:`~loaq.store.Store` so every read, write and delete of a record is tried up to
``ATTEMPTS`` times, with exponential backoff and jitter, when it fails with a *transient* error
(:func:`is_transient`). The last failure is raised as an ``OSError`` naming the attempts, which
the record writer reports in one line (``StoreWriteError``) and which leaves the record
unmarked: the completion mark is a write like the others, made only after every chunk landed.
Errors that a retry cannot fix (disk full, permission, missing object) are raised at once.

``LOAQ_STORE_FAULTS=<n>`` makes the first ``n`` attempts of every record write fail with a
transient error (``n`` >= ``ATTEMPTS``: every write fails), to test the above end to end, the way
``LOAQ_FAILPOINT`` tests a kill.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections import Counter
from typing import Any

from zarr.storage import WrapperStore

#: Tries of one storage operation before its error is raised.
ATTEMPTS = 5
#: First backoff in seconds, doubled per retry (with up to 50% jitter), at most ``MAX_BACKOFF``.
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 2.0
FAULTS_ENV = "LOAQ_STORE_FAULTS"

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETRESET}
_TRANSIENT_WORDS = ("slowdown", "slow down", "service unavailable", "503", "500 internal", "internalerror",
                    "requesttimeout", "connection reset", "connection closed", "server disconnected",
                    "timed out", "throttl")


class InjectedFault(ConnectionResetError):
    """A transient failure made on purpose (``LOAQ_STORE_FAULTS``)."""


def is_transient(exc: BaseException) -> bool:
    """A dropped connection, a timeout, or a 5xx / throttling answer from the server."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
    name = type(exc).__name__.lower()
    if "disconnect" in name or "timeout" in name or "connection" in name:
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return False
    text = str(exc).lower()
    return any(word in text for word in _TRANSIENT_WORDS)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
    base = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (attempt - 1))
    return base * (1 + 0.5 * random.random())


class RetryingStore(WrapperStore):
    """A Zarr store whose operations retry transient errors (see the module docstring)."""

    def __init__(self, store: Any, faults: int | None = None) -> None:
        super().__init__(store)
        self._faults = faults if faults is not None else int(os.environ.get(FAULTS_ENV) or 0)
        self._attempted: Counter[str] = Counter()

    def _with_store(self, store: Any) -> RetryingStore:
        return type(self)(store, self._faults)

    async def _retry(self, what: str, key: str, call, inject: bool = False):
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if inject and self._attempted[key] < self._faults:
                    self._attempted[key] += 1
                    raise InjectedFault(errno.ECONNRESET, f"injected fault: connection reset while writing {key}")
                return await call()
            except Exception as e:
                if not is_transient(e):
                    raise
                if attempt == ATTEMPTS:
                    raise OSError(f"{what} {key} failed {ATTEMPTS} times, last: {type(e).__name__}: {e}") from e
            await asyncio.sleep(backoff(attempt))

    async def get(self, key, prototype, byte_range=None):
        return await self._retry("reading", key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        return await self._retry("reading", "ranges", lambda: self._store.get_partial_values(prototype, key_ranges))

    async def exists(self, key):
        return await self._retry("checking", key, lambda: self._store.exists(key))

    async def set(self, key, value):
        return await self._retry("writing", key, lambda: self._store.set(key, value), inject=True)

    async def set_if_not_exists(self, key, value):
        return await self._retry("writing", key, lambda: self._store.set_if_not_exists(key, value), inject=True)

    async def delete(self, key):
        return await self._retry("deleting", key, lambda: self._store.delete(key))
