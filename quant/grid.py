"""Uniform integer quantization grid: specification and parameter fitting (codes and dequantization: quant/uniform.py).

A weight row ``w`` is mapped to integer codes ``c = clamp(round(w / scale + zero), 0, maxq)`` with
``maxq = 2**bits - 1`` and reconstructed as ``scale * (c - zero)``. Min-max zero points are integers
(stored as integer-valued floats so that dequantization is one fused expression); this is what the
GPTQ / compressed-tensors export formats expect. NeUQI (``grid_init="neuqi"``, quant/neuqi.py) fits
real zero points: codes are still integers in [0, maxq] and dequantization is the same expression,
but such a grid has no integer zero point to export (only the dequantized weight can be).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .neuqi import neuqi_grid
from .uniform import dequantize, fake_quantize

# 16 bits is accepted as "do not quantize": the 16-bit sanity runs of the pipeline must give the
# unquantized model back through the very same code path.
NOOP_BITS = 16
_SUPPORTED_BITS = frozenset(range(2, 9)) | {NOOP_BITS}
GRID_INITS = ("minmax", "neuqi")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized.

    bits: 2..8, or 16 meaning "no quantization" (the weight is returned unchanged).
    symmetric: zero point fixed at the grid centre ``(maxq + 1) / 2`` instead of min-max fitted.
    group_size: input columns sharing one (scale, zero); None = one group per output channel.
    mse_clip: search a shrink factor of the min-max range per row (the GPTQ reference's ``mse``
        option) minimising ``sum |q(w) - w| ** clip_norm``; ``clip_grid`` steps of ``1/clip_grid``,
        shrinking at most by ``clip_max_shrink``.
    grid_init: how (scale, zero) are initialised: ``minmax`` (the row's range, integer zero point) or
        ``neuqi`` (quant/neuqi.py: scale searched on ``neuqi_coarse`` then ``neuqi_fine`` steps of the
        min-max scale, real zero point minimising the importance-weighted squared error).
    """

    bits: int
    symmetric: bool = False
    group_size: int | None = None
    mse_clip: bool = False
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4
    grid_init: str = "minmax"
    neuqi_coarse: int = 64
    neuqi_fine: int = 2048

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in _SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.bits must be an int in 2..8 or 16, got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"QuantSpec.group_size must be None or a positive int, got {self.group_size!r}")
        if not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise ValueError(f"QuantSpec.clip_grid must be a positive int, got {self.clip_grid!r}")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise ValueError(f"QuantSpec.clip_max_shrink must be in [0, 1), got {self.clip_max_shrink!r}")
        if not self.clip_norm > 0.0:
            raise ValueError(f"QuantSpec.clip_norm must be > 0, got {self.clip_norm!r}")
        if self.grid_init not in GRID_INITS:
            raise ValueError(f"QuantSpec.grid_init must be one of {GRID_INITS}, got {self.grid_init!r}")
        if self.grid_init == "neuqi" and self.mse_clip:
            raise ValueError("QuantSpec.mse_clip and grid_init='neuqi' both search the grid; choose one")
        if not (isinstance(self.neuqi_coarse, int) and isinstance(self.neuqi_fine, int)
                and 1 <= self.neuqi_coarse <= self.neuqi_fine):
            raise ValueError(f"QuantSpec.neuqi_coarse, neuqi_fine must be ints with 1 <= coarse <= fine, "
                             f"got {self.neuqi_coarse!r}, {self.neuqi_fine!r}")

    @property
    def maxq(self) -> int:
        """Largest integer code."""
        return 2**self.bits - 1

    @property
    def is_noop(self) -> bool:
        return self.bits == NOOP_BITS

    @property
    def uses_importance(self) -> bool:
        """Whether fitting the grid weighs columns by an importance (NeUQI: the Hessian diagonal)."""
        return self.grid_init == "neuqi" and not self.is_noop


def fit_scale_zero(w: torch.Tensor, spec: QuantSpec,
                   importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one (scale, zero) per row of ``w`` (out, k); returns two (out, 1) tensors in w's dtype.

    The min-max range always includes 0 so that exact zeros (dead inputs, padding) stay exactly zero.
    Rows that are entirely zero get the range [-1, 1]: any positive scale reproduces them exactly,
    and this avoids a 0/0 scale. ``importance`` (k,): the weight of each column's squared error in
    NeUQI's objective (the damped Hessian diagonal); None weighs all columns equally. Min-max
    ignores it. NeUQI starts from the min-max grid and keeps it where it finds nothing better.
    """
    if w.dim() != 2:
        raise ValueError(f"fit_scale_zero expects a 2-D (out, k) tensor, got shape {tuple(w.shape)}")
    if spec.is_noop:
        raise ValueError("16-bit QuantSpec means no quantization; there is no grid to fit")
    if not torch.is_floating_point(w):
        raise TypeError(f"fit_scale_zero expects a floating tensor, got {w.dtype}")
    maxq = spec.maxq
    zeros_row = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    w_min = torch.minimum(w.amin(dim=1), zeros_row)  # (out,)
    w_max = torch.maximum(w.amax(dim=1), zeros_row)  # (out,)
    if spec.symmetric:
        # Unlike the GPTQ reference we mirror the range even for non-negative rows: leaving
        # w_min = 0 there with a centred zero point would waste half of the grid.
        w_max = torch.maximum(-w_min, w_max)
        w_min = -w_max
    dead_row = (w_min == 0) & (w_max == 0)
    w_min = torch.where(dead_row, torch.full_like(w_min, -1.0), w_min)
    w_max = torch.where(dead_row, torch.full_like(w_max, 1.0), w_max)

    def scale_zero_for(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (hi - lo) / maxq
        if spec.symmetric:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
        return scale, zero

    scale, zero = scale_zero_for(w_min, w_max)
    if spec.mse_clip:
        best_err = torch.full_like(scale, float("inf"))
        for step in range(int(spec.clip_max_shrink * spec.clip_grid)):
            shrink = 1.0 - step / spec.clip_grid
            cand_scale, cand_zero = scale_zero_for(shrink * w_min, shrink * w_max)
            err = fake_quantize(w, cand_scale[:, None], cand_zero[:, None], maxq) - w
            err = err.abs_().pow_(spec.clip_norm).sum(dim=1)  # (out,)
            better = err < best_err  # strict: the unshrunk range (step 0) wins ties
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, cand_scale, scale)
            zero = torch.where(better, cand_zero, zero)
    if spec.grid_init == "neuqi":
        if importance is None:
            importance = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
        if importance.shape != (w.shape[1],):
            raise ValueError(f"importance must be ({w.shape[1]},), got {tuple(importance.shape)}")
        scale, zero = neuqi_grid(w, importance, scale, zero, maxq, spec.symmetric, spec.neuqi_coarse, spec.neuqi_fine)
    return scale[:, None], zero[:, None]


def group_index(n_in: int, group_size: int | None) -> torch.Tensor:
    """(n_in,) int32 group of each input column for contiguous groups (all 0 when per-channel)."""
    if group_size is None:
        return torch.zeros(n_in, dtype=torch.int32)
    return (torch.arange(n_in) // group_size).to(torch.int32)


@dataclass
class QuantizedWeight:
    """A quantized (out, in) weight in the GPTQ / compressed-tensors layout.

    weight: (out, in) dequantized weight, float32 (float64 if quantized from float64).
    codes:  (out, in) uint8 integer codes.
    scales: (out, n_groups) and zeros: (out, n_groups) integer-valued floats, such that
        ``weight == scales[:, g_idx] * (codes - zeros[:, g_idx])``.
    g_idx:  (in,) int32, the group of every input column in the original column order. It is
        monotone (0,0,..,1,1,..) except for GPTQ with act_order and dynamic groups.
    bits, group_size: as in the QuantSpec (group_size None = per output channel).
    For bits == 16 nothing is quantized: ``weight`` is the input and codes/scales/zeros/g_idx are None.
    """

    weight: torch.Tensor
    codes: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int | None

    @property
    def n_groups(self) -> int:
        return 0 if self.scales is None else self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """Rebuild the weight from codes, scales, zeros and g_idx (what an exporter would store)."""
        if self.codes is None:
            return self.weight.clone()
        g = self.g_idx.long()
        return dequantize(self.codes, self.scales[:, g], self.zeros[:, g])
