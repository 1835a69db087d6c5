"""Disk space: refuse a run its store cannot hold, and end one whose disk fills in one line.

Before any work, the plan's bytes still to add (what the unfinished stages keep, plus the records
that exist only while a layer runs) are compared with the free space of a local store's
filesystem. Object stores report no free space, and a quota is invisible to ``statvfs``; there a
write that fails for lack of space ends the run through :func:`out_of_space` instead. Either way no
record is marked complete that is not (the writer marks a record last), so ``loaq run`` resumes
at the first unfinished layer once space is freed.
"""

from __future__ import annotations

import errno
import shutil

from loaq.configs.schema import RunConfig
from loaq.store import Store
from loaq.store.errors import StoreError
from loaq.store.writer import find_os_error

from .plan import Plan

SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
REDUCE = ("store.keep_clean_states=last", "store.keep_quant_states=last", "calibration.n_samples",
          "calibration.seqlen", "runtime.dtype=bfloat16")


class InsufficientSpace(StoreError):
    """The store's filesystem cannot hold what the run writes."""


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def free_bytes(store: Store) -> int | None:
    """Free space of a local store's filesystem; None for an object store (not known)."""
    return shutil.disk_usage(store.root).free if store.is_local else None


def _reducers(config: RunConfig) -> str:
    s = config.store
    fields = [f for f in REDUCE if not ((f.startswith("store.keep_clean") and s.keep_clean_states == "last")
                                        or (f.startswith("store.keep_quant") and s.keep_quant_states == "last"))]
    return ", ".join(fields)


def check_space(store: Store, config: RunConfig, plan: Plan) -> None:
    """Raise :class:`InsufficientSpace` when a local store cannot hold what the run still adds."""
    free = free_bytes(store)
    need = plan.bytes_to_add()
    if free is None or not config.store.check_space or need <= free:
        return
    raise InsufficientSpace(
        f"store {store.url} has {gib(free)} free but this run needs {gib(need)} more ({gib(need - free)} short); "
        f"free space or choose another store.url, or reduce it with {_reducers(config)} (see `loaq plan`)")


def out_of_space(exc: BaseException, store: Store, config: RunConfig, plan: Plan) -> InsufficientSpace | None:
    """The one-line error for a write that failed for lack of space (or quota); None for other errors."""
    os_error = find_os_error(exc)
    if os_error is None or os_error.errno not in SPACE_ERRNOS:
        return None
    free = free_bytes(store)
    done = sum(store.is_complete(k) for k in plan.weights)
    what = str(exc) if isinstance(exc, StoreError) else f"writing to the store: {os_error.strerror or os_error}"
    return InsufficientSpace(
        f"store {store.url} is full ({what}); the run needed {gib(plan.bytes_to_add())} more at its start"
        + (f", {gib(free)} free now" if free is not None else "")
        + f"; {done} of {plan.shape.layers} layers are complete; free space (or reduce it with {_reducers(config)}) "
          "and run `loaq run` again to resume")
