"""Retrying transient storage errors (loaq.store.resilient), on Zarr's in-memory store."""

from __future__ import annotations

import asyncio
import errno

import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from loaq.store import resilient
from loaq.store.resilient import ATTEMPTS, RetryingStore, is_transient


class Flaky(MemoryStore):
    """Fails the first ``failures`` writes with ``error``."""

    def __init__(self, failures: int, error: BaseException) -> None:
        super().__init__()
        self.failures, self.error, self.calls = failures, error, 0

    async def set(self, key, value):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return await super().set(key, value)


def _put(store, key: str = "a/c/0") -> bytes:
    value = default_buffer_prototype().buffer.from_bytes(b"payload")

    async def go():
        await store.set(key, value)
        return (await store.get(key, default_buffer_prototype())).to_bytes()

    return asyncio.run(go())


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(resilient, "FIRST_BACKOFF", 0.001)


@pytest.mark.parametrize("error", [ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("read timed out"),
                                   OSError("503 Service Unavailable: SlowDown")])
def test_transient_errors_are_retried_until_the_write_lands(error):
    inner = Flaky(ATTEMPTS - 1, error)
    assert _put(RetryingStore(inner, faults=0)) == b"payload"
    assert inner.calls == ATTEMPTS


def test_a_persistent_transient_error_ends_after_the_attempts_naming_the_key():
    inner = Flaky(100, ConnectionResetError(errno.ECONNRESET, "reset"))
    with pytest.raises(OSError, match=f"writing a/c/0 failed {ATTEMPTS} times"):
        _put(RetryingStore(inner, faults=0))
    assert inner.calls == ATTEMPTS


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), PermissionError("denied"),
                                   FileNotFoundError("gone")])
def test_errors_a_retry_cannot_fix_are_raised_at_once(error):
    inner = Flaky(1, error)
    with pytest.raises(type(error)):
        _put(RetryingStore(inner, faults=0))
    assert inner.calls == 1 and not is_transient(error)


def test_injected_faults_fail_each_key_first_then_let_it_through():
    inner = Flaky(0, OSError())
    store = RetryingStore(inner, faults=2)
    assert _put(store, "x") == b"payload" and _put(store, "y") == b"payload"
    assert inner.calls == 2  # the injected failures never reached the store
    with pytest.raises(OSError, match="injected fault"):
        _put(RetryingStore(MemoryStore(), faults=ATTEMPTS))
