"""GPTQ: column-by-column quantization with second-order error feedback (Frantar et al. 2023).

Minimises ‖X̂(Q − W)‖² + λ‖Q − W‖² = tr((Q − W) H (Q − W)ᵀ) with H the damped Hessian
(paper Appendix B.1): columns are quantized in order, and each column's rounding error is pushed
onto the not-yet-quantized columns through the upper Cholesky factor U of H⁻¹ (UᵀU = H⁻¹).
The updates are applied lazily: inside a block of ``block_size`` columns immediately, to the
columns after the block in one matrix product when the block is done (same result, BLAS-3).

Differences from the reference implementation (IST-DASLab/gptq), all deliberate:
* We work on Wᵀ (in, out) so that a column of W is a contiguous row.
* Dead columns are zeroed *before* the per-channel grid is fitted (they cannot affect the
  output, so they should not widen the range).
* Dynamic groups are fitted on the group's columns as they stand when its first column is
  reached, *including* the pending in-block feedback; the reference reads the lazily updated
  global W there, which misses that feedback when a group starts in the middle of a block.
  When groups are aligned to blocks (e.g. 128/128) both are the same.
* U comes from DampedHessian.inverse_cholesky_upper (one Cholesky of the reversed-order H and a
  triangular inverse) rather than Cholesky → cholesky_inverse → Cholesky; same U.
* NeUQI grids (``spec.grid_init``) weigh each column's error by the damped Hessian's diagonal, the
  same H the solver minimises against; a dynamic group sees the diagonal of its columns as they are
  processed (after act-order).
* On CPU the column-by-column part runs on one thread (see ``_single_threaded_if_cpu``).
* ``loss`` is the exact damped objective tr((Q − W)H(Q − W)ᵀ) = Σ ((w − q)/U_jj)², not half of it:
  the LDLQ update makes W − Q = E·U with E the scaled errors, and U H Uᵀ = I, so this sum is
  the objective itself (in the units of H = Σ X̂ᵀX̂), not an estimate.

Two hooks let the baselines that correct the input mismatch X − X̂ reuse this loop unchanged
(``quant/gptaq.py``, ``quant/qronos.py``): ``order`` passes a precomputed processing order and
factor U (so a caller that needs U as well factors H once), and ``feedback`` adds a second
error-feedback term, A[j, k]·w_j onto each later column k once column j (pre-rounding value w_j)
is quantized, applied lazily like the GPTQ term. Without them the loop is exactly GPTQ.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .grid import QuantizedWeight, QuantSpec, fit_scale_zero
from .hessian import DampedHessian
from .uniform import dequantize, round_shifted_, split_zero


@contextlib.contextmanager
def _single_threaded_if_cpu(device: torch.device):
    """Run the column-by-column part on one CPU thread, restoring the setting afterwards.

    Each column is a dozen tiny ops on an (out,) vector. With several intra-op threads torch
    fans some of them out over OpenMP, and on a loaded machine each fan-out waits for a
    descheduled thread, so the loop costs more than the BLAS-3 work (``bench/README.md``).
    The big lazy block update stays multi-threaded.
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class ColumnOrder:
    """The order columns are quantized in and GPTQ's factor in that order.

    perm: (in,) processing position -> input column (identity without act_order).
    U: (in, in) float64 upper-triangular with UᵀU = (P H Pᵀ)⁻¹. For the trailing positions F = {j, j+1, ...}
        U[F, F]ᵀU[F, F] = ((P H Pᵀ)[F, F])⁻¹: the inverse of H restricted to the not-yet-quantized
        columns, which is what every error-feedback step solves with.
    """

    perm: torch.Tensor
    U: torch.Tensor
    act_order: bool


def column_order(hessian: DampedHessian, act_order: bool = False) -> ColumnOrder:
    """Processing order (descending diag(H) with ``act_order``, ties in original order) and its factor U."""
    device = hessian.H.device
    if act_order:
        perm = torch.argsort(hessian.H.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(hessian.n_in, device=device)
    return ColumnOrder(perm, hessian.inverse_cholesky_upper(perm if act_order else None), act_order)


@dataclass
class GPTQResult:
    """qweight: the quantized weight; loss: tr((Q − W)H(Q − W)ᵀ) with the damped H, W after
    dead-column zeroing; percdamp, lam: the damping actually used (from the DampedHessian)."""

    qweight: QuantizedWeight
    loss: float
    percdamp: float
    lam: float


def gptq(
    W: torch.Tensor,
    hessian: DampedHessian,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    order: ColumnOrder | None = None,
    feedback: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize W (out, in) against the damped Hessian (in, in).

    act_order: process columns by descending diag(H) (ties keep the original order).
    static_groups: fit every group's grid upfront on the original W and column order, so g_idx is
        monotone even with act_order (needed for most export formats); otherwise each group is
        fitted when its first column (in processing order) is reached.
    order: ``column_order(hessian, act_order)`` if the caller already has it (computed otherwise).
    feedback: (in, in) strictly upper-triangular A in *processing* order: quantizing the column at
        position j also adds A[j, k]·w_j to every later position k, w_j being the column's value
        just before rounding (GPTAQ's asymmetric term). None: plain GPTQ.
    Weight updates run in float32 (float64 if W is float64); H⁻¹ and its Cholesky factor are
    computed in float64 and cast once.
    """
    if W.dim() != 2:
        raise ValueError(f"gptq expects a 2-D (out, in) weight, got shape {tuple(W.shape)}")
    n_out, n_in = W.shape
    if hessian.n_in != n_in:
        raise ValueError(f"W has {n_in} input columns but H is {hessian.n_in}x{hessian.n_in}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if order is not None and order.act_order != act_order:
        raise ValueError(f"order was computed with act_order={order.act_order}, called with act_order={act_order}")
    if feedback is not None and tuple(feedback.shape) != (n_in, n_in):
        raise ValueError(f"feedback must be ({n_in}, {n_in}), got {tuple(feedback.shape)}")
    work_dtype = torch.promote_types(W.dtype, torch.float32)
    device = W.device
    if spec.is_noop:
        weight = W.to(work_dtype).clone()
        return GPTQResult(
            QuantizedWeight(weight, None, None, None, None, spec.bits, spec.group_size),
            loss=0.0, percdamp=hessian.percdamp, lam=hessian.lam,
        )

    maxq = spec.maxq
    W = W.to(work_dtype).clone()
    dead = hessian.dead.to(device)
    W[:, dead] = 0  # the loss does not see dead inputs; 0 keeps them exactly 0 after quantization

    grouped = spec.group_size is not None and spec.group_size < n_in
    group_size = spec.group_size if grouped else n_in
    n_groups = -(-n_in // group_size)
    dynamic_groups = grouped and not static_groups

    if order is None:
        order = column_order(hessian, act_order)
    perm = order.perm.to(device)
    # NeUQI weighs each column's squared error by diag(H), the damped H this solve minimises against.
    importance = hessian.H.diagonal().to(device) if spec.uses_importance else None

    def columns_importance(columns: torch.Tensor | slice) -> torch.Tensor | None:
        return None if importance is None else importance[columns]

    scales = torch.empty(n_out, n_groups, dtype=work_dtype, device=device)
    zeros = torch.empty_like(scales)
    if dynamic_groups:
        # group of each processing position: groups are consecutive in processing order
        group_at_position = torch.arange(n_in, device=device) // group_size
    else:
        # grids fixed before any feedback, on the original column order
        for g in range(n_groups):
            columns = slice(g * group_size, (g + 1) * group_size)
            scale, zero = fit_scale_zero(W[:, columns], spec, columns_importance(columns))
            scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
        group_at_position = perm // group_size

    # U: (in, in) upper, UᵀU = (P H Pᵀ)⁻¹ in processing order; float64 factor, cast once.
    U = order.U.to(device=device, dtype=work_dtype)
    A = None if feedback is None else feedback.to(device=device, dtype=work_dtype)
    Wt = W.T[perm].contiguous()  # (in, out) in processing order; rows become Q as we go
    codes_t = torch.empty(n_in, n_out, dtype=torch.uint8, device=device)
    group_list = group_at_position.tolist()
    loss = 0.0

    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        block = Wt[i1:i2]  # (count, out) view
        U_block = U[i1:i2, i1:i2]
        # 1 / U_jj is not precomputed: dividing by U_jj is what the reference does, bit for bit
        U_diagonal = U_block.diagonal().tolist()
        err_block = torch.zeros(i2 - i1, n_out, dtype=work_dtype, device=device)  # scaled errors E
        # the block's codes as floats (exact small integers), cast to uint8 once per block
        code_block = torch.empty_like(err_block)
        # with feedback: the block's columns just before rounding, for the lazy A term
        pre_block = None if A is None else torch.empty_like(err_block)
        current_group = -1
        with _single_threaded_if_cpu(device):
            for i in range(i2 - i1):
                j = i1 + i
                g = group_list[j]
                if dynamic_groups and j % group_size == 0:
                    end = min(j + group_size, n_in)
                    group_cols = block[i:min(end, i2) - i1]  # (k, out) with all feedback so far
                    if end > i2:
                        # The group reaches past this block: add the feedback of this block's
                        # quantized columns that the lazy update has not applied there yet.
                        beyond = Wt[i2:end] - U[i1:j, i2:end].T @ err_block[:i]
                        if A is not None:
                            beyond += A[i1:j, i2:end].T @ pre_block[:i]
                        group_cols = torch.cat([group_cols, beyond], dim=0)
                    scale, zero = fit_scale_zero(group_cols.T, spec, columns_importance(perm[j:end]))
                    scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
                if g != current_group:
                    scale_g, zero_g = scales[:, g], zeros[:, g]  # (out,)
                    zero_whole, zero_fraction = split_zero(zero_g)  # once per group, not per column
                    current_group = g
                w = block[i]  # (out,)
                # The column's codes as quantize_codes computes them, written in place into the block's
                # float code buffer: this loop runs once per input column.
                code = round_shifted_(torch.div(w, scale_g, out=code_block[i]).add_(zero_fraction), zero_whole, maxq)
                q = dequantize(code, scale_g, zero_g)
                err = torch.sub(w, q, out=err_block[i]).div_(U_diagonal[i])
                # feedback onto the later columns of this block: row k -= U[i, k] · err
                block[i + 1:].addr_(U_block[i, i + 1:], err, alpha=-1.0)
                if A is not None:
                    block[i + 1:].addr_(A[j, j + 1:i2], w)
                    pre_block[i] = w
                w.copy_(q)
        codes_t[i1:i2] = code_block.to(torch.uint8)
        # lazy feedback onto every column after the block in one product
        Wt[i2:].addmm_(U[i1:i2, i2:].T, err_block, alpha=-1.0)
        if A is not None:
            Wt[i2:].addmm_(A[i1:i2, i2:].T, pre_block)
        loss += float(err_block.square().sum(dtype=torch.float64))

    inverse_perm = torch.argsort(perm)
    weight = Wt[inverse_perm].T.contiguous()  # (out, in)
    codes_out = codes_t[inverse_perm].T.contiguous()  # (out, in)
    g_idx = torch.empty(n_in, dtype=torch.int32, device=device)
    g_idx[perm] = group_at_position.to(torch.int32)
    qweight = QuantizedWeight(weight, codes_out, scales, zeros, g_idx, spec.bits, spec.group_size)
    return GPTQResult(qweight, loss=loss, percdamp=hessian.percdamp, lam=hessian.lam)
