"""SIGTERM during a run (a scheduler preempting or cancelling the job, ``kill``): the run unwinds as on
Ctrl-C, so a record being written is left incomplete (the next run recomputes it) and Prefect's
ephemeral API server, stopped at exit, is not left running on the node.

Prefect's flow engine catches SIGTERM and passes it on to the handler it found; the default one ends
the process at once, without exit handlers, so the server it started would be orphaned. The command
line always turns SIGTERM into ``Terminated``; the Python API does so only where the caller left the
default in place (``loaq.api``), and then ends the process with the status the default would give.
Stages running on other threads (a zoo's models) stop through ``stages.interrupt``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from loaq.stages.interrupt import Terminated

#: Exit status of a run ended by SIGTERM, as a shell reports a process killed by it.
TERMINATED_STATUS = 128 + signal.SIGTERM

#: What a run ended by SIGTERM or Ctrl-C says (after ``loaq: terminated; `` or ``loaq: interrupted; ``).
RESUME_HINT = "finished records are kept, run again to resume"


def _raise_terminated(signum, frame) -> None:
    # The run is unwinding now: a repeated SIGTERM must not cut that short (SIGKILL still ends it).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextmanager
def sigterm_unwinds(*, only_over_default: bool = False) -> Iterator[bool]:
    """While the block runs, SIGTERM raises :class:`Terminated` in it, once: further SIGTERMs are
    ignored while it unwinds. The previous handler is restored after. Only the main thread can handle
    signals, so elsewhere nothing changes. With ``only_over_default``, a handler the caller installed
    is left alone. Yields whether it is in force."""
    previous = signal.getsignal(signal.SIGTERM)
    active = (threading.current_thread() is threading.main_thread()
              and (not only_over_default or previous is signal.SIG_DFL))
    if active:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield active
    finally:
        if active:
            signal.signal(signal.SIGTERM, previous)


def ignore_sigterm_while_exiting() -> None:
    """A process on its way out after a SIGTERM finishes its exit handlers (they stop the Prefect
    server it started) whatever SIGTERM comes next; SIGKILL still ends it at once."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
