"""Retention while a run goes on: bound the disk a 70B run needs.

Quantized-stream states are only needed to continue a chain: with ``keep_quant_states: last`` the
state before layer l is deleted once layer l is complete (at 128x2048 tokens, one 8192-wide fp16
stream is 4.3 GB per layer). Clean states (the input and both sub-layer outputs, 12.9 GB a layer
there) are shared by variants; with ``keep_clean_states: last`` the clean input of layer l is
deleted once layer l is complete too, and a later variant recomputes the clean stream. Weights
are always kept. ``loaq gc`` applies the same policy to a whole store afterwards.
"""

from __future__ import annotations

from loaq.configs.schema import StoreConfig

from .context import StageContext


def retain(ctx: StageContext, cfg: StoreConfig, previous_state_key: str | None,
           previous_clean_key: str | None = None) -> int:
    """Drop the quantized- and clean-stream states that the layer just finished no longer needs
    (``None``: the embedding, the root of both streams, always kept); bytes freed."""
    freed = 0
    for policy, key in ((cfg.keep_quant_states, previous_state_key), (cfg.keep_clean_states, previous_clean_key)):
        if policy == "all" or key is None or not ctx.store.is_complete(key):
            continue
        freed += ctx.store.size(key)
        ctx.store.delete(key)
    return freed
