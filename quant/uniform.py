"""The uniform grid's arithmetic: integer codes, dequantization, fake quantization.

Codes ``c = clamp(round(w / scale + zero), 0, maxq)``, reconstruction ``scale * (c - zero)``. Kept
apart from the grid's fitting (quant/grid.py) so that every fitter (min-max, NeUQI) can use it.
"""

from __future__ import annotations

import torch


def split_zero(zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero point's integer part and fraction. The integer part is added after rounding: for an
    integer zero point the codes are then exactly round(w / scale) + zero, whereas adding it before
    rounding could move a value by one ulp onto a rounding tie."""
    whole = torch.floor(zero)
    return whole, zero - whole


def round_shifted_(shifted: torch.Tensor, zero_whole: torch.Tensor, maxq: int) -> torch.Tensor:
    """clamp(round(shifted) + zero_whole, 0, maxq) in place, for shifted = w / scale + the zero point's
    fraction (``split_zero``): the codes as floats. In place so that a caller quantizing one column at
    a time (GPTQ) spends no allocation on it."""
    return shifted.round_().add_(zero_whole).clamp_(0, maxq)


def _rounded(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """clamp(round(w / scale + zero), 0, maxq) as floats, the zero point split as ``split_zero`` says."""
    whole, fraction = split_zero(zero)
    return round_shifted_(w / scale + fraction, whole, maxq)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq] as uint8 (maxq <= 255). ``scale``/``zero`` broadcast against ``w``."""
    if maxq > 255:
        raise ValueError(f"codes are stored as uint8, maxq={maxq} does not fit")
    return _rounded(w, scale, zero, maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (codes - zero)`` in the dtype of ``scale``."""
    return scale * (codes.to(scale.dtype) - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize and dequantize in one go; bit-identical to ``dequantize(quantize_codes(...))``."""
    return scale * (_rounded(w, scale, zero, maxq) - zero)
