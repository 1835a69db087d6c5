"""A run stopped by a signal stops in every thread.

Python runs signal handlers in the main thread only, so a SIGTERM or Ctrl-C unwinds the main thread
while stages on other threads (a zoo quantizes its models side by side on a thread pool) would run on,
and the process would wait for them. So the code that waits for those threads calls :func:`request`
when the signal's exception reaches it; stages call :func:`check` when they start and at every
micro-batch they read or write, and unwind there with the same kind of exception, leaving unmarked
what they were writing.
"""

from __future__ import annotations

import threading

_requested = threading.Event()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a run was in progress."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C arrived while a run was in progress (another thread's stages stop with this)."""


_reason: type[KeyboardInterrupt] = Interrupted


def request(reason: type[KeyboardInterrupt]) -> None:
    """Ask every stage of the process to stop, raising ``reason`` where it checks."""
    global _reason
    _reason = reason
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def clear() -> None:
    """Stages may run again (a run has unwound)."""
    _requested.clear()


def check() -> None:
    """Raise the pending stop request's exception, if a stop was requested."""
    if _requested.is_set():
        raise _reason
