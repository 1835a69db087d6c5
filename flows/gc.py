"""``loaq gc``: apply the retention policy to the store, reading the run's plan.

Every record the store-wide policy rejects (``store.retention.default_keep``: quantized-stream
states behind their chain's last complete layer, records a killed run left without their completion
mark, optionally statistics) is deleted; with
``store.keep_clean_states: last`` also this run's clean-stream states except the last one and the
one resuming it needs (a variant recomputes them, one full-precision forward per layer).
"""

from __future__ import annotations

from loaq.configs.schema import RunConfig
from loaq.store.retention import default_keep, gc as store_gc

from .plan import plan
from .quantize import open_context, resume_point


def gc_flow(config: RunConfig, drop_stats: bool = False) -> int:
    """Bytes freed."""
    ctx = open_context(config)
    with ctx.store.lock("run", timeout=0.0):
        # Records without a completion mark are left by killed runs and never read; one whose writer
        # still holds its record lock (a zoo member on another host) is kept.
        keep = default_keep(ctx.store.list(), drop_stats=drop_stats, drop_incomplete=True)
        drop: set[str] = set()
        if config.store.keep_clean_states == "last":
            p = plan(ctx, config)
            start = resume_point(ctx, p.chain)
            needed = {p.clean[-1]} | ({p.clean[start - 1]} if 0 < start <= len(p.clean) else set())
            drop = set(p.clean) - needed
        return store_gc(ctx.store, lambda info: (info.key not in drop and keep(info))
                        or (not info.complete and ctx.store.being_written(info.key)), take_lock=False)
