"""The paper's baselines GPTAQ and Qronos: their defining properties on random data, in the engine,
through the pipeline, and in the store keys."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from flowkit import make_checkpoint, run_cli, run_id, write_config
from loaq.configs.load import load_config
from loaq.configs.schema import QuantizeConfig
from loaq.engine.arrays import MemoryArray
from loaq.engine.forward import stream_forward
from loaq.engine.metrics import stream_divergence
from loaq.engine.model import quantize_model
from loaq.engine.sources import ModelWeights
from loaq.quant import (InputStats, QuantSpec, asymmetric_feedback, column_order, damp_hessian, fake_quantize,
                        fit_scale_zero, gptaq, gptq, qronos, qronos_start, rtn)
from loaq.stages.keys import chain_keys, config_identity
from loaq.store import Store

from conftest import correlated_inputs

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mismatched_streams(tokens: int, n_in: int, bits: int = 3):
    """X, X̂ (tokens, in) as the outputs of a previous linear layer, full-precision and RTN-quantized:
    the mismatch X − X̂ is correlated with X, as in a real model."""
    S = correlated_inputs(tokens, n_in)
    A = torch.randn(n_in, n_in, dtype=torch.float64) / math.sqrt(n_in)
    A_hat = rtn(A, QuantSpec(bits=bits)).weight
    return S @ A.T, S @ A_hat.T


def statistics(X: torch.Tensor, Xq: torch.Tensor):
    stats = InputStats(X.shape[1], compute_dtype=torch.float64)
    stats.add(X, Xq)
    return stats.H, stats.C


def clean_output_error(X, Xq, Q, W) -> float:
    """‖X̂Qᵀ − XWᵀ‖_F, the error against the clean output."""
    return float(torch.linalg.norm(Xq @ Q.double().T - X @ W.double().T))


# ----------------------------------------------------------------------------- reduction to GPTQ

ZERO_MISMATCH_CASES = {
    "per-channel float32": (QuantSpec(bits=3), False, False, torch.float32),
    "per-channel float64 act_order": (QuantSpec(bits=2), True, False, torch.float64),
    "groups across blocks act_order": (QuantSpec(bits=3, group_size=24), True, False, torch.float64),
    "static groups act_order sym": (QuantSpec(bits=4, group_size=16, symmetric=True), True, True, torch.float32),
}


@pytest.mark.parametrize("case", list(ZERO_MISMATCH_CASES))
@pytest.mark.parametrize("method", ["gptaq", "qronos"])
def test_with_clean_equal_to_quantized_inputs_each_is_gptq_exactly(method, case):
    spec, act_order, static_groups, dtype = ZERO_MISMATCH_CASES[case]
    n_in, n_out = 96, 40
    X = correlated_inputs(512, n_in)
    X[:, 5] = 0.0  # a dead input
    H, C = statistics(X, X)
    assert torch.count_nonzero(C) == 0
    hessian = damp_hessian(H)
    W = torch.randn(n_out, n_in, dtype=dtype)
    options = dict(block_size=32, act_order=act_order, static_groups=static_groups)
    expected = gptq(W, hessian, spec, **options)
    if method == "gptaq":
        got = gptaq(W, hessian, C, spec, alpha=1.0, **options)
    else:
        got = qronos(W, hessian, C, spec, **options)
    for part in ("weight", "codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(got.qweight, part), getattr(expected.qweight, part)), part
    assert got.loss == expected.loss


def test_gptaq_alpha_zero_is_gptq_whatever_the_mismatch():
    X, Xq = mismatched_streams(512, 64)
    H, C = statistics(X, Xq)
    hessian = damp_hessian(H)
    W = torch.randn(32, 64, dtype=torch.float64)
    assert torch.equal(gptaq(W, hessian, C, QuantSpec(bits=3), alpha=0.0).qweight.weight,
                       gptq(W, hessian, QuantSpec(bits=3)).qweight.weight)


# ----------------------------------------------------------------------------- output error


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_each_lowers_the_error_against_the_clean_output_of_a_linear_layer(bits):
    n_in, n_out = 128, 96
    X, Xq = mismatched_streams(2048, n_in)
    H, C = statistics(X, Xq)
    hessian = damp_hessian(H)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    spec = QuantSpec(bits=bits)
    err = {
        "gptq": clean_output_error(X, Xq, gptq(W, hessian, spec).qweight.weight, W),
        "gptaq": clean_output_error(X, Xq, gptaq(W, hessian, C, spec).qweight.weight, W),
        "gptaq α=1": clean_output_error(X, Xq, gptaq(W, hessian, C, spec, alpha=1.0).qweight.weight, W),
        "qronos": clean_output_error(X, Xq, qronos(W, hessian, C, spec).qweight.weight, W),
    }
    assert err["gptaq"] < 0.99 * err["gptq"], err
    assert err["gptaq α=1"] < err["gptaq"], err
    assert err["qronos"] < 0.9 * err["gptq"], err


# ----------------------------------------------------------------------------- GPTAQ's update


def naive_gptaq(W, hessian, C, spec, alpha, *, act_order, static_groups):
    """Column by column in float64, explicit inverses, no blocks and no Cholesky factor.

    Quantizing the column at position j rounds its current value w to q; the later positions F
    absorb the rounding error (GPTQ, via the inverse of H restricted to positions >= j) and
    α·w·(X_j − X̂_j)ᵀX̂_F (H_FF)⁻¹, this column's share of the input mismatch, solved directly.
    """
    W = W.double().clone()
    W[:, hessian.dead] = 0
    n_out, n_in = W.shape
    grouped = spec.group_size is not None
    gs = spec.group_size if grouped else n_in
    perm = torch.argsort(hessian.H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n_in)
    Hp, Cp = hessian.H[perm][:, perm], C.double()[perm][:, perm]
    Wp = W[:, perm].clone()
    static = {g: fit_scale_zero(W[:, g * gs:(g + 1) * gs], spec) for g in range(-(-n_in // gs))} \
        if (not grouped or static_groups) else {}
    for j in range(n_in):
        if grouped and not static_groups:
            if j % gs == 0:
                scale, zero = fit_scale_zero(Wp[:, j:j + gs], spec)
        else:
            scale, zero = static[int(perm[j]) // gs]
        w = Wp[:, j].clone()
        q = fake_quantize(w[:, None], scale, zero, spec.maxq)[:, 0]
        rest = torch.linalg.inv(Hp[j:, j:])  # inverse of H on the positions not yet quantized
        Wp[:, j + 1:] -= torch.outer((w - q) / rest[0, 0], rest[0, 1:])
        if j + 1 < n_in:
            Wp[:, j + 1:] += alpha * torch.outer(w, torch.linalg.solve(Hp[j + 1:, j + 1:], Cp[j + 1:, j]))
        Wp[:, j] = q
    return Wp[:, torch.argsort(perm)]


GPTAQ_CASES = {
    "per-channel": (QuantSpec(bits=3), False, False, 0.25),
    "per-channel act_order alpha 1": (QuantSpec(bits=2), True, False, 1.0),
    "groups across blocks act_order": (QuantSpec(bits=3, group_size=24), True, False, 0.25),
    "static groups act_order": (QuantSpec(bits=4, group_size=16), True, True, 0.5),
}


@pytest.mark.parametrize("case", list(GPTAQ_CASES))
def test_gptaq_blocked_update_equals_naive_column_by_column(case):
    spec, act_order, static_groups, alpha = GPTAQ_CASES[case]
    n_in, n_out = 96, 40
    X, Xq = mismatched_streams(512, n_in)
    X[:, 7] = Xq[:, 7] = 0.0  # a dead input
    H, C = statistics(X, Xq)
    hessian = damp_hessian(H)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    expected = naive_gptaq(W, hessian, C, spec, alpha, act_order=act_order, static_groups=static_groups)
    for block_size in (32, 7, 128):  # lazy updates across blocks do not change the result
        got = gptaq(W, hessian, C, spec, alpha=alpha, block_size=block_size, act_order=act_order,
                    static_groups=static_groups).qweight
        torch.testing.assert_close(got.weight, expected, rtol=1e-10, atol=1e-10)
        assert torch.equal(got.dequantize(), got.weight)
        assert bool((got.weight[:, 7] == 0).all())


def test_gptaq_feedback_is_each_columns_mismatch_projected_on_the_later_columns():
    n_in = 48
    X, Xq = mismatched_streams(400, n_in)
    H, C = statistics(X, Xq)
    hessian = damp_hessian(H)
    order = column_order(hessian, act_order=True)
    A = asymmetric_feedback(C, order, alpha=0.5)
    p = order.perm
    Hp, Cp = hessian.H[p][:, p], C[p][:, p]
    assert torch.equal(A, torch.triu(A, diagonal=1))
    for j in (0, 5, n_in - 2):
        expected = 0.5 * torch.linalg.solve(Hp[j + 1:, j + 1:], Cp[j + 1:, j])
        torch.testing.assert_close(A[j, j + 1:], expected, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- Qronos' steps


def ridge(A: torch.Tensor, Y: torch.Tensor, W: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_V ‖A Vᵀ − Y‖² + λ‖V − W‖² by lstsq on the stacked system; returns V (out, k)."""
    k = A.shape[1]
    A_aug = torch.cat([A, math.sqrt(lam) * torch.eye(k, dtype=A.dtype)])
    Y_aug = torch.cat([Y, math.sqrt(lam) * W.T])
    return torch.linalg.lstsq(A_aug, Y_aug).solution.T


@pytest.mark.parametrize("act_order", [False, True])
def test_qronos_is_its_three_steps(act_order):
    """1: round the first column from its best value with the others at W; 2: refit the others by
    least squares given that rounding; 3: GPTQ on the rest. Each step solved directly."""
    n_in, n_out = 64, 24
    X, Xq = mismatched_streams(512, n_in)
    H, C = statistics(X, Xq)
    hessian = damp_hessian(H)
    lam = hessian.lam
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    spec = QuantSpec(bits=3)
    result = qronos(W, hessian, C, spec, block_size=16, act_order=act_order).qweight
    scale, zero = result.scales, result.zeros  # per channel: the grid the solver fitted
    order = column_order(hessian, act_order)
    p = order.perm
    Xqp, Wp = Xq[:, p], W[:, p]
    Y = X @ W.T  # the clean output

    # 1: the coordinate minimiser of the (damped) clean-output objective for position 0
    u = ridge(Xqp[:, :1], Y - Xqp[:, 1:] @ Wp[:, 1:].T, Wp[:, :1], lam)[:, 0]
    torch.testing.assert_close(qronos_start(W, hessian, C, order)[:, p[0]], u, rtol=1e-9, atol=1e-9)
    q0 = fake_quantize(u[:, None], scale, zero, spec.maxq)[:, 0]
    # 2: the rest by least squares given q0
    V = ridge(Xqp[:, 1:], Y - torch.outer(Xqp[:, 0], q0), Wp[:, 1:], lam)
    # 3: GPTQ on the rest with H restricted to it (explicit inverse, downdated per column)
    Hinv = torch.linalg.inv(hessian.H[p][:, p][1:, 1:])
    for j in range(n_in - 1):
        q = fake_quantize(V[:, j:j + 1], scale, zero, spec.maxq)[:, 0]
        d = Hinv[j, j]
        V[:, j + 1:] -= torch.outer((V[:, j] - q) / d, Hinv[j, j + 1:])
        V[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / d
    expected = torch.cat([q0[:, None], V], dim=1)[:, torch.argsort(p)]
    torch.testing.assert_close(result.weight, expected, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- engine


def tokens_for(model, n=8, seqlen=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=g)


@pytest.mark.parametrize("bits", [2, 3])
def test_both_lower_the_drift_of_a_tiny_model_below_gptq(bits):
    model = tiny_model("llama", layers=2, hidden=64)
    tokens = tokens_for(model)
    drift = {m: quantize_model(ModelWeights(model), tokens, QuantizeConfig(method=m, bits=bits),
                               micro_batch=4).divergence[-1]["mse"] for m in ("gptq", "gptaq", "qronos")}
    assert drift["gptaq"] < drift["gptq"] and drift["qronos"] < drift["gptq"], drift


def test_qronos_resets_the_clean_stream_per_layer_and_reports_drift_from_the_fp_model():
    model = tiny_model("qwen2", layers=2, hidden=64)
    tokens = tokens_for(model)
    source = ModelWeights(model)
    reset = quantize_model(source, tokens, QuantizeConfig(method="qronos", bits=3), micro_batch=4)
    full = quantize_model(source, tokens, QuantizeConfig(method="qronos", bits=3, clean_stream_reset=False),
                          micro_batch=4)
    # Layer 0 starts from h = h_hat (the embeddings) either way; layer 1 sees a different clean stream.
    for name, q in reset.layers[0].weights.items():
        assert torch.equal(q.weight, full.layers[0].weights[name].weight), name
    assert any(not torch.equal(q.weight, full.layers[1].weights[n].weight) for n, q in reset.layers[1].weights.items())
    # The reported drift is still against the full-precision model's stream.
    fp = stream_forward(source, tokens)
    expected = stream_divergence(MemoryArray(fp), MemoryArray(reset.final_hidden))
    assert reset.divergence[-1]["mse"] == pytest.approx(expected["mse"], rel=1e-5)


# ----------------------------------------------------------------------------- store keys


def test_store_keys_carry_each_methods_own_fields_only():
    def keys(*overrides):
        return chain_keys("root", load_config("default", list(overrides)).quantize, 2)

    # gptaq_alpha is GPTAQ's: it changes GPTAQ's key and nobody else's
    assert keys("quantize.method=gptaq", "quantize.gptaq_alpha=0.5") != keys("quantize.method=gptaq")
    for method in ("gptq", "qronos", "loaq"):
        assert keys(f"quantize.method={method}", "quantize.gptaq_alpha=0.5") == keys(f"quantize.method={method}")
    # the LoaQ alpha/beta do not enter GPTAQ's or Qronos' keys
    for method in ("gptaq", "qronos"):
        assert keys(f"quantize.method={method}", "quantize.alpha_in=0.1", "quantize.beta=0.9") == \
            keys(f"quantize.method={method}")
    # the clean-stream reset: Qronos' default, a choice for the clean-stream methods, nothing for GPTQ
    assert keys("quantize.method=qronos", "quantize.clean_stream_reset=false") != keys("quantize.method=qronos")
    assert keys("quantize.method=qronos", "quantize.clean_stream_reset=true") == keys("quantize.method=qronos")
    assert keys("quantize.method=gptaq", "quantize.clean_stream_reset=true") != keys("quantize.method=gptaq")
    assert keys("quantize.method=gptq", "quantize.clean_stream_reset=true") == keys("quantize.method=gptq")
    assert len({keys(f"quantize.method={m}")[0] for m in ("gptq", "gptaq", "qronos", "loaq")}) == 4
    # the older methods' identities (hence their stored results) are unchanged by the new fields
    for method in ("rtn", "gptq", "lloa", "lloa_soa", "loaq"):
        identity = config_identity(QuantizeConfig(method=method))
        assert "gptaq_alpha" not in identity and "clean_stream_reset" not in identity


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipeline_store(tmp_path_factory, shared_data):
    """GPTQ, GPTAQ and Qronos run one after another on one store through ``loaq run``."""
    root = tmp_path_factory.mktemp("baselines")
    checkpoint = make_checkpoint(root / "tiny-llama", layers=2)
    config = write_config(root / "tiny.yaml", checkpoint, root / "store", shared_data, method="gptq")
    runs = {}
    for method in ("gptq", "gptaq", "qronos"):
        proc = run_cli("run", str(config), "--set", f"quantize.method={method}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[method] = proc
    return root / "store", runs


def test_pipeline_runs_both_and_stores_weights_that_differ_from_gptq(pipeline_store):
    store_url, runs = pipeline_store
    for method in ("gptaq", "qronos"):
        assert f"{method} W3" in runs[method].stdout
    store = Store(str(store_url))
    weights: dict[str, dict] = {}
    for info in store.list(kind="weights"):
        record = store.open(info.key)
        method = info.attrs["config"]["method"]
        weights.setdefault(method, {}).update({(info.attrs["layer"], n): record.read(n) for n in record.names})
    assert set(weights) == {"gptq", "gptaq", "qronos"}
    assert weights["gptaq"].keys() == weights["gptq"].keys() == weights["qronos"].keys()
    for method in ("gptaq", "qronos"):
        codes = [k for k in weights[method] if k[1].endswith(".packed")]
        assert codes and any(not torch.equal(weights[method][k], weights["gptq"][k]) for k in codes), method
    assert store.open(next(i.key for i in store.list(kind="weights")
                           if i.attrs["config"]["method"] == "gptaq")).attrs["config"]["gptaq_alpha"] == 0.25


def test_pipeline_shares_calibration_clean_stream_and_fp_evaluation_with_gptq(pipeline_store):
    store_url, runs = pipeline_store
    store = Store(str(store_url))
    for method in ("gptaq", "qronos"):
        by_stage: dict[str, set] = {}
        for e in store.events(run_id(runs[method])):
            by_stage.setdefault(e["stage"], set()).add(e["action"])
        for stage in ("calibration", "embed", "clean-layer"):
            assert by_stage[stage] == {"reused"}, (method, stage, by_stage[stage])
        assert by_stage["quantize-layer"] == {"computed"}
        assert by_stage["perplexity"] == {"computed", "reused"}  # FP reused, quantized new
