"""The model behind one sub-layer, in full precision, up to its next-token log-probabilities: what
the search's ``kl`` objective runs the held-out windows through.

Behind sub-layer ``position`` of layer ``index`` lie that layer's later sub-layers, the later layers,
the final norm and the head, all still full precision when the sub-layer is searched: a candidate's
score is the KL that the quantized stream's error after that sub-layer causes at the model's output,
carried through the rest of the model rather than measured where it is made. The later layers'
weights are held while the layer is searched, so the objective is meant for the last few layers.
"""

from __future__ import annotations

import torch

from loaq.models.layers import ContextFactory, build_layer, call_sublayer

from .forward import next_token_log_probs
from .sources import WeightSource


class FullPrecisionTail:
    """Sub-layers after (``index``, ``position``) and every later layer, the final norm and the head."""

    def __init__(self, source: WeightSource, index: int, contexts: ContextFactory, *, device="cpu",
                 dtype=torch.float32):
        self.source, self.index, self.contexts, self.device, self.dtype = source, index, contexts, device, dtype
        self.layers = [build_layer(source.adapter, source.config, i, source.layer_state(i), dtype, device,
                                   source.input_transforms(i)) for i in range(index, source.num_layers)]
        self.norm = source.final_norm_weight().to(device=device, dtype=dtype)
        self.head = source.lm_head_weight().to(device=device, dtype=dtype)
        self.eps = float(source.config.rms_norm_eps)

    @torch.no_grad()
    def hidden(self, position: int, h: torch.Tensor) -> torch.Tensor:
        """The final hidden state (before the final norm) of residual stream ``h`` (n, seqlen, d)
        taken after sub-layer ``position`` of layer ``index``."""
        config = self.source.config
        for sub in self.source.adapter.sublayers[position + 1:]:
            h = h + call_sublayer(self.layers[0], sub, h, self.contexts, self.index)
        for offset, layer in enumerate(self.layers[1:], start=1):
            ctx = self.contexts(h)
            h = layer(h, attention_mask=ctx.mask_for(config, self.index + offset),
                      position_embeddings=ctx.position_embeddings)
        return h

    @torch.no_grad()
    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities (..., vocab), float32, of final hidden states (..., d)."""
        return next_token_log_probs(hidden, self.norm, self.head, self.eps)
