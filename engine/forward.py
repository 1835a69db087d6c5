"""Layer-by-layer forward of a whole model over token windows, one decoder layer in memory at a time.

Used for the clean calibration stream and for evaluation: hidden states of all windows stay on the
host; each layer is built, run over micro-batches on the device, and dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from loaq.models.layers import ContextFactory, build_layer, call_sublayer

from .arrays import MemoryArray, SampleArray, micro_batches
from .sources import WeightSource


def final_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's final RMSNorm, with transformers' operation order (float32 statistics)."""
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(hidden.dtype)


def next_token_log_probs(hidden: torch.Tensor, norm_weight: torch.Tensor, head: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """Log-probabilities (..., vocab), float32, of final hidden states (..., d): norm, head, log-softmax."""
    return F.log_softmax(F.linear(final_norm(hidden, norm_weight, eps), head).float(), dim=-1)


@torch.no_grad()
def embed(source: WeightSource, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """tokens: (n, seqlen) -> hidden states (n, seqlen, d) on the host."""
    return F.embedding(tokens, source.embed_weight().to(dtype))


@torch.no_grad()
def forward_layer(source: WeightSource, index: int, h_in: SampleArray, h_out: SampleArray, contexts: ContextFactory,
                  *, device="cpu", dtype=torch.float32, micro_batch: int = 8) -> None:
    """h_out = decoder layer ``index`` applied to h_in (transformers' own layer forward)."""
    layer = build_layer(source.adapter, source.config, index, source.layer_state(index), dtype, device,
                        source.input_transforms(index))
    for start, stop in micro_batches(h_in.shape[0], micro_batch):
        h = h_in.read(start, stop).to(device=device, dtype=dtype)
        ctx = contexts(h)
        h_out.write(start, layer(h, attention_mask=ctx.mask_for(source.config, index),
                                 position_embeddings=ctx.position_embeddings))


@torch.no_grad()
def clean_layer_forward(source: WeightSource, index: int, h_in: SampleArray, h_out: SampleArray,
                        sub_out: dict[str, SampleArray], contexts: ContextFactory, *, device="cpu",
                        dtype=torch.float32, micro_batch: int = 8) -> None:
    """Like ``forward_layer``, and also writes each sub-layer's output Y (``sub_out[sub.name]``):
    h_mid = h + Y_attn, h_out = h_mid + Y_mlp, the same operations in the same order as the
    transformers layer, so h_out is bit-identical to ``forward_layer``'s. The LoaQ statistics of
    W_out need only Y (Y - b = X W_out^T) from the clean stream, not X itself, which is what lets a
    variant reuse the stored clean stream without running the full-precision layer again."""
    layer = build_layer(source.adapter, source.config, index, source.layer_state(index), dtype, device,
                        source.input_transforms(index))
    for start, stop in micro_batches(h_in.shape[0], micro_batch):
        h = h_in.read(start, stop).to(device=device, dtype=dtype)
        for sub in source.adapter.sublayers:
            y = call_sublayer(layer, sub, h, contexts, index)
            sub_out[sub.name].write(start, y)
            h = h + y
        h_out.write(start, h)


@torch.no_grad()
def stream_forward(source: WeightSource, tokens: torch.Tensor, *, device="cpu", dtype=torch.float32,
                   micro_batch: int = 8, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
    """Final hidden states (before the final norm) of ``tokens`` (n, seqlen), streaming layers."""
    contexts = ContextFactory(source.adapter, source.config, device)
    h = MemoryArray(embed(source, tokens, dtype))
    for index in range(source.num_layers):
        out = MemoryArray(shape=h.shape, dtype=dtype)
        forward_layer(source, index, h, out, contexts, device=device, dtype=dtype, micro_batch=micro_batch)
        h = out
        if on_layer is not None:
            on_layer(index)
    return h.tensor
