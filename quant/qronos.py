"""Qronos: correct the past, then shape the future (Zhang, Zhang, Colbert, Saab 2025, arXiv 2505.11695).

Qronos solves the mismatched problem min_Q ‖X̂Qᵀ − XWᵀ‖² (+ λ‖Q − W‖² with the damping λ), X the
clean and X̂ the quantized stream's inputs, one column at a time (its Algorithm 1, as implemented in
Brevitas' ``brevitas.graph.qronos``):

1. Correct the past. The first column in processing order, position 0, is rounded from the value
   that best fits the clean output with every other column held at W (a coordinate minimiser):
       u = W₀ + (C Wᵀ)₀ / H₀₀,      q₀ = round(u),      C = X̂ᵀ(X − X̂)
   ((C Wᵀ)₀ = X̂₀ᵀ(X − X̂)Wᵀ: how the output mismatch correlates with input 0).
2. Shape the future. The remaining columns F are set to the least-squares solution given q₀:
       V_F = W_F + H_FF⁻¹ [ (C Wᵀ)_F + H_F0 (W₀ − q₀) ].
3. Then GPTQ on the columns of F with the quantized stream's H_FF (Brevitas: the Cholesky factor
   of the Sherman–Morrison-downdated H⁻¹), i.e. GPTQ's updates from V_F on.

Steps 2-3 from step 1 are GPTQ started from a corrected weight V⁰ (one GPTQ step from V⁰ at
position 0 gives exactly step 2, since W₀ − q₀ = (u − q₀) − (C Wᵀ)₀/H₀₀):

    V⁰₀ = u,      V⁰_F = W_F + H_FF⁻¹ [ (C Wᵀ)_F − H_F0 (C Wᵀ)₀ / H₀₀ ],                       (1)

so ``qronos`` forms V⁰ and hands it to ``quant.gptq.gptq`` (block-lazy updates and all) with the
same damped H and the same processing order. H_FF⁻¹ = U_FFᵀU_FF with GPTQ's factor U, so (1)
costs two triangular products. With C = 0, V⁰ = W and this is GPTQ exactly.

Qronos in Brevitas also restarts the clean stream at every decoder layer (block-wise calibration
runs the float block on the quantized block input), so X − X̂ holds only the current layer's own
error; that is the engine's ``clean_stream_reset`` (configs/schema.py), not part of this function.

Differences from Brevitas, deliberate: H is this project's DampedHessian (λ = percdamp ·
mean(diag H) as in GPTQ, where Brevitas uses 1e-6 times the largest eigenvalue), and step 1 divides
by the damped H₀₀ so that u is the coordinate minimiser of the same damped objective; the grid is
fitted once on V⁰ (per channel) or per group when its first column is reached, as GPTQ does here,
where Brevitas' quantizer re-reads the current weights.
"""

from __future__ import annotations

import torch

from .gptq import ColumnOrder, GPTQResult, column_order, gptq
from .grid import QuantSpec
from .hessian import DampedHessian


def qronos_start(W: torch.Tensor, hessian: DampedHessian, C: torch.Tensor, order: ColumnOrder) -> torch.Tensor:
    """V⁰ (out, in) of (1): W with the first processed column corrected and the rest re-fitted.

    Computed in float64, returned in W's dtype; C = 0 returns W unchanged (bit-identical copy).
    """
    n_out, n_in = W.shape
    if tuple(C.shape) != (n_in, n_in):
        raise ValueError(f"C must be ({n_in}, {n_in}), got {tuple(C.shape)}")
    dev = hessian.H.device
    perm = order.perm.to(dev)
    W64 = W.to(device=dev, dtype=torch.float64)
    H = hessian.H[perm][:, perm]
    R = C.to(device=dev, dtype=torch.float64)[perm][:, perm] @ W64[:, perm].T  # (in, out): C Wᵀ, processing order
    shift = torch.empty_like(R)
    shift[0] = R[0] / H[0, 0]
    U_F = order.U.to(dev)[1:, 1:]  # U_FFᵀ U_FF = H_FF⁻¹
    rhs = R[1:] - torch.outer(H[1:, 0], shift[0])
    shift[1:] = U_F.T @ (U_F @ rhs)
    correction = shift[torch.argsort(perm)].T  # (out, in), original column order
    return (W64 + correction).to(device=W.device, dtype=W.dtype)


def qronos(
    W: torch.Tensor,
    hessian: DampedHessian,
    C: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQResult:
    """Quantize W (out, in) with Qronos: GPTQ from the corrected start V⁰ of (1).

    C: (in, in) X̂ᵀ(X − X̂) of the same tokens as hessian's H. ``loss`` is GPTQ's from V⁰.
    """
    if spec.is_noop:
        return gptq(W, hessian, spec, block_size=block_size, act_order=act_order, static_groups=static_groups)
    order = column_order(hessian, act_order)
    start = qronos_start(W, hessian, C, order)
    return gptq(start, hessian, spec, block_size=block_size, act_order=act_order, static_groups=static_groups,
                order=order)
