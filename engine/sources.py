"""Where a layer's weights come from: a streamed checkpoint, a model in memory, or either of
those with some linears replaced by their quantized (dequantized) weights.

Every source answers the same questions, so the engine never needs to know whether the model is
being streamed from disk one layer at a time or was loaded whole (the tests compare the two).
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PretrainedConfig

from loaq.models.adapters import Adapter, adapter_for
from loaq.quant import TokenQuantizer


class WeightSource(Protocol):
    config: PretrainedConfig
    adapter: Adapter
    num_layers: int

    def layer_state(self, index: int) -> dict[str, torch.Tensor]: ...
    def embed_weight(self) -> torch.Tensor: ...
    def final_norm_weight(self) -> torch.Tensor: ...
    def lm_head_weight(self) -> torch.Tensor: ...
    def input_transforms(self, index: int) -> dict[str, list]: ...  # linear name -> InputTransforms


class ModelWeights:
    """A ``WeightSource`` over a transformers model already in memory (tests, small models)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.adapter = adapter_for(model.config)
        self.num_layers = int(model.config.num_hidden_layers)
        self._state = model.state_dict()

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        prefix = self.adapter.layer_prefix.format(index=index)
        return {k[len(prefix):]: v for k, v in self._state.items() if k.startswith(prefix)}

    def embed_weight(self) -> torch.Tensor:
        return self._state[self.adapter.embed]

    def final_norm_weight(self) -> torch.Tensor:
        return self._state[self.adapter.final_norm]

    def lm_head_weight(self) -> torch.Tensor:
        return self._state.get(self.adapter.lm_head, self.embed_weight())

    def input_transforms(self, index: int) -> dict[str, list]:
        return {}


class QuantizedWeights:
    """``base`` with the linears named in ``layers[index]`` replaced (weight tensors, (out, in)); with
    ``act_bits``, those linears also quantize their inputs per token (after base's transforms)."""

    def __init__(self, base: WeightSource, layers: dict[int, dict[str, torch.Tensor]], act_bits: int | None = None):
        self.base, self.layers, self.act_bits = base, layers, act_bits
        self.config, self.adapter, self.num_layers = base.config, base.adapter, base.num_layers

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        state = dict(self.base.layer_state(index))
        for name, weight in self.layers.get(index, {}).items():
            state[f"{name}.weight"] = weight
        return state

    def embed_weight(self) -> torch.Tensor:
        return self.base.embed_weight()

    def final_norm_weight(self) -> torch.Tensor:
        return self.base.final_norm_weight()

    def lm_head_weight(self) -> torch.Tensor:
        return self.base.lm_head_weight()

    def input_transforms(self, index: int) -> dict[str, list]:
        return with_activation_quantizer(self.base.input_transforms(index), self.layers.get(index, {}), self.act_bits)


def with_activation_quantizer(transforms: dict[str, list], names, act_bits: int | None) -> dict[str, list]:
    """The input transforms of a layer's linears when the linears ``names`` read quantized activations:
    each one's own transforms (a rotated model's online rotation) first, then the token-wise quantizer,
    since the activations a W4A4 kernel quantizes are the ones its linear really multiplies."""
    out = {name: list(ts) for name, ts in transforms.items()}
    if act_bits is not None:
        quantizer = TokenQuantizer(act_bits)
        for name in names:
            out.setdefault(name, []).append(quantizer)
    return out
