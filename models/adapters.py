"""Model families described as data.

A decoder layer is two sub-layers, each ``Norm(h) -> W_in -> phi -> W_out -> + h`` (paper, eq. 5-6).
An adapter names, for one transformers family, the modules that play each role; the forward passes
themselves are transformers' own modules (attention, rotary embeddings, MLP), never re-implemented.
A new family is one more ``Adapter(...)`` entry in ``ADAPTERS``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class SubLayer:
    """One sub-layer of a decoder layer (names relative to the decoder layer module)."""

    name: str  # "attn" | "mlp": also the prefix of this sub-layer's records
    norm: str  # the RMSNorm in front of it
    module: str  # the module computing phi(Norm(h) W_in) W_out (attention or MLP)
    w_in: tuple[str, ...]  # linears that read Norm(h): they share one Hessian and are quantized stacked
    w_out: str  # the linear that writes back into the residual stream


@dataclass(frozen=True)
class Adapter:
    family: str  # config.model_type
    modeling_module: str  # transformers module holding the classes below
    decoder_layer: str
    rotary_embedding: str
    sublayers: tuple[SubLayer, ...]
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer_prefix: str = "model.layers.{index}."

    def resolve(self, class_attr: str):
        module = importlib.import_module(self.modeling_module)
        return getattr(module, getattr(self, class_attr))

    def linear_names(self) -> tuple[str, ...]:
        """Every quantized linear of a decoder layer, in true-sequential order."""
        return tuple(n for s in self.sublayers for n in (*s.w_in, s.w_out))


_LLAMA_LIKE_SUBLAYERS = (
    SubLayer("attn", "input_layernorm", "self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj"),
    SubLayer("mlp", "post_attention_layernorm", "mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
)


def _family(family: str, prefix: str) -> Adapter:
    return Adapter(
        family=family,
        modeling_module=f"transformers.models.{family}.modeling_{family}",
        decoder_layer=f"{prefix}DecoderLayer",
        rotary_embedding=f"{prefix}RotaryEmbedding",
        sublayers=_LLAMA_LIKE_SUBLAYERS,
    )


# Qwen2's q/k/v biases and Qwen3's q_norm/k_norm live inside transformers' attention modules, so the
# four families share one layout; biases stay in full precision (only weights are quantized).
ADAPTERS: dict[str, Adapter] = {
    "llama": _family("llama", "Llama"),
    "mistral": _family("mistral", "Mistral"),
    "qwen2": _family("qwen2", "Qwen2"),
    "qwen3": _family("qwen3", "Qwen3"),
}


class UnsupportedArchitecture(ValueError):
    pass


def adapter_for(config: PretrainedConfig) -> Adapter:
    family = getattr(config, "model_type", None)
    if family not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"unsupported architecture {family!r} ({', '.join(getattr(config, 'architectures', None) or [])}); "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[family]


def is_sliding_layer(config: PretrainedConfig, index: int) -> bool:
    """Whether decoder layer ``index`` attends through a sliding window (Mistral, Qwen2 with SWA)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[index] == "sliding_attention"
    return config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None
