"""NeUQI grid initialization (quant/neuqi.py): its zero-point search against brute force, its objective
against min-max, where it must coincide with min-max, and the switch through every method, the
engine, the store keys and the export check."""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_inputs, tiny_model
from loaq.configs.load import ConfigError, load_config
from loaq.configs.schema import QuantizeConfig
from loaq.engine.model import quantize_model
from loaq.engine.sources import ModelWeights
from loaq.quant import (InputStats, QuantSpec, damp_hessian, dequantize, fake_quantize, fit_scale_zero, gptq,
                        quantize_codes, rtn)
from loaq.quant.neuqi import _binned_loss, _window_zero, neuqi_grid, optimal_zero, weighted_error
from loaq.stages.export import check_exportable
from loaq.stages.keys import chain_keys, config_identity

torch.set_num_threads(1)

NEUQI = dict(grid_init="neuqi")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def brute_force_loss(u: torch.Tensor, d: torch.Tensor, maxq: int, zs: torch.Tensor) -> torch.Tensor:
    """min over the zero points zs of Σ d (u + z − clamp(round(u + z)))², per row of u."""
    best = []
    for row in u:
        v = row[None, :] + zs[:, None]
        best.append((d * (v - v.round().clamp(0, maxq)).square()).sum(1).min())
    return torch.stack(best)


@pytest.mark.parametrize("maxq", [3, 7, 15])
def test_zero_point_search_matches_a_dense_brute_force(maxq):
    u = torch.randn(24, 40, dtype=torch.float64) * maxq / 3 + torch.rand(24, 1, dtype=torch.float64) * maxq
    d = torch.rand(40, dtype=torch.float64) + 0.05
    zero, loss = optimal_zero(u, d, maxq)
    # the reported loss is the loss of the returned zero point
    v = u + zero[:, None]
    direct = (d * (v - v.round().clamp(0, maxq)).square()).sum(1)
    torch.testing.assert_close(loss, direct, rtol=1e-10, atol=1e-12)
    # and no zero point on a grid of step 1e-3 over a range far wider than the data does better
    zs = torch.arange(-3 * maxq - 20, 3 * maxq + 20, 1e-3, dtype=torch.float64)
    assert bool((loss <= brute_force_loss(u, d, maxq, zs) + 1e-12).all())


@pytest.mark.parametrize("symmetric", [False, True])
def test_search_split_over_threads_is_the_single_threaded_search(symmetric):
    # On a CPU each thread searches its share of the rows: the grid must be the one-thread grid, bit for
    # bit, whatever the split (rows not divisible by the threads, fewer rows than threads), and the
    # caller's thread count must be left as it was.
    importance = torch.rand(96, dtype=torch.float64) ** 2 + 1e-3
    before = torch.get_num_threads()
    try:
        for rows in (37, 1):
            W = torch.randn(rows, 96) * (torch.rand(rows, 1) + 0.2)
            spec = QuantSpec(bits=3, symmetric=symmetric, grid_init="neuqi")
            grids = {}
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                grids[threads] = fit_scale_zero(W, spec, importance)
                assert torch.get_num_threads() == threads
            for threads in (2, 3):
                assert torch.equal(grids[threads][0], grids[1][0]) and torch.equal(grids[threads][1], grids[1][1])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_objective_never_above_min_max_and_clearly_below_at_low_bits(bits, group_size, symmetric):
    n_out, n_in = 48, 128
    W = torch.randn(n_out, n_in) * (torch.rand(n_out, 1) + 0.2)
    W[:, :3] *= 6  # outlier columns stretch the min-max range
    importance = torch.rand(n_in, dtype=torch.float64) ** 2 + 1e-3
    total = {}
    for init in ("minmax", "neuqi"):
        spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size, grid_init=init)
        q = rtn(W, spec, importance)
        per_row = ((q.weight.double() - W.double()).square() * importance).sum(1)
        total[init] = per_row
        if init == "minmax":
            continue
        # row by row (each group of each row), NeUQI's weighted error is at most min-max's
        size = group_size or n_in
        for g in range(n_in // size):
            cols = slice(g * size, (g + 1) * size)
            s_mm, z_mm = fit_scale_zero(W[:, cols], QuantSpec(bits=bits, symmetric=symmetric))
            s, z = fit_scale_zero(W[:, cols], spec, importance[cols])
            ours = weighted_error(W[:, cols], s, z, importance[cols], spec.maxq)
            theirs = weighted_error(W[:, cols], s_mm, z_mm, importance[cols], spec.maxq)
            assert bool((ours <= theirs).all())
            if symmetric:
                assert bool((z == spec.maxq // 2 + 1).all())  # the centre stays fixed
    ratio = float(total["neuqi"].sum() / total["minmax"].sum())
    assert ratio < {2: 0.6, 3: 0.8, 4: 0.9}[bits], ratio


@pytest.mark.parametrize("maxq", [3, 7])
def test_binned_loss_bounds_the_exact_window_minimum(maxq):
    """The binned loss is the exact window minimum raised by at most 2/bins of the steps' weight."""
    w = torch.randn(6, 80, dtype=torch.float64)
    d = torch.rand(80, dtype=torch.float64) + 0.05
    scale = torch.rand(6, 5, dtype=torch.float64) * 0.5 + 0.1
    start = torch.rand(6, 5, dtype=torch.float64) * maxq - 1.0
    _, exact = _window_zero((w[:, None, :] / scale[..., None]).flatten(0, 1), d.expand(30, -1), start.flatten(), maxq)
    zs = torch.arange(0, 2, 1e-4, dtype=torch.float64)
    brute = brute_force_loss((w[:, None, :] / scale[..., None] + start[..., None]).flatten(0, 1), d, maxq, zs)
    assert bool((exact <= brute + 1e-9).all())
    for bins in (16, 128):
        binned = _binned_loss(w, d, scale, start, maxq, bins).flatten()
        assert bool((binned >= exact - 1e-9).all())
        assert bool((binned <= exact + 2 * d.sum() / bins + 1e-9).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_binned_scale_ranking_matches_the_exact_one_on_realistic_weights(bits):
    """The default search ranks scales by the binned loss; ranking them all by the exact loss (the
    previous search) gives the same grid on most rows and never a loss lower by more than 1e-3."""
    n_out, n_in = 64, 256
    W = torch.distributions.StudentT(5.0).sample((n_out, n_in)) * torch.exp(0.3 * torch.randn(n_out, 1))
    W[:, torch.randperm(n_in)[:3]] *= 8  # a few outlier input columns
    X = correlated_inputs(512, n_in) * torch.exp(torch.randn(n_in))  # channels of log-normal scale
    importance = (X * X).sum(0).double() / 512 + 1e-2
    maxq = 2**bits - 1
    s_mm, z_mm = fit_scale_zero(W, QuantSpec(bits=bits))
    grids = {exact: neuqi_grid(W, importance, s_mm[:, 0], z_mm[:, 0], maxq, False, 64, 2048, exact=exact)
             for exact in (False, True)}
    loss = {exact: weighted_error(W, s[:, None], z[:, None], importance, maxq) for exact, (s, z) in grids.items()}
    loss_mm = weighted_error(W, s_mm, z_mm, importance, maxq)
    assert bool((loss[False] <= loss_mm).all())
    assert bool((loss[False] <= loss[True] * (1 + 1e-3)).all())
    assert float(loss[False].sum() / loss[True].sum()) < 1 + 1e-4
    same = (grids[False][0] == grids[True][0]) & (grids[False][1] == grids[True][1])
    assert float(same.double().mean()) > 0.5


def test_real_zero_points_quantize_consistently_and_integer_ones_bit_identically():
    W = torch.randn(16, 64)
    spec = QuantSpec(bits=3, grid_init="neuqi")
    scale, zero = fit_scale_zero(W, spec)
    assert not torch.equal(zero, zero.round())  # NeUQI's zero points are real
    codes = quantize_codes(W, scale, zero, spec.maxq)
    assert int(codes.max()) <= spec.maxq
    assert torch.equal(dequantize(codes, scale, zero), fake_quantize(W, scale, zero, spec.maxq))
    # with integer zero points the codes are round(w / s) + z exactly as before real ones existed,
    # including values whose quotient sits next to a rounding tie
    scale = torch.full((16, 1), 0.1)
    zero = torch.randint(0, 8, (16, 1)).float()
    near_ties = (torch.randint(-20, 20, (16, 64)) + 0.5) * 0.1 + torch.randn(16, 64) * 1e-7
    for w in (W, near_ties):
        old = torch.clamp(torch.round(w / scale) + zero, 0, 7)
        assert torch.equal(quantize_codes(w, scale, zero, 7), old.to(torch.uint8))
        assert torch.equal(fake_quantize(w, scale, zero, 7), scale * (old - zero))


def test_equal_to_min_max_where_min_max_is_exact():
    """A weight already on its min-max grid has zero error there: NeUQI keeps that grid, bit for bit."""
    scale = torch.rand(8, 1) + 0.1
    zero = torch.randint(1, 7, (8, 1)).float()
    codes = torch.randint(0, 8, (8, 40)).float()
    codes[:, 0], codes[:, 1] = 0, 7  # the range spans the grid
    W = scale * (codes - zero)
    s_mm, z_mm = fit_scale_zero(W, QuantSpec(bits=3))
    s, z = fit_scale_zero(W, QuantSpec(bits=3, grid_init="neuqi"), torch.rand(40))
    assert torch.equal(s, s_mm) and torch.equal(z, z_mm)
    assert torch.equal(fake_quantize(W, s, z, 7), fake_quantize(W, s_mm, z_mm, 7))


def test_16_bits_is_a_no_op_and_mse_clip_is_refused():
    W = torch.randn(8, 16)
    X = correlated_inputs(64, 16)
    H = X.T @ X
    assert torch.equal(gptq(W, damp_hessian(H, 0.01), QuantSpec(bits=16, grid_init="neuqi")).qweight.weight, W)
    with pytest.raises(ValueError, match="mse_clip"):
        QuantSpec(bits=3, mse_clip=True, grid_init="neuqi")
    with pytest.raises(ConfigError, match="quantize.grid_init"):
        load_config("default", ["quantize.mse_clip=true", "quantize.grid_init=neuqi"])


@pytest.mark.parametrize("group_size, act_order, static_groups", [
    (None, False, False), (16, False, False), (16, True, False), (16, True, True)])
def test_gptq_fits_its_grids_on_the_damped_hessian_diagonal(group_size, act_order, static_groups):
    X = correlated_inputs(256, 48)
    W = torch.randn(24, 48, dtype=torch.float64)
    hessian = damp_hessian(X.T @ X, 0.01)
    spec = QuantSpec(bits=2, group_size=group_size, grid_init="neuqi")
    q = gptq(W, hessian, spec, act_order=act_order, static_groups=static_groups).qweight
    assert not torch.equal(q.zeros, q.zeros.round())
    assert torch.equal(q.dequantize(), q.weight)  # codes, real zero points and weight agree
    if group_size is None or static_groups:
        # grids fixed before any feedback: exactly fit_scale_zero on W with diag(H) as the importance
        size = group_size or 48
        for g in range(48 // size):
            cols = slice(g * size, (g + 1) * size)
            scale, zero = fit_scale_zero(W[:, cols], spec, hessian.H.diagonal()[cols])
            assert torch.equal(q.scales[:, g:g + 1], scale) and torch.equal(q.zeros[:, g:g + 1], zero)
    # against the same solver on min-max grids: a lower output error at 2 bits on this data
    q_mm = gptq(W, hessian, QuantSpec(bits=2, group_size=group_size), act_order=act_order,
                static_groups=static_groups).qweight
    err = lambda Q: float(torch.linalg.norm(X @ (Q - W).T))
    assert err(q.weight) < err(q_mm.weight)


@pytest.mark.parametrize("method", ["rtn", "gptq", "loaq", "gptaq", "qronos"])
def test_every_method_uses_neuqi_grids_in_the_engine(method):
    model = tiny_model("llama")
    tokens = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    runs = {init: quantize_model(ModelWeights(model), tokens, QuantizeConfig(method=method, bits=3, grid_init=init),
                                 micro_batch=2) for init in ("minmax", "neuqi")}
    for name, q in runs["neuqi"].layers[0].weights.items():
        mm = runs["minmax"].layers[0].weights[name]
        assert torch.equal(q.dequantize(), q.weight), name
        assert not torch.equal(q.zeros, q.zeros.round()), name  # real zero points: NeUQI's grids
        assert torch.equal(mm.zeros, mm.zeros.round()), name
        assert not torch.equal(q.weight, mm.weight), name


def test_store_keys_and_export_check():
    def keys(*overrides):
        return chain_keys("root", load_config("default", list(overrides)).quantize, 2)

    for method in ("rtn", "gptq", "loaq", "gptaq", "qronos"):
        assert keys(f"quantize.method={method}", "quantize.grid_init=neuqi") != keys(f"quantize.method={method}")
        # the default leaves the keys of every stored min-max run as they were
        assert "grid_init" not in config_identity(QuantizeConfig(method=method))
        assert keys(f"quantize.method={method}", "quantize.grid_init=minmax") == keys(f"quantize.method={method}")
    with pytest.raises(ConfigError, match="quantize.grid_init=neuqi.*fake_quant"):
        check_exportable("compressed_tensors", QuantizeConfig(grid_init="neuqi"))
    check_exportable("fake_quant", QuantizeConfig(grid_init="neuqi"))
    check_exportable("compressed_tensors", QuantizeConfig(grid_init="neuqi", symmetric=True))  # zero point fixed
