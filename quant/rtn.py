"""Round-to-nearest: quantize every weight independently on a min-max (or clip-searched) grid."""

from __future__ import annotations

import torch

from .grid import QuantizedWeight, QuantSpec, fit_scale_zero, group_index
from .uniform import dequantize, quantize_codes


def rtn(W: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize W (out, in) to the nearest grid point, per output channel or per column group.

    Works in float32 (float64 if W is float64). Groups are contiguous input columns; a last
    group shorter than ``group_size`` gets its own parameters. ``importance`` (in,): per-column
    weights of NeUQI's grid objective (the damped Hessian diagonal); None: equal weights.
    """
    if W.dim() != 2:
        raise ValueError(f"rtn expects a 2-D (out, in) weight, got shape {tuple(W.shape)}")
    work_dtype = torch.promote_types(W.dtype, torch.float32)
    if spec.is_noop:
        return QuantizedWeight(W.to(work_dtype).clone(), None, None, None, None, spec.bits, spec.group_size)
    W = W.to(work_dtype)
    n_out, n_in = W.shape
    group_size = spec.group_size if spec.group_size is not None else n_in
    n_groups = -(-n_in // group_size)
    scales = torch.empty(n_out, n_groups, dtype=work_dtype, device=W.device)
    zeros = torch.empty_like(scales)
    codes = torch.empty(n_out, n_in, dtype=torch.uint8, device=W.device)
    for g in range(n_groups):
        cols = slice(g * group_size, min((g + 1) * group_size, n_in))
        scale, zero = fit_scale_zero(W[:, cols], spec, None if importance is None else importance[cols])
        codes[:, cols] = quantize_codes(W[:, cols], scale, zero, spec.maxq)
        scales[:, g] = scale[:, 0]
        zeros[:, g] = zero[:, 0]
    g_idx = group_index(n_in, spec.group_size).to(W.device)
    weight = dequantize(codes, scales[:, g_idx.long()], zeros[:, g_idx.long()])
    return QuantizedWeight(weight, codes, scales, zeros, g_idx, spec.bits, spec.group_size)
