"""Retention while a run goes on: bound the disk a 70B run needs.

Quantized-stream states are only needed to continue a chain: with ``keep_quant_states: last`` the
state before layer l is deleted once layer l is complete (at 128x2048 tokens, one 8192-wide fp16
stream is 4.3 GB per layer). Clean states and all weights are kept (variants share them).
``loaq gc`` applies the same policy to a whole store afterwards.
"""

from __future__ import annotations

from loaq.configs.schema import StoreConfig

from .context import StageContext


def retain(ctx: StageContext, cfg: StoreConfig, previous_state_key: str | None) -> int:
    """Drop the quantized-stream state that the layer just finished no longer needs; bytes freed."""
    if cfg.keep_quant_states == "all" or previous_state_key is None or not ctx.store.is_complete(previous_state_key):
        return 0
    freed = ctx.store.size(previous_state_key)
    ctx.store.delete(previous_state_key)
    return freed
