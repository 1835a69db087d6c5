"""Perplexity with the GPTQ protocol, computed layer by layer.

GPTQ's ``eval`` scores each window of ``seqlen`` tokens with the mean next-token cross-entropy over
its seqlen-1 predictions, multiplies by seqlen, and reports exp(sum / (n_windows * seqlen)): the
exponential of the mean of per-window mean losses. This is *token-level* perplexity of the model's
own tokenizer, not lm-eval's word perplexity (which normalises by words, so it is not comparable
across tokenizers and is much larger); the two must not be mixed in one table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loaq.engine.forward import final_norm, stream_forward
from loaq.engine.sources import WeightSource


@torch.no_grad()
def window_nll(hidden: torch.Tensor, tokens: torch.Tensor, norm_weight: torch.Tensor, lm_head: torch.Tensor,
               eps: float, device="cpu") -> torch.Tensor:
    """Mean next-token NLL of each window. hidden: (n, seqlen, d) before the final norm (host);
    tokens: (n, seqlen); lm_head: (vocab, d). One window's logits at a time (vocab x seqlen floats),
    on ``device`` (the head is the largest matmul of the evaluation: 128k x 8192 for LLaMA-3-70B)."""
    out = torch.empty(tokens.shape[0], dtype=torch.float64)
    norm_weight, lm_head = (t.to(device=device, dtype=hidden.dtype) for t in (norm_weight, lm_head))
    for i in range(tokens.shape[0]):
        logits = F.linear(final_norm(hidden[i].to(device), norm_weight, eps), lm_head).float()
        out[i] = F.cross_entropy(logits[:-1], tokens[i, 1:].to(logits.device)).double()
    return out


def perplexity_from_nll(nll: torch.Tensor) -> float:
    return math.exp(float(nll.mean()))


def perplexity(source: WeightSource, windows: torch.Tensor, *, device="cpu", dtype=torch.float32,
               micro_batch: int = 4, on_layer=None) -> tuple[float, torch.Tensor]:
    """GPTQ-protocol perplexity of ``source`` on ``windows`` (n, seqlen); returns (ppl, per-window NLL)."""
    hidden = stream_forward(source, windows, device=device, dtype=dtype, micro_batch=micro_batch, on_layer=on_layer)
    nll = window_nll(hidden, windows, source.final_norm_weight(), source.lm_head_weight(),
                     float(source.config.rms_norm_eps), device)
    return perplexity_from_nll(nll), nll
