"""The pure quantization math of loaq: grid (min-max or NeUQI), RTN, damped Hessian, GPTQ, GPTAQ, Qronos,
statistics, LoaQ targets, Hadamard rotations, token-wise activation quantization.

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

from .grid import QuantizedWeight, QuantSpec, fit_scale_zero, group_index
from .uniform import dequantize, fake_quantize, quantize_codes
from .activations import TokenQuantizer
from .gptaq import asymmetric_feedback, gptaq
from .gptq import ColumnOrder, GPTQResult, column_order, gptq
from .hadamard import Hadamard, HadamardSizeError
from .hessian import DampedHessian, HessianDampingError, damp_hessian
from .qronos import qronos, qronos_start
from .rtn import rtn
from .stats import InputStats, OutputStats, ProjectedOutputStats, projected_difference
from .targets import TargetSpec, loaq_target, shifted_target

__all__ = [
    "ColumnOrder",
    "DampedHessian",
    "GPTQResult",
    "Hadamard",
    "HadamardSizeError",
    "HessianDampingError",
    "InputStats",
    "OutputStats",
    "ProjectedOutputStats",
    "projected_difference",
    "QuantSpec",
    "QuantizedWeight",
    "TargetSpec",
    "TokenQuantizer",
    "asymmetric_feedback",
    "column_order",
    "damp_hessian",
    "dequantize",
    "fake_quantize",
    "fit_scale_zero",
    "gptaq",
    "gptq",
    "group_index",
    "loaq_target",
    "qronos",
    "qronos_start",
    "quantize_codes",
    "rtn",
    "shifted_target",
]
