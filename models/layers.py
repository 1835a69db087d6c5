"""Building one decoder layer (transformers' own module) and the per-sequence context it needs.

Only one layer's weights are materialised at a time: the module is created on the meta device and
its parameters are assigned from the checkpoint's tensors for that layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .adapters import Adapter, is_sliding_layer


# A function applied to a linear's input before the linear: an online rotation of a rotated model, the
# activation quantizer of a weight-and-activation quantized stream. (..., in) -> (..., in).
InputTransform = Callable[[torch.Tensor], torch.Tensor]
INPUT_TRANSFORMS = "loaq_input_transforms"  # attribute listing a module's transforms, in order


def add_input_transform(module: nn.Module, transform: InputTransform) -> None:
    """Apply ``transform`` to the module's first positional input on every call (a forward pre-hook);
    the transforms of a module run in the order they were added."""
    module.register_forward_pre_hook(lambda _module, args: (transform(args[0]), *args[1:]))
    setattr(module, INPUT_TRANSFORMS, (*getattr(module, INPUT_TRANSFORMS, ()), transform))


def add_input_transforms(layer: nn.Module, input_transforms: Mapping[str, Sequence[InputTransform]]) -> None:
    """Each linear named in ``input_transforms`` (relative to ``layer``) gets its transforms, in order."""
    for name, transforms in input_transforms.items():
        for transform in transforms:
            add_input_transform(submodule(layer, name), transform)


def input_transforms_of(module: nn.Module) -> tuple[InputTransform, ...]:
    return getattr(module, INPUT_TRANSFORMS, ())


def with_input_transforms(replacement: nn.Module, module: nn.Module) -> nn.Module:
    """``replacement`` applying the same input transforms as ``module``: when the engine swaps a W_out
    linear for an identity to capture its input, the captured input is what the linear really sees."""
    for transform in input_transforms_of(module):
        add_input_transform(replacement, transform)
    return replacement


def build_layer(adapter: Adapter, config: PretrainedConfig, index: int, state: dict[str, torch.Tensor],
                dtype: torch.dtype, device: torch.device | str,
                input_transforms: Mapping[str, Sequence[InputTransform]] | None = None) -> nn.Module:
    """Decoder layer ``index`` with ``state``'s weights; ``input_transforms`` maps linear names (relative
    to the layer) to the transforms applied to their inputs, in order."""
    cls = adapter.resolve("decoder_layer")
    with torch.device("meta"):
        layer = cls(config, index)
    missing = set(layer.state_dict()) - set(state)
    if missing:
        raise ValueError(f"decoder layer {index}: checkpoint lacks {sorted(missing)}")
    layer.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True, strict=False)
    add_input_transforms(layer, input_transforms or {})
    return layer.eval()


def submodule(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(submodule(root, parent) if parent else root, leaf, module)


@dataclass
class SequenceContext:
    """What every layer needs for a micro-batch of sequences of one length: rotary (cos, sin)
    and the attention masks, computed exactly as the transformers model computes them."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    causal_mask: object
    sliding_mask: object

    def mask_for(self, config: PretrainedConfig, index: int):
        return self.sliding_mask if is_sliding_layer(config, index) else self.causal_mask


class ContextFactory:
    """Caches a ``SequenceContext`` per (batch, seqlen, dtype, device)."""

    def __init__(self, adapter: Adapter, config: PretrainedConfig, device: torch.device | str):
        # A config read from disk has no attention implementation set until a model is built from
        # it; pick the one transformers' models default to, so our layers compute what theirs do.
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"
        self.config = config
        self.rotary = adapter.resolve("rotary_embedding")(config=config).to(device)
        self._cache: dict[tuple, SequenceContext] = {}

    def __call__(self, hidden: torch.Tensor) -> SequenceContext:
        key = (hidden.shape[0], hidden.shape[1], hidden.dtype, hidden.device)
        if key not in self._cache:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids)
            try:
                causal = create_causal_mask(**kwargs)
            except TypeError:  # transformers < 5 calls the cache argument past_key_values
                kwargs["past_key_values"] = kwargs.pop("cache")
                causal = create_causal_mask(**kwargs)
            sliding = create_sliding_window_causal_mask(**kwargs) if getattr(self.config, "sliding_window", None) else causal
            self._cache[key] = SequenceContext(self.rotary(hidden, position_ids), causal, sliding)
        return self._cache[key]


def call_sublayer(layer: nn.Module, sub, hidden: torch.Tensor, contexts: "ContextFactory", index: int) -> torch.Tensor:
    """The sub-layer's module on Norm(hidden): phi(Norm(h) W_in) W_out (+ bias), without the
    residual add; with W_out replaced by an identity it returns the input of W_out instead."""
    x = submodule(layer, sub.norm)(hidden)
    module = submodule(layer, sub.module)
    if sub.name == "attn":
        ctx = contexts(hidden)
        return module(hidden_states=x, position_embeddings=ctx.position_embeddings,
                      attention_mask=ctx.mask_for(contexts.config, index))[0]
    return module(x)
