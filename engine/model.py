"""Quantize a whole model in one process, layer after layer, with both streams in host memory.

This is the engine without the store: the pipeline's stages call the same ``LayerQuantizer`` per
layer with Zarr-backed arrays instead, so a crash resumes at the first unfinished layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loaq.configs.schema import QuantizeConfig
from loaq.models.layers import ContextFactory

from .arrays import MemoryArray
from .forward import clean_layer_forward, embed
from .layer import CleanStream, LayerQuantizer, LayerResult
from .metrics import stream_divergence
from .sources import QuantizedWeights, WeightSource


@dataclass
class ModelResult:
    layers: list[LayerResult] = field(default_factory=list)
    divergence: list[dict] = field(default_factory=list)  # per layer: clean-vs-quantized MSE
    final_hidden: torch.Tensor | None = None  # quantized stream after the last layer (n, seqlen, d)
    act_bits: int | None = None  # the quantized linears' activation bits (None: 16-bit activations)

    def weights(self) -> dict[int, dict[str, torch.Tensor]]:
        return {i: {name: q.weight for name, q in layer.weights.items()} for i, layer in enumerate(self.layers)}

    def quantized_source(self, base: WeightSource) -> QuantizedWeights:
        return QuantizedWeights(base, self.weights(), self.act_bits)


def quantize_model(source: WeightSource, tokens: torch.Tensor, cfg: QuantizeConfig, *, device="cpu",
                   dtype=torch.float32, micro_batch: int = 8,
                   on_layer: Callable[[int, LayerResult], None] | None = None) -> ModelResult:
    """Quantize every decoder layer of ``source`` on calibration ``tokens`` (n, seqlen)."""
    contexts = ContextFactory(source.adapter, source.config, device)
    h = MemoryArray(embed(source, tokens, dtype))
    hq = MemoryArray(h.tensor.clone())
    result = ModelResult(act_bits=cfg.act_bits)
    for index in range(source.num_layers):
        h_out, hq_out = MemoryArray(shape=h.shape, dtype=dtype), MemoryArray(shape=h.shape, dtype=dtype)
        clean = CleanStream(h, {sub.name: MemoryArray(shape=h.shape, dtype=dtype) for sub in source.adapter.sublayers})
        clean_layer_forward(source, index, h, h_out, clean.out, contexts, device=device, dtype=dtype,
                            micro_batch=micro_batch)
        quantizer = LayerQuantizer(source.adapter, source.config, index, source.layer_state(index), cfg, contexts,
                                   device=device, dtype=dtype, micro_batch=micro_batch,
                                   input_transforms=source.input_transforms(index))
        layer_result = quantizer.run(clean, hq, hq_out)
        result.layers.append(layer_result)
        result.divergence.append(stream_divergence(h_out, hq_out))
        if on_layer is not None:
            on_layer(index, layer_result)
        h, hq = h_out, hq_out
    result.final_hidden = hq.tensor
    return result

