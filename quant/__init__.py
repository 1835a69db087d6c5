"""The pure quantization math of loaq: grid, RTN, damped Hessian, GPTQ, statistics, LoaQ targets.

Only torch is used here; no I/O, no pipeline code.

Convention (everywhere in this package): PyTorch's layout.
    W   (out, in)    a linear layer's weight, y = x Wᵀ
    X   (tokens, in) activations of the clean stream, X̂ those of the quantized stream
    H   (in, in)     H = X̂ᵀX̂,  C = X̂ᵀ(X − X̂)  (in, in)
    B   (in, out)    B = X̂'ᵀ(s·h − ŝ·ĥ), with X̂' = diag(ŝ)X̂ (W_out only)

The paper (arXiv 2509.06297) writes W as (in, out). Its target (Algorithm 1, line 18)
    W̃ = (I + αH⁻¹C)W + βΔ,   Δ = H⁻¹B
becomes in our convention
    W̃ = W + α (H⁻¹ C Wᵀ)ᵀ + β (H⁻¹ B)ᵀ.
"""

from .grid import (
    QuantizedWeight,
    QuantSpec,
    dequantize,
    fake_quantize,
    fit_scale_zero,
    group_index,
    quantize_codes,
)
from .gptq import GPTQResult, gptq
from .hessian import DampedHessian, HessianDampingError, damp_hessian
from .rtn import rtn
from .stats import InputStats, OutputStats, ProjectedOutputStats
from .targets import TargetSpec, loaq_target, shifted_target

__all__ = [
    "DampedHessian",
    "GPTQResult",
    "HessianDampingError",
    "InputStats",
    "OutputStats",
    "ProjectedOutputStats",
    "QuantSpec",
    "QuantizedWeight",
    "TargetSpec",
    "damp_hessian",
    "dequantize",
    "fake_quantize",
    "fit_scale_zero",
    "gptq",
    "group_index",
    "loaq_target",
    "quantize_codes",
    "rtn",
    "shifted_target",
]
