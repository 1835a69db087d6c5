"""The pure quantization math of loaq: grid (min-max or NeUQI), RTN, damped Hessian, GPTQ, GPTAQ, Qronos,
statistics, LoaQ targets, Hadamard rotations, token-wise activation quantization.

Only torch is used here; no I/O, no pipeline code.

Convention (everywhere in this package): PyTorch's layout.
    W   (out, in)    a linear layer's weight, y = x Wᵀ
    X   (tokens, in) activations of the clean stream, X̂ those of the quantized stream
    H   (in, in)     H = X̂ᵀX̂,  C = X̂ᵀ(X − X̂)  (in, in)
    R   (in, out)    the target's right-hand side α·C·Wᵀ + β·X̂'ᵀ(s·h − ŝ·ĥ), X̂' = diag(ŝ)X̂

The paper (arXiv 2509.06297) writes W as (in, out). Its target (Algorithm 1, line 18)
    W̃ = (I + αH⁻¹C)W + βΔ,   Δ = H⁻¹X̂'ᵀ(s·h − ŝ·ĥ)
becomes in our convention ``targets.loaq_target``:
    W̃ = W + (H⁻¹R)ᵀ.
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
from .stats import (InputStats, ProjectedOutputStats, ProjectedTermStats, noa_factors, normalised_output_error,
                    projected_difference, projected_terms, summed_kl)
from .targets import MismatchProduct, lloa_rhs, loaq_target

__all__ = [
    "ColumnOrder",
    "DampedHessian",
    "GPTQResult",
    "Hadamard",
    "HadamardSizeError",
    "HessianDampingError",
    "InputStats",
    "ProjectedOutputStats",
    "ProjectedTermStats",
    "projected_difference",
    "projected_terms",
    "QuantSpec",
    "QuantizedWeight",
    "MismatchProduct",
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
    "lloa_rhs",
    "loaq_target",
    "noa_factors",
    "normalised_output_error",
    "summed_kl",
    "qronos",
    "qronos_start",
    "quantize_codes",
    "rtn",
]
