"""Dynamic token-wise activation quantization (the A of W4A4).

Every token's vector x (the last dimension of a linear's input) gets its own asymmetric min-max grid
at run time, as in QuaRot and the LoaQ paper's W4A4 setting:

    scale = (max(x, 0) − min(x, 0)) / maxq,   zero = round(−min(x, 0) / scale),
    x̂ = scale · (clamp(round(x / scale) + zero, 0, maxq) − zero),

i.e. grid.py's min-max fit applied to each token as a row (the range includes 0, so exact zeros stay
zero; an all-zero token stays zero). Computed in float32 (float64 inputs stay float64) and returned
in the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import QuantSpec, fit_scale_zero
from .uniform import fake_quantize


@dataclass(frozen=True)
class TokenQuantizer:
    """x (..., d) -> x̂ with each token on its own ``bits``-bit min-max grid; usable as a linear's
    input transform."""

    bits: int

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"TokenQuantizer.bits must be an int in 2..8, got {self.bits!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        spec = QuantSpec(bits=self.bits)
        rows = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
        scale, zero = fit_scale_zero(rows, spec)
        return fake_quantize(rows, scale, zero, spec.maxq).to(x.dtype).reshape(x.shape)
