"""Retention: deleting records that are no longer worth their disk space.

``gc(store, keep)`` deletes every record for which ``keep(info)`` is False and returns the
bytes freed. ``default_keep(store.list())`` builds the default policy:

* keep everything (calibration, embeddings, clean states, weights, evals, exports, ...),
* except quantized-stream hidden states (kind ``"quant_state"``, attrs ``chain`` and
  ``layer``) older than the last complete layer of their chain: resuming a chain needs only
  its last state, and the earlier ones are 4 GB each on a 70B model;
* optionally (``drop_stats=True``) Hessians/statistics (kind ``"stats"``), which only matter
  while their layer is being quantized;
* optionally (``drop_incomplete=True``) records without a completion mark (left by killed
  runs; never read, only overwritten).

A caveat of sharing: a quant_state record shared by several variants carries the ``chain`` of
the variant that wrote it first. It is dropped once that chain has a later complete layer; a
variant that stopped exactly on that shared layer then recomputes its chain instead of
resuming it (slower, never wrong: a missing record is recomputed).

``gc`` takes the store's ``"run"`` lock (no run may be writing while records are deleted);
pass ``take_lock=False`` from code that already holds it. On an object store it also deletes the
released record locks, which releasing leaves behind (``locks``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .locks import remove_released
from .records import RecordInfo
from .store import Store

QUANT_STATE = "quant_state"
STATS = "stats"


def gc(
    store: Store,
    keep: Callable[[RecordInfo], bool],
    *,
    take_lock: bool = True,
    lock_timeout: float | None = 0.0,
) -> int:
    """Delete every record of ``store`` that ``keep`` rejects; return the bytes freed."""
    if take_lock:
        with store.lock("run", timeout=lock_timeout):
            return _collect(store, keep)
    return _collect(store, keep)


def _collect(store: Store, keep: Callable[[RecordInfo], bool]) -> int:
    freed = 0
    for info in store.list():
        if not keep(info):
            size = store.size(info.key)
            store.delete(info.key)
            freed += size
    if not store.is_local:
        remove_released(store.fs, store.root)
    return freed


def default_keep(
    infos: Iterable[RecordInfo],
    *,
    drop_stats: bool = False,
    drop_incomplete: bool = False,
) -> Callable[[RecordInfo], bool]:
    """The default policy (module docstring) for the records ``infos`` (``store.list()``)."""
    last_complete_layer: dict[str, int] = {}
    for info in infos:
        position = _chain_position(info)
        if info.complete and position is not None:
            chain, layer = position
            last_complete_layer[chain] = max(layer, last_complete_layer.get(chain, layer))

    def keep(info: RecordInfo) -> bool:
        if drop_incomplete and not info.complete:
            return False
        if drop_stats and info.kind == STATS:
            return False
        position = _chain_position(info)
        if position is None:
            return True
        chain, layer = position
        return layer >= last_complete_layer.get(chain, layer)

    return keep


def _chain_position(info: RecordInfo) -> tuple[str, int] | None:
    """``(chain, layer)`` of a quant_state record; None for other kinds or missing attrs."""
    if info.kind != QUANT_STATE:
        return None
    chain, layer = info.attrs.get("chain"), info.attrs.get("layer")
    if chain is None or isinstance(layer, bool) or not isinstance(layer, int):
        return None
    return str(chain), layer
