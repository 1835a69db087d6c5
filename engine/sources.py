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
    """``base`` with the linears named in ``layers[index]`` replaced (weight tensors, (out, in))."""

    def __init__(self, base: WeightSource, layers: dict[int, dict[str, torch.Tensor]]):
        self.base, self.layers = base, layers
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
        return self.base.input_transforms(index)
