"""GPTAQ: GPTQ with asymmetric calibration (Li et al., ICML 2025, arXiv 2504.02692).

GPTQ fits the quantized layer to its own output on the quantized stream, ‖X̂(Q − W)ᵀ‖. GPTAQ fits
it to the *clean* output, ‖X̂Qᵀ − XWᵀ‖, one column at a time with the OBS machinery of GPTQ: when
the column at position j is rounded from its current value w_j to q_j, the columns after it
(F = positions > j, none of them quantized yet) absorb both the rounding error and this column's
own share of the input mismatch, w_j (X_j − X̂_j):

    ΔW_F = −(w_j − q_j) [H_{≥j}⁻¹]_{j,F} / [H_{≥j}⁻¹]_{jj}  +  α · w_j (X_j − X̂_j)ᵀ X̂_F (H_FF)⁻¹      (1)

(the paper's closed-form update in our (out, in) convention; H_FF is the damped H restricted to F).
The first term is GPTQ's. α weighs the output-approximation objective against GPTQ's: the paper
states the update with α = 1, its official code (and GPTQModel's GPTAQConfig) multiply the second
term by α, default 0.25.

With C = X̂ᵀ(X − X̂) (InputStats/OutputStats), (X_j − X̂_j)ᵀX̂_F = C[F, j]ᵀ. The efficient form
(the paper's "Cholesky reformulation"): with U the upper Cholesky factor of H⁻¹ in processing order
(UᵀU = H⁻¹, and U_FFᵀU_FF = (H_FF)⁻¹ for every trailing set F),

    A = α · triu₁(Cᵀ Uᵀ) · U,      A[j, F] = α · C[F, j]ᵀ (H_FF)⁻¹,

so the second term of (1) is A[j, F]·w_j, a rank-one update exactly like GPTQ's, and
``quant.gptq.gptq`` applies it (``feedback=A``) lazily per block alongside GPTQ's own feedback.

Differences from the official implementation, both deliberate:
* Its lazy update after each block multiplies A by the block's *quantized* columns (its W1 has
  become Q1 by then), while inside the block it uses the pre-rounding w_j; we use the pre-rounding
  w_j throughout, so the result is the column-by-column form (1) and does not depend on block_size.
  (With one block — in ≤ block_size — the two are identical.)
* Damping, dead inputs, grids and groups are this project's GPTQ's (see ``quant/gptq.py``); the
  damping is the same relative λ = percdamp · mean(diag H) as the official code's.
"""

from __future__ import annotations

import torch

from .gptq import ColumnOrder, GPTQResult, column_order, gptq
from .grid import QuantSpec
from .hessian import DampedHessian

DEFAULT_ALPHA = 0.25  # the official code's and GPTQModel's default


def asymmetric_feedback(C: torch.Tensor, order: ColumnOrder, alpha: float) -> torch.Tensor:
    """A = α · triu₁(C_πᵀ Uᵀ) U (in, in), float64, in processing order (C_π = C permuted to it)."""
    perm = order.perm.to(C.device)
    C_perm = C.to(torch.float64)[perm][:, perm]
    U = order.U.to(C_perm.device)
    return torch.triu(C_perm.T @ U.T, diagonal=1).matmul(U).mul_(float(alpha))


def gptaq(
    W: torch.Tensor,
    hessian: DampedHessian,
    C: torch.Tensor,
    spec: QuantSpec,
    *,
    alpha: float = DEFAULT_ALPHA,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQResult:
    """Quantize W (out, in) with GPTAQ: GPTQ plus the asymmetric term of (1), weighted by ``alpha``.

    C: (in, in) X̂ᵀ(X − X̂) of the same tokens as hessian's H. With C = 0 (or alpha = 0) this is
    ``gptq`` exactly. The grid is fitted on W, as in GPTQ.
    """
    n_in = W.shape[-1]
    if tuple(C.shape) != (n_in, n_in):
        raise ValueError(f"C must be ({n_in}, {n_in}), got {tuple(C.shape)}")
    if spec.is_noop or alpha == 0:
        return gptq(W, hessian, spec, block_size=block_size, act_order=act_order, static_groups=static_groups)
    order = column_order(hessian, act_order)
    feedback = asymmetric_feedback(C.to(hessian.H.device), order, alpha)
    return gptq(W, hessian, spec, block_size=block_size, act_order=act_order, static_groups=static_groups,
                order=order, feedback=feedback)
