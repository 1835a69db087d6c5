"""The LoaQ target W̃ (paper Algorithm 1, line 18), in the (out, in) convention.

Paper, W as (in, out):   W̃ = (I + αH⁻¹C)W + βΔ,   Δ = H⁻¹ X̂'ᵀ(s·h − ŝ·ĥ).
Here,  W as (out, in):   W̃ = W + (H⁻¹R)ᵀ,   R = α·C·Wᵀ + β·X̂'ᵀ(s·h − ŝ·ĥ)   (in, out).

``loaq_target`` is that one formula. Each term of the method ladder adds to the right-hand side R:
LLOA the input mismatch α·C·Wᵀ (eq. 8, both W_in and W_out), SOA the residual β·X̂ᵀ(h − ĥ) (eq. 10,
W_out only), NOA the per-token factors s, ŝ of the next norm (eq. 12, W_out only). W_in's R comes from
``lloa_rhs``; W_out's is summed over tokens by ``stats.ProjectedOutputStats`` (``stats.projected_difference``
forms each token's share, term by term).

GPTQ then quantizes W̃ against the same damped H: with α = β = 1 this solves
min ‖diag(ŝ)(ĥ + X̂Qᵀ) − diag(s)(h + XWᵀ)‖² + λ‖Q − W‖² over the grid (Lemma 1 + eq. 33).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hessian import DampedHessian


@dataclass(frozen=True)
class MismatchProduct:
    """R = scale·C·Wᵀ kept as its factors: for a wide W (out > in, e.g. q;k;v or gate;up) H⁻¹R is
    cheaper as (H⁻¹C)·Wᵀ, an (in, in) solve and one matmul, than as a solve against (in, out)."""

    C: torch.Tensor  # (in, in)
    scale: float
    W: torch.Tensor  # (out, in)


RightHandSide = torch.Tensor | MismatchProduct


def lloa_rhs(C: torch.Tensor | None, W: torch.Tensor, alpha: float) -> RightHandSide | None:
    """LLOA, eq. (8): R = α·C·Wᵀ (in, out) with C = X̂ᵀ(X − X̂); None when the term is off."""
    if C is None or alpha == 0:
        return None
    n_out, n_in = W.shape
    if tuple(C.shape) != (n_in, n_in):
        raise ValueError(f"C must be ({n_in}, {n_in}), got {tuple(C.shape)}")
    if n_out > n_in:
        return MismatchProduct(C, float(alpha), W)
    W64 = W.to(device=C.device, dtype=torch.float64)
    return torch.zeros(n_in, n_out, dtype=torch.float64, device=C.device).addmm_(C.to(W64), W64.T, alpha=float(alpha))


def loaq_target(W: torch.Tensor, hessian: DampedHessian, R: RightHandSide | None) -> torch.Tensor:
    """W̃ = W + (H⁻¹R)ᵀ for W (out, in) and R (in, out); returns (out, in) in W's dtype.

    H⁻¹ is the damped Hessian's (the one GPTQ uses); the solve runs in float64. A missing or all-zero
    R returns W unchanged (a copy, bit-identical).
    """
    if W.dim() != 2:
        raise ValueError(f"W must be (out, in), got shape {tuple(W.shape)}")
    n_out, n_in = W.shape
    if hessian.n_in != n_in:
        raise ValueError(f"W has {n_in} input columns but H is {hessian.n_in}x{hessian.n_in}")
    W64 = W.to(device=hessian.H.device, dtype=torch.float64)
    if isinstance(R, MismatchProduct):
        # The solve is where conditioning matters (float64); the product with W is an ordinary
        # matmul of well-scaled factors, so it runs in float32.
        M = hessian.solve(R.C.to(W64)).mul_(R.scale).to(torch.float32)
        correction = (M @ R.W.to(device=M.device, dtype=torch.float32).T).to(torch.float64)
    else:
        if R is None or not bool(R.any()):
            return W.clone()
        if tuple(R.shape) != (n_in, n_out):
            raise ValueError(f"R must be (in, out) = {(n_in, n_out)}, got {tuple(R.shape)}")
        correction = hessian.solve(R.to(W64))
    return (W64 + correction.T).to(device=W.device, dtype=W.dtype)
