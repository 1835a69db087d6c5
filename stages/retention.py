"""Retention while a run goes on: bound the disk a 70B run needs.

Quantized-stream states are only needed to continue a chain: with ``keep_quant_states: last`` the
state of layer l-1 is deleted once layer l is complete (at 128x2048 tokens, one 8192-wide fp16
stream is 4.3 GB per layer). Clean states and all weights are kept (variants share them).
"""

from __future__ import annotations

from loaq.configs.schema import StoreConfig

from .context import StageContext


def retain(ctx: StageContext, cfg: StoreConfig, chain_id: str, index: int) -> int:
    if cfg.keep_quant_states == "all" or index == 0:
        return 0
    freed = 0
    for info in ctx.store.list(kind="quant_state"):
        attrs = info.attrs or {}
        if attrs.get("chain") == chain_id and attrs.get("layer", index) < index:
            freed += info.nbytes
            ctx.store.delete(info.key)
    return freed
