"""Tests of loaq.quant: grid, RTN, damping, GPTQ, streaming statistics and LoaQ targets.

Every check is a real computation on small random problems (seeded); the file runs in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from loaq.quant import (
    HessianDampingError,
    InputStats,
    MismatchProduct,
    ProjectedOutputStats,
    QuantSpec,
    damp_hessian,
    dequantize,
    fake_quantize,
    fit_scale_zero,
    gptq,
    lloa_rhs,
    loaq_target,
    projected_difference,
    quantize_codes,
    rtn,
)
from loaq.configs.schema import QuantizeConfig

from conftest import correlated_inputs

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def output_error(X: torch.Tensor, Q: torch.Tensor, W: torch.Tensor) -> float:
    """‖X(Q − W)ᵀ‖_F in float64."""
    return float(torch.linalg.norm(X.double() @ (Q.double() - W.double()).T))


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize("bad", [1, 9, 12, 32, 0, -4, 4.0, "4", True])
def test_quantspec_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bad)


def test_quantspec_rejects_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=4, group_size=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_in_range_and_dequantize_equals_fake_quantize(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    w = torch.randn(32, 200) * torch.rand(32, 1) * 3
    scale, zero = fit_scale_zero(w, spec)
    assert scale.shape == (32, 1) and zero.shape == (32, 1)
    codes = quantize_codes(w, scale, zero, spec.maxq)
    assert codes.dtype == torch.uint8
    assert int(codes.min()) >= 0 and int(codes.max()) <= spec.maxq
    # the whole grid is used: min-max puts the extremes on (or next to) the end codes
    assert int(codes.max()) >= spec.maxq - 1
    assert torch.equal(dequantize(codes, scale, zero), fake_quantize(w, scale, zero, spec.maxq))
    # rounding to nearest: error at most half a step inside the range
    err = (fake_quantize(w, scale, zero, spec.maxq) - w).abs()
    if not symmetric:
        assert bool((err <= scale / 2 * (1 + 1e-5)).all())
    # zero points are integers in [0, maxq]
    assert torch.equal(zero, zero.round())
    assert bool(((zero >= 0) & (zero <= spec.maxq)).all())


def test_symmetric_vs_asymmetric():
    spec_sym, spec_asym = QuantSpec(bits=4, symmetric=True), QuantSpec(bits=4)
    positive = torch.rand(16, 128) + 0.1  # non-negative rows: asymmetric grid fits them much better
    _, zero_sym = fit_scale_zero(positive, spec_sym)
    scale_asym, zero_asym = fit_scale_zero(positive, spec_asym)
    assert bool((zero_sym == 8).all())  # (maxq + 1) / 2
    assert bool((zero_asym == 0).all())  # range extended to include 0, so min maps to code 0
    err_sym = (rtn(positive, spec_sym).weight - positive).square().sum()
    err_asym = (rtn(positive, spec_asym).weight - positive).square().sum()
    assert err_asym < 0.5 * err_sym
    # symmetric grid: scale from max |w|, so +max and -max get the same step
    w = torch.tensor([[-3.0, 1.0, 2.0], [0.5, -0.25, 1.5]])
    scale, zero = fit_scale_zero(w, spec_sym)
    torch.testing.assert_close(scale[:, 0], torch.tensor([6.0 / 15, 3.0 / 15]))
    # 0 is always exactly representable
    zero_col = torch.zeros(2, 1)
    assert torch.equal(fake_quantize(zero_col, scale, zero, 15), zero_col)


def test_dead_rows_have_finite_grid():
    w = torch.randn(4, 64)
    w[1] = 0.0
    for spec in (QuantSpec(bits=3), QuantSpec(bits=3, symmetric=True), QuantSpec(bits=3, mse_clip=True)):
        scale, zero = fit_scale_zero(w, spec)
        assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
        q = fake_quantize(w, scale, zero, spec.maxq)
        assert torch.equal(q[1], torch.zeros(64))


def test_groupwise_g_idx_and_layout():
    W = torch.randn(24, 100)
    spec = QuantSpec(bits=4, group_size=32)  # 100 = 32 + 32 + 32 + 4: last group is short
    qw = rtn(W, spec)
    assert qw.g_idx.dtype == torch.int32
    assert qw.g_idx.tolist() == [0] * 32 + [1] * 32 + [2] * 32 + [3] * 4
    assert qw.scales.shape == (24, 4) and qw.zeros.shape == (24, 4)
    assert torch.equal(qw.dequantize(), qw.weight)
    for g, cols in enumerate([slice(0, 32), slice(32, 64), slice(64, 96), slice(96, 100)]):
        scale, zero = fit_scale_zero(W[:, cols], spec)
        assert torch.equal(qw.scales[:, g], scale[:, 0]) and torch.equal(qw.zeros[:, g], zero[:, 0])
    # smaller groups adapt to local ranges: lower error than per-channel
    err_group = (qw.weight - W).square().sum()
    err_channel = (rtn(W, QuantSpec(bits=4)).weight - W).square().sum()
    assert err_group < err_channel


def test_mse_clip_lowers_error_on_heavy_tailed_rows():
    # Student-t with 2 degrees of freedom: a few huge values stretch the min-max range
    w = torch.distributions.StudentT(2.0).sample((64, 512))
    plain, clipped = QuantSpec(bits=3), QuantSpec(bits=3, mse_clip=True)
    s0, z0 = fit_scale_zero(w, plain)
    s1, z1 = fit_scale_zero(w, clipped)
    err_p = lambda s, z, p: (fake_quantize(w, s, z, 7) - w).abs().pow(p).sum(dim=1)
    # the search includes the unshrunk range, so per row it can only improve its own criterion
    assert bool((err_p(s1, z1, 2.4) <= err_p(s0, z0, 2.4)).all())
    assert bool((s1 < s0).float().mean() > 0.5)  # most rows were actually clipped
    assert float(err_p(s1, z1, 2).sum()) < 0.9 * float(err_p(s0, z0, 2).sum())
    assert torch.equal(rtn(w, clipped).weight, fake_quantize(w, s1, z1, 7))


def test_16_bits_is_noop():
    W = torch.randn(8, 48)
    assert torch.equal(rtn(W, QuantSpec(bits=16)).weight, W)
    X = correlated_inputs(256, 48, dtype=torch.float32)
    result = gptq(W, damp_hessian(X.T @ X), QuantSpec(bits=16), act_order=True)
    torch.testing.assert_close(result.qweight.weight, W, rtol=0, atol=1e-6)
    assert result.qweight.codes is None and result.loss == 0.0


# ----------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    X = correlated_inputs(2048, 256, dtype=torch.float32)
    W = torch.randn(64, 256)
    spec = QuantSpec(bits=bits)
    hessian = damp_hessian(X.T @ X)
    err_gptq = output_error(X, gptq(W, hessian, spec).qweight.weight, W)
    err_rtn = output_error(X, rtn(W, spec).weight, W)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


def naive_gptq(W, hessian, spec, *, act_order, static_groups):
    """Column-by-column float64 GPTQ in its original OBS form: no blocks, no Cholesky.

    After quantizing column j the remaining columns get −(w_j − q_j)/[H⁻¹]_jj · [H⁻¹]_{j,:} and
    column j is eliminated from H⁻¹ (rank-one update), so H⁻¹ is always the inverse of the Hessian
    restricted to the columns not yet quantized.
    """
    W = W.double().clone()
    W[:, hessian.dead] = 0
    n_out, n_in = W.shape
    grouped = spec.group_size is not None
    gs = spec.group_size if grouped else n_in
    perm = (
        torch.argsort(hessian.H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n_in)
    )
    H_inv = torch.linalg.inv(hessian.H[perm][:, perm])
    Wp = W[:, perm].clone()
    static = {}
    if not grouped or static_groups:
        for g in range(-(-n_in // gs)):
            static[g] = fit_scale_zero(W[:, g * gs:(g + 1) * gs], spec)
    g_idx = torch.empty(n_in, dtype=torch.int32)
    loss = 0.0
    for j in range(n_in):
        if grouped and not static_groups:
            g = j // gs
            if j % gs == 0:
                scale, zero = fit_scale_zero(Wp[:, j:j + gs], spec)
        else:
            g = int(perm[j]) // gs
            scale, zero = static[g]
        g_idx[perm[j]] = g
        q = fake_quantize(Wp[:, j:j + 1], scale, zero, spec.maxq)[:, 0]
        d = H_inv[j, j]
        e = Wp[:, j] - q
        loss += float(e.square().sum() / d)
        Wp[:, j + 1:] -= torch.outer(e / d, H_inv[j, j + 1:])
        Wp[:, j] = q
        H_inv = H_inv - torch.outer(H_inv[:, j], H_inv[j, :]) / d
    return Wp[:, torch.argsort(perm)], g_idx, loss


GPTQ_CASES = {
    "per-channel": (QuantSpec(bits=3), False, False),
    "per-channel act_order sym mse": (QuantSpec(bits=3, symmetric=True, mse_clip=True, clip_grid=20), True, False),
    "groups across blocks act_order": (QuantSpec(bits=3, group_size=24), True, False),
    "groups aligned": (QuantSpec(bits=2, group_size=32), False, False),
    "static groups act_order": (QuantSpec(bits=4, group_size=16), True, True),
}


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_blocked_gptq_equals_naive_column_by_column(case):
    spec, act_order, static_groups = GPTQ_CASES[case]
    n_in, n_out = 96, 40
    X = correlated_inputs(512, n_in)
    X[:, 7] = 0.0  # a dead input
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    hessian = damp_hessian(X.T @ X)
    # block_size 32 < in = 96: three blocks, lazy updates between them are exercised
    result = gptq(W, hessian, spec, block_size=32, act_order=act_order, static_groups=static_groups)
    Q_ref, g_idx_ref, loss_ref = naive_gptq(W, hessian, spec, act_order=act_order, static_groups=static_groups)
    qw = result.qweight
    torch.testing.assert_close(qw.weight, Q_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(qw.dequantize(), qw.weight)
    assert bool((qw.weight[:, 7] == 0).all())
    if spec.group_size is not None:
        assert torch.equal(qw.g_idx, g_idx_ref)
    if static_groups or not act_order:
        assert bool((qw.g_idx[1:] >= qw.g_idx[:-1]).all())  # monotone: exportable
    assert result.loss == pytest.approx(loss_ref, rel=1e-9)


def test_gptq_loss_is_the_damped_objective_and_float32_path_is_close():
    X = correlated_inputs(1024, 128)
    W = torch.randn(48, 128, dtype=torch.float64)
    hessian = damp_hessian(X.T @ X)
    spec = QuantSpec(bits=3, group_size=32)
    r64 = gptq(W, hessian, spec, block_size=32, act_order=True)
    D = r64.qweight.weight - W
    objective = float(torch.einsum("oi,ij,oj->", D, hessian.H, D))
    assert r64.loss == pytest.approx(objective, rel=1e-9)
    assert r64.percdamp == 0.01 and r64.lam == pytest.approx(0.01 * float(torch.diagonal(X.T @ X).mean()))
    # float32 updates: a few rounding decisions may flip, the objective must stay essentially equal
    r32 = gptq(W.float(), hessian, spec, block_size=32, act_order=True)
    assert r32.qweight.weight.dtype == torch.float32
    assert r32.loss == pytest.approx(r64.loss, rel=2e-2)
    assert float((r32.qweight.codes == r64.qweight.codes).float().mean()) > 0.95


# ----------------------------------------------------------------------------- statistics


def rms_factor(y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """r(y) = (mean(y²) + eps)^-1/2 per token, the RMSNorm factor of the paper's eq. (1)."""
    return torch.rsqrt(y.square().mean(dim=-1) + eps)


def two_streams(tokens, n_in, n_out):
    X = correlated_inputs(tokens, n_in)
    Xq = X + 0.1 * torch.randn_like(X)  # the quantized stream drifted away
    h = 3 * torch.randn(tokens, n_out, dtype=torch.float64)
    hq = h + 0.2 * torch.randn_like(h)
    return X, Xq, h, hq


def output_stats(X, Xq, h, hq, s=None, sq=None):
    """The paper's W_out statistics in one shot (Algorithm 1, lines 12-16), the reference for the
    engine's streamed ones: H = X̂'ᵀX̂', C = X̂'ᵀ(X' − X̂'), B = X̂'ᵀ(s·h − ŝ·ĥ), X' = diag(s)X."""
    if s is not None:
        X, h, Xq, hq = s[:, None] * X, s[:, None] * h, sq[:, None] * Xq, sq[:, None] * hq
    return Xq.T @ Xq, Xq.T @ (X - Xq), Xq.T @ (h - hq)


def reference_target(W, H, C, B, alpha, beta):
    """W̃ = (I + αH⁻¹C)W + βH⁻¹B of Algorithm 1 line 18, written in the (out, in) convention with an
    explicit solve: W + (H⁻¹(α·C·Wᵀ + β·B))ᵀ."""
    W64 = W.double()
    return (W64 + torch.linalg.solve(H, alpha * C @ W64.T + beta * B).T).to(W.dtype)


def test_streaming_stats_equal_one_shot():
    n_in, n_out = 48, 40
    X, Xq, _, _ = two_streams(300, n_in, n_out)
    splits = [0, 37, 137, 300]  # uneven micro-batches
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        stats = InputStats(n_in, compute_dtype=dtype)
        for a, b in zip(splits[:-1], splits[1:]):
            stats.add(X[a:b], Xq[a:b])
        assert stats.n_tokens == 300 and stats.H.dtype == torch.float64
        torch.testing.assert_close(stats.H, Xq.T @ Xq, rtol=tol, atol=tol * 300)
        torch.testing.assert_close(stats.C, Xq.T @ (X - Xq), rtol=tol, atol=tol * 300)
    # 3-D (batch, seq, width) micro-batches flatten to tokens
    stats = InputStats(n_in, compute_dtype=torch.float64)
    stats.add(X[:100].reshape(4, 25, n_in), Xq[:100].reshape(4, 25, n_in))
    stats.add(X[100:], Xq[100:])
    torch.testing.assert_close(stats.C, Xq.T @ (X - Xq), rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="tokens"):
        stats.add(X[:10], Xq[:11])


# ----------------------------------------------------------------------------- targets


def ridge_lstsq(A: torch.Tensor, Y: torch.Tensor, W: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_V ‖A Vᵀ − Y‖² + λ‖V − W‖² via lstsq on the stacked system; returns V (out, in)."""
    n_in = A.shape[1]
    A_aug = torch.cat([A, math.sqrt(lam) * torch.eye(n_in, dtype=A.dtype)])
    Y_aug = torch.cat([Y, math.sqrt(lam) * W.T])
    return torch.linalg.lstsq(A_aug, Y_aug).solution.T


def test_w_in_target_is_least_squares_minimiser():
    n_in, n_out = 64, 48
    X, Xq, _, _ = two_streams(512, n_in, n_out)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    stats = InputStats(n_in, compute_dtype=torch.float64)
    stats.add(X, Xq)
    # exact least squares (no damping; 512 tokens > 64 inputs so H is positive definite)
    hessian0 = damp_hessian(stats.H, percdamp=0.0)
    target = loaq_target(W, hessian0, lloa_rhs(stats.C, W, 1.0))
    expected = torch.linalg.lstsq(Xq, X @ W.T).solution.T  # argmin ‖X̂ W̃ᵀ − X Wᵀ‖
    torch.testing.assert_close(target, expected, rtol=1e-9, atol=1e-9)
    # with the GPTQ damping, the target is the ridge solution with the same λ
    hessian = damp_hessian(stats.H, percdamp=0.01)
    target = loaq_target(W, hessian, lloa_rhs(stats.C, W, 1.0))
    torch.testing.assert_close(target, ridge_lstsq(Xq, X @ W.T, W, hessian.lam), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(target, W, atol=1e-3)
    # α interpolates linearly between W and the full correction
    half = loaq_target(W, hessian, lloa_rhs(stats.C, W, 0.5))
    torch.testing.assert_close(half, W + 0.5 * (target - W), rtol=1e-10, atol=1e-10)


def test_w_out_normalized_target_is_least_squares_minimiser():
    n_in, n_out = 64, 40
    X, Xq, h, hq = two_streams(512, n_in, n_out)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    s, sq = rms_factor(h + X @ W.T), rms_factor(hq + Xq @ W.T)
    # the engine's statistics: R = Σ X̂'ᵀD from the clean output Y, with all three terms at full strength
    stats = ProjectedOutputStats(n_in, n_out, compute_dtype=torch.float64)
    for a in range(0, 512, 128):
        b = a + 128
        D, s_hat = projected_difference(h[a:b], X[a:b] @ W.T, hq[a:b], Xq[a:b], W, None, 1.0, 1.0, 1e-6)
        stats.add(Xq[a:b], D, s_hat)
    hessian = damp_hessian(stats.H, percdamp=0.01)
    target = loaq_target(W, hessian, stats.R)
    # argmin ‖diag(ŝ)(ĥ + X̂W̃ᵀ) − diag(s)(h + XWᵀ)‖² + λ‖W̃ − W‖²
    A = sq[:, None] * Xq
    Y = s[:, None] * (h + X @ W.T) - sq[:, None] * hq
    torch.testing.assert_close(target, ridge_lstsq(A, Y, W, hessian.lam), rtol=1e-9, atol=1e-9)
    # and it really lowers the normalized sub-layer output error vs. keeping W
    residual = lambda V: torch.linalg.norm(sq[:, None] * (hq + Xq @ V.T) - s[:, None] * (h + X @ W.T))
    assert residual(target) < 0.95 * residual(W)


@pytest.mark.parametrize("alpha,beta", [(0.6, 0.3), (0.5, 0.5), (0.0, 0.4)])
@pytest.mark.parametrize("normalized", [False, True])
def test_projected_output_stats_equal_c_w_and_b_terms(normalized, alpha, beta):
    """The engine's W_out statistics need only Y = XWᵀ + b from the clean stream: with D from
    ``projected_difference`` (per micro-batch, from h, Y, ĥ, X̂), R equals α·C·Wᵀ + β·B of the full
    statistics of the paper, and the target is the same."""
    n_in, n_out, eps = 48, 32, 1e-6
    X, Xq, h, hq = two_streams(384, n_in, n_out)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    bias = torch.randn(n_out, dtype=torch.float64)
    Y, Yq = X @ W.T + bias, Xq @ W.T + bias
    s, sq = (rms_factor(h + Y, eps), rms_factor(hq + Yq, eps)) if normalized else (None, None)
    projected = ProjectedOutputStats(n_in, n_out, compute_dtype=torch.float64)
    for a in range(0, 384, 96):
        b = a + 96
        pick = lambda t: None if t is None else t[a:b]
        D, s_hat = projected_difference(h[a:b], Y[a:b], hq[a:b], Xq[a:b], W, bias, alpha, beta,
                                        eps if normalized else None)
        if normalized:
            torch.testing.assert_close(s_hat, sq[a:b], rtol=1e-12, atol=0)
        else:
            assert s_hat is None
        projected.add(Xq[a:b], D, s_hat)
    H, C, B = output_stats(X, Xq, h + bias, hq + bias, s, sq)
    torch.testing.assert_close(projected.H, H, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(projected.R, alpha * C @ W.T + beta * B, rtol=1e-10, atol=1e-9)
    hessian = damp_hessian(H.clone(), percdamp=0.01)
    torch.testing.assert_close(loaq_target(W, hessian, projected.R),
                               reference_target(W, hessian.H, C, B, alpha, beta), rtol=1e-9, atol=1e-9)


def test_zero_coefficients_return_w_exactly():
    n_in, n_out = 32, 16
    X, Xq, h, hq = two_streams(128, n_in, n_out)
    W = torch.randn(n_out, n_in)  # float32 stays float32
    H, C, B = output_stats(X, Xq, h, hq)
    hessian = damp_hessian(H)
    for R in (None, torch.zeros(n_in, n_out, dtype=torch.float64), lloa_rhs(C, W, 0.0), lloa_rhs(None, W, 1.0)):
        out = loaq_target(W, hessian, R)
        assert torch.equal(out, W) and out.dtype == W.dtype and out.data_ptr() != W.data_ptr()
    # each term alone moves W
    assert not torch.equal(loaq_target(W, hessian, lloa_rhs(C, W, 1.0)), W)
    assert not torch.equal(loaq_target(W, hessian, B), W)
    assert loaq_target(W, hessian, 0.3 * C @ W.T.double() + 0.2 * B).dtype == torch.float32


def test_method_ladder_switches_the_target_terms():
    # GPTQ < LLOA < LLOA+SOA < LoaQ (paper Table 5): each method adds one term to the target.
    coefficients = {m: QuantizeConfig(method=m, alpha_in=0.5, alpha_out=0.4, beta=0.25).alphas_beta()
                    for m in ("gptq", "lloa", "lloa_soa", "loaq")}
    assert coefficients == {"gptq": (0.0, 0.0, 0.0), "lloa": (0.5, 0.4, 0.0), "lloa_soa": (0.5, 0.4, 0.25),
                            "loaq": (0.5, 0.4, 0.25)}
    assert [QuantizeConfig(method=m).terms.noa for m in ("lloa_soa", "loaq")] == [False, True]


# ----------------------------------------------------------------------------- singular H, damping


def test_singular_hessian_quantizes_and_targets_without_nan():
    n_in, n_out = 40, 24
    X, Xq, h, hq = two_streams(256, n_in, n_out)
    X[:, 3], Xq[:, 3] = X[:, 2], Xq[:, 2]  # duplicated inputs
    Xq[:, [5, 11]] = 0.0  # never active in the quantized stream (still active in the clean one)
    X[:, 11] = 0.0
    H, C, B = output_stats(X, Xq, h, hq)
    hessian = damp_hessian(H)
    assert hessian.dead.nonzero().flatten().tolist() == [5, 11]
    assert hessian.percdamp == 0.01 and hessian.escalations == 0 and hessian.lam > 0
    W = torch.randn(n_out, n_in)
    target = loaq_target(W, hessian, C @ W.T.double() + B)
    assert bool(torch.isfinite(target).all())
    for act_order in (False, True):
        result = gptq(target, hessian, QuantSpec(bits=3, group_size=8), block_size=16, act_order=act_order)
        Q = result.qweight.weight
        assert bool(torch.isfinite(Q).all()) and math.isfinite(result.loss)
        assert bool((Q[:, [5, 11]] == 0).all())
        assert result.percdamp == hessian.percdamp and result.lam == hessian.lam


def test_damping_escalates_with_warning_on_indefinite_hessian():
    X = torch.randn(16, 32, dtype=torch.float64)  # 16 tokens < 32 inputs: rank deficient
    G = X.T @ X
    mean_diag = float(G.diagonal().mean())
    H = G - 0.05 * mean_diag * torch.eye(32, dtype=torch.float64)  # smallest eigenvalue -0.05·mean
    with pytest.warns(UserWarning, match=r"percdamp=0\.1"):
        hessian = damp_hessian(H, percdamp=0.01)
    assert hessian.percdamp == pytest.approx(0.1) and hessian.escalations == 1
    assert hessian.lam == pytest.approx(0.1 * 0.95 * mean_diag)
    torch.testing.assert_close(hessian.H, H + hessian.lam * torch.eye(32, dtype=torch.float64))
    assert bool(torch.isfinite(hessian.inverse_cholesky_upper()).all())


def test_damping_escalates_from_zero_on_exactly_singular_hessian():
    # two identical ±1 columns: the second Cholesky pivot is exactly 16 - 4·4 = 0
    col = torch.where(torch.rand(16) > 0.5, 1.0, -1.0).double()
    X = torch.cat([col[:, None], col[:, None], torch.randn(16, 6, dtype=torch.float64)], dim=1)
    with pytest.warns(UserWarning, match="escalation"):
        hessian = damp_hessian(X.T @ X, percdamp=0.0)
    assert hessian.percdamp > 0 and hessian.escalations >= 1


def test_damping_past_the_bound_raises():
    H = torch.tensor([[1.0, 5.0], [5.0, 1.0]])  # eigenvalues -4 and 6: needs λ > 4 = 4·mean(diag)
    with pytest.raises(HessianDampingError, match="percdamp"):
        damp_hessian(H, percdamp=0.01, max_percdamp=1.0)
    with pytest.raises(ValueError, match="percdamp"):
        damp_hessian(H, percdamp=2.0, max_percdamp=1.0)


@pytest.mark.parametrize("n_out", [24, 96])  # narrower and wider than n_in: both solve orders
def test_w_in_target_equals_the_formula_in_either_solve_order(n_out):
    n_in = 48
    X, Xq, _, _ = two_streams(256, n_in, 8)
    stats = InputStats(n_in, compute_dtype=torch.float64)
    stats.add(X, Xq)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    hessian = damp_hessian(stats.H, percdamp=0.01)
    expected = W + torch.linalg.solve(hessian.H, stats.C @ W.T).T * 0.7
    R = lloa_rhs(stats.C, W, 0.7)
    assert isinstance(R, MismatchProduct) == (n_out > n_in)
    # The wide order multiplies by W in float32 (the solve itself stays float64).
    tol = 1e-9 if n_out <= n_in else 1e-5
    torch.testing.assert_close(loaq_target(W, hessian, R), expected, rtol=tol, atol=tol)


def test_symmetric_gram_sum_equals_the_full_product():
    # H is accumulated from the column blocks on and above the diagonal only and mirrored when read:
    # every width (blocked or not, uneven last block) and reads between adds must give the full Σ XᵀX.
    for width in (48, 256, 300, 577):
        X = correlated_inputs(400, width, dtype=torch.float64)
        stats = InputStats(width, compute_dtype=torch.float64)
        for i, chunk in enumerate(X.split(130)):
            stats.add(None, chunk)
            if i == 1:  # a read in the middle (the mirrored part must be redone after more adds)
                torch.testing.assert_close(stats.H, X[:260].T @ X[:260], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(stats.H, X.T @ X, rtol=1e-12, atol=1e-9)
    # the W_out accumulators block their H the same way
    X = correlated_inputs(200, 300, dtype=torch.float64)
    D = torch.randn(200, 7, dtype=torch.float64)
    projected = ProjectedOutputStats(300, 7, compute_dtype=torch.float64)
    projected.add(X, D)
    torch.testing.assert_close(projected.H, X.T @ X, rtol=1e-12, atol=1e-9)


def test_single_stream_input_stats_skip_the_mismatch_term():
    # GPTQ has one stream: passing X=None must give the same H as passing X = Xq, and no C at all
    # (neither its product per micro-batch nor its (in, in) accumulator).
    X = correlated_inputs(300, 24, dtype=torch.float32)
    one, two = InputStats(24), InputStats(24)
    for chunk in X.split(100):
        one.add(None, chunk)
        two.add(chunk, chunk)
    assert one.C is None and torch.count_nonzero(two.C) == 0
    assert torch.equal(one.H, two.H) and one.n_tokens == two.n_tokens == 300
