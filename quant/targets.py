"""LoaQ quantization targets W̃ (paper Algorithm 1, line 18), in the (out, in) convention.

Paper, W as (in, out):   W̃ = (I + αH⁻¹C)W + βΔ,   Δ = H⁻¹ X̂'ᵀ(s·h − ŝ·ĥ) = H⁻¹B.
Here,  W as (out, in):   W̃ = W + α (H⁻¹ C Wᵀ)ᵀ + β (H⁻¹ B)ᵀ = W + (H⁻¹ (α C Wᵀ + β B))ᵀ.

GPTQ then quantizes W̃ against the same damped H: with α = β = 1 this solves
min ‖diag(ŝ)(ĥ + X̂Qᵀ) − diag(s)(h + XWᵀ)‖² + λ‖Q − W‖² over the grid (Lemma 1 + eq. 33).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .hessian import DampedHessian


@dataclass(frozen=True)
class TargetSpec:
    """Which target a layer is quantized towards — the method ladder of the paper:

    =============  =====  =====  ==========
    method         alpha  beta   normalized
    =============  =====  =====  ==========
    GPTQ            0      0     False
    LLOA            α      0     False       linear-layer output approximation (Sec. 3.1)
    LLOA+SOA        α      β     False       + sub-layer output approximation (Sec. 3.2), W_out only
    LoaQ            α      β     True        + normalized sub-layer output (NOA, Sec. 3.3)
    =============  =====  =====  ==========

    ``alpha`` scales the C (input-mismatch) term for every layer; ``beta`` scales the residual
    term B, which exists only for W_out. ``normalized`` means W_out's statistics are gathered with
    the RMSNorm factors s, ŝ (OutputStats with s, sq); W_in is unaffected by it. The paper tunes
    α ∈ [0, 1] in steps of 0.1 and β ∈ [0, 1] in steps of 0.05.
    """

    alpha: float = 0.0
    beta: float = 0.0
    normalized: bool = False

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"TargetSpec.{name} must be finite, got {value!r}")

    @property
    def method(self) -> str:
        if self.alpha == 0 and self.beta == 0 and not self.normalized:
            return "GPTQ"
        if self.normalized:
            return "LoaQ"
        return "LLOA+SOA" if self.beta != 0 else "LLOA"


def loaq_target(
    W: torch.Tensor,
    hessian: DampedHessian,
    C: torch.Tensor | None,
    B: torch.Tensor | None,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """W̃ = W + (H⁻¹(α C Wᵀ + β B))ᵀ for W (out, in), C (in, in), B (in, out); returns (out, in).

    H⁻¹ is the damped Hessian's (the one GPTQ uses). Computed in float64, returned in W's dtype.
    A term is skipped when its matrix is None or its coefficient is 0; with both skipped W is
    returned unchanged (a copy, bit-identical).
    """
    if W.dim() != 2:
        raise ValueError(f"W must be (out, in), got shape {tuple(W.shape)}")
    n_out, n_in = W.shape
    if hessian.n_in != n_in:
        raise ValueError(f"W has {n_in} input columns but H is {hessian.n_in}x{hessian.n_in}")
    use_c = C is not None and alpha != 0
    use_b = B is not None and beta != 0
    if not (use_c or use_b):
        return W.clone()
    if use_c and tuple(C.shape) != (n_in, n_in):
        raise ValueError(f"C must be ({n_in}, {n_in}), got {tuple(C.shape)}")
    if use_b and tuple(B.shape) != (n_in, n_out):
        raise ValueError(f"B must be ({n_in}, {n_out}) = (in, out), got {tuple(B.shape)}")

    W64 = W.to(device=hessian.H.device, dtype=torch.float64)
    if use_c and not use_b and n_out > n_in:
        # Wide W_in (q;k;v, gate;up): (H⁻¹C)Wᵀ costs in³ + in²·out against 3·in²·out for H⁻¹(CWᵀ).
        # The solve is where conditioning matters (float64); the product with W is an ordinary
        # matmul of well-scaled factors and runs in float32, ~3x faster on a CPU.
        M = hessian.solve(C.to(W64)).mul_(float(alpha)).to(torch.float32)
        correction = M @ W.to(device=M.device, dtype=torch.float32).T  # (in, out)
        return (W64 + correction.T.to(torch.float64)).to(device=W.device, dtype=W.dtype)
    # Otherwise one right-hand side (in, out) and one solve (the B term needs an (in, out) solve anyway).
    rhs = torch.zeros(n_in, n_out, dtype=torch.float64, device=W64.device)
    if use_c:
        rhs.addmm_(C.to(W64), W64.T, alpha=float(alpha))
    if use_b:
        rhs.add_(B.to(W64), alpha=float(beta))
    return shifted_target(W, hessian, rhs)


def shifted_target(W: torch.Tensor, hessian: DampedHessian, rhs: torch.Tensor | None) -> torch.Tensor:
    """W̃ = W + (H⁻¹ rhs)ᵀ for W (out, in) and rhs (in, out) = α C Wᵀ + β B, already summed
    (``ProjectedOutputStats.R``). An all-zero or missing rhs returns W unchanged (a copy)."""
    if rhs is None or not bool(rhs.any()):
        return W.clone()
    if tuple(rhs.shape) != (W.shape[1], W.shape[0]):
        raise ValueError(f"rhs must be (in, out) = {(W.shape[1], W.shape[0])}, got {tuple(rhs.shape)}")
    W64 = W.to(device=hessian.H.device, dtype=torch.float64)
    correction = hessian.solve(rhs.to(W64))  # (in, out)
    return (W64 + correction.T).to(device=W.device, dtype=W.dtype)
