"""A model rotated by Hadamard matrices (QuaRot): the same function, with weights and activations
that quantize better (rotations spread outlier channels over all channels).

In the row-vector convention of this code (h: (..., d), W: (out, in), y = x W^T):

* every RMSNorm's weight g is folded into the linears that read it (W_in <- W_in diag(g); the final
  norm's into the head) and set to 1, so the norm commutes with any orthogonal Q: rms(h Q) = rms(h);
* the residual stream is rotated, h' = h Q with Q = D H / sqrt(d) a randomised Hadamard matrix:
  embedding E <- E Q, every linear reading the stream W_in <- W_in Q, every linear writing into it
  W_out <- Q^T W_out (and its bias b <- b Q), the head <- head diag(g) Q;
* down_proj's input x is rotated online by H_d (a forward pre-hook, ``input_transforms``) and its
  weight folds H_d in: (x H_d)(W H_d)^T = x W^T.

Everything else is unchanged: Qwen2's q/k/v biases are added after q/k/v (output side), Qwen3's
q_norm/k_norm act per head on q/k's outputs. Tied embeddings become untied (E Q != head diag(g) Q).

A wrapper over any weight source, streaming: each layer is rotated when it is asked for, nothing of
the model is kept. Folds are computed in float64 and cast back to the source's dtype.
"""

from __future__ import annotations

import copy

import torch

from loaq.models.checkpoint import CheckpointError
from loaq.quant.hadamard import Hadamard, HadamardSizeError

from .sources import WeightSource

#: Elements of float64 work per block when rotating a weight (rows at a time): bounds the memory
#: a fold needs beside the weight itself (a 128k x 8192 embedding is done in blocks).
BLOCK_ELEMENTS = 1 << 24


def _rotation(n: int, field: str, seed: int | None) -> Hadamard:
    try:
        return Hadamard(n, seed)
    except HadamardSizeError as e:
        raise HadamardSizeError(f"{field}: {e}") from None


def rotate_rows(W: torch.Tensor, fn, dtype: torch.dtype | None = None) -> torch.Tensor:
    """fn applied to the rows of W (..., in), in float64 blocks; result in ``dtype`` (default W's)."""
    flat = W.reshape(-1, W.shape[-1])
    out = torch.empty(flat.shape, dtype=dtype or W.dtype)
    rows = max(1, BLOCK_ELEMENTS // max(flat.shape[1], 1))
    for start in range(0, flat.shape[0], rows):
        out[start:start + rows] = fn(flat[start:start + rows].to(torch.float64)).to(out.dtype)
    return out.reshape(W.shape)


def rotate_columns(W: torch.Tensor, fn, dtype: torch.dtype | None = None) -> torch.Tensor:
    """fn applied to the columns of W (out, in): fn(W^T)^T."""
    return rotate_rows(W.T, fn, dtype).T.contiguous()


class RotatedWeights:
    """``base`` (any ``WeightSource``) rotated: the same model function to floating-point accuracy."""

    def __init__(self, base: WeightSource, seed: int = 0):
        self.base, self.seed = base, seed
        self.adapter, self.num_layers = base.adapter, base.num_layers
        self.config = copy.deepcopy(base.config)
        self.config.tie_word_embeddings = False
        self.residual = _rotation(int(self.config.hidden_size), "hidden_size", seed)
        self.down = _rotation(int(self.config.intermediate_size), "intermediate_size", None)
        self.online = self.adapter.sublayers[-1].w_out  # down_proj: reads the MLP's activations

    # -- the residual stream's two ends ------------------------------------------------------------
    def embed_weight(self) -> torch.Tensor:
        return rotate_rows(self.base.embed_weight(), self.residual.apply)

    def final_norm_weight(self) -> torch.Tensor:
        return torch.ones_like(self.base.final_norm_weight())

    def lm_head_weight(self) -> torch.Tensor:
        g = self.base.final_norm_weight().to(torch.float64)
        return rotate_rows(self.base.lm_head_weight(), lambda w: self.residual.apply(w * g))

    # -- decoder layers ----------------------------------------------------------------------------
    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        state = dict(self.base.layer_state(index))
        Q = self.residual.apply
        for sub in self.adapter.sublayers:
            g = state[f"{sub.norm}.weight"].to(torch.float64)
            for name in sub.w_in:  # (x/rms) diag(g) W^T = ((x Q)/rms) (W diag(g) Q)^T
                state[f"{name}.weight"] = rotate_rows(state[f"{name}.weight"], lambda w: Q(w * g))
            state[f"{sub.norm}.weight"] = torch.ones_like(state[f"{sub.norm}.weight"])
            W = state[f"{sub.w_out}.weight"]
            if sub.w_out == self.online:  # Q^T (W H_d): the H_d fold in float32 or better, then Q^T
                W = rotate_rows(W, self.down.apply, torch.promote_types(W.dtype, torch.float32))
            state[f"{sub.w_out}.weight"] = rotate_columns(W, Q, state[f"{sub.w_out}.weight"].dtype)
            if f"{sub.w_out}.bias" in state:
                state[f"{sub.w_out}.bias"] = rotate_rows(state[f"{sub.w_out}.bias"], Q)
        return state

    def input_transforms(self, index: int) -> dict[str, list]:
        if self.base.input_transforms(index):
            raise ValueError("rotating a model whose linears already transform their inputs is not supported")
        return {self.online: [self.online_hadamard]}

    def online_hadamard(self, x: torch.Tensor) -> torch.Tensor:
        """x H_d on down_proj's input, in float32 at least (a bfloat16 butterfly would lose digits)."""
        return self.down.apply(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)

    def fold_input_transforms(self, index: int, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The weight that reads the linear's untransformed input: W H_d^T (exact in floating point),
        for a checkpoint without online transforms."""
        if name != self.online:
            return weight
        return rotate_rows(weight, lambda w: self.down.apply(w, transpose=True))

    # -- the checkpoint's other questions (the pipeline opens a model as one object) ---------------
    @property
    def path(self):
        return self.base.path

    def tokenizer(self):
        return self.base.tokenizer()

    def tensor_names(self) -> list[str]:
        names = list(self.base.tensor_names())
        return names if self.adapter.lm_head in names else [*names, self.adapter.lm_head]

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor outside the decoder layers, rotated (embedding, final norm, head)."""
        ends = {self.adapter.embed: self.embed_weight, self.adapter.final_norm: self.final_norm_weight,
                self.adapter.lm_head: self.lm_head_weight}
        if name not in ends:
            raise CheckpointError(f"tensor {name!r} has no rotated form (the rotation knows {', '.join(ends)})")
        return ends[name]()
