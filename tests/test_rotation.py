"""Hadamard rotation (QuaRot): the matrices, the rotated model's exactness in full precision, the engine
and the pipeline on a rotated model, and its export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from conftest import FAMILIES, tiny_model
from flowkit import make_checkpoint, write_config
from loaq.configs.schema import QuantizeConfig
from loaq.engine.forward import stream_forward
from loaq.engine.model import quantize_model
from loaq.engine.rotation import RotatedWeights
from loaq.engine.sources import ModelWeights
from loaq.evaluation.perplexity import final_norm
from loaq.quant.hadamard import Hadamard, HadamardSizeError, factorize, paley_factor, paley_matrix

# The widths of the families the rotation is meant for (hidden and intermediate sizes).
MODEL_WIDTHS = {576: "SmolLM2 hidden", 1536: "SmolLM2 intermediate", 28672: "LLaMA-3-70B intermediate",
                18944: "Qwen2-7B intermediate", 29568: "Qwen2-72B intermediate", 3584: "Qwen2-7B hidden"}


def logits_of(source, tokens: torch.Tensor) -> torch.Tensor:
    hidden = stream_forward(source, tokens, micro_batch=2)
    return F.linear(final_norm(hidden, source.final_norm_weight(), source.config.rms_norm_eps), source.lm_head_weight())


# -- the matrices ------------------------------------------------------------------------------------

@pytest.mark.parametrize("m, construction", [(12, ("I", 11)), (20, ("I", 19)), (28, ("II", 13)), (36, ("II", 17)),
                                             (148, ("II", 73)), (924, ("II", 461))])
def test_paley_matrices_are_hadamard(m, construction):
    assert paley_factor(m) == construction
    A = paley_matrix(m)
    assert torch.equal(A.abs(), torch.ones(m, m, dtype=torch.float64))
    torch.testing.assert_close(A @ A.T, m * torch.eye(m, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 64, 1024, 12, 28, 36, 148, 924, 40, 576, 1536])
@pytest.mark.parametrize("seed", [None, 7])
def test_rotation_is_orthonormal_with_equal_magnitude_entries(n, seed):
    Q = Hadamard(n, seed).matrix()
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(Q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", sorted(MODEL_WIDTHS))
def test_model_family_widths_rotate_without_forming_the_matrix(n):
    H = Hadamard(n, seed=1)
    p, m = factorize(n)
    assert p * m == n and p & (p - 1) == 0 and (m == 1 or paley_factor(m) is not None)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = H.apply(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)  # a rotation
    torch.testing.assert_close(H.apply(y, transpose=True), x, rtol=0, atol=1e-12)  # Q^T undoes Q
    basis = torch.zeros(4, n, dtype=torch.float64)
    basis[range(4), [0, 1, n // 2, n - 1]] = 1
    rows = H.apply(basis)  # four rows of Q
    torch.testing.assert_close(rows.abs(), torch.full_like(rows, n ** -0.5), rtol=0, atol=1e-14)
    torch.testing.assert_close(rows @ rows.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [24, 56, 144, 128, 2048])  # 2048 = 64 * 32: two Sylvester factors
def test_fast_apply_equals_the_dense_kronecker_product(n):
    """Against an independent dense matrix: diag(signs) (A_m kron scipy's Sylvester S_p) / sqrt(n)."""
    H = Hadamard(n, seed=3)
    p, m = factorize(n)
    A = paley_matrix(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    dense = torch.diag(H.signs) @ torch.kron(A, torch.from_numpy(scipy.linalg.hadamard(p)).double()) / n ** 0.5
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(H.apply(x), x @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(H.apply(x, transpose=True), x @ dense.T, rtol=0, atol=1e-12)
    # float32 input is rotated in float32, to float32 accuracy
    torch.testing.assert_close(H.apply(x.float()), (x @ dense).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [668, 6, 10, 184])
def test_a_size_without_a_construction_fails_in_one_line(n):
    with pytest.raises(HadamardSizeError) as e:
        Hadamard(n)
    message = str(e.value)
    assert f"size {n}" in message and "Paley" in message and "\n" not in message


def test_rotation_spreads_outlier_columns_so_round_to_nearest_loses_less():
    """Why rotate: a few large input columns set every row's scale; rotated, they are spread over all."""
    from loaq.quant import QuantSpec, rtn

    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 576, dtype=torch.float64, generator=g)
    W[:, [5, 200]] *= 40
    H = Hadamard(576, seed=0)
    spec = QuantSpec(bits=4, symmetric=False, group_size=None, mse_clip=False)
    plain = (rtn(W, spec).weight - W).pow(2).sum()
    rotated = (H.apply(rtn(H.apply(W), spec).weight, transpose=True) - W).pow(2).sum()
    assert rotated < plain / 5, (plain, rotated)


# -- the rotated model is the same function -----------------------------------------------------------

ROTATED_MODELS = [(family, {}) for family in FAMILIES] + [
    ("llama", {"tie_word_embeddings": True}),  # the rotated head is untied from the rotated embedding
    ("llama", {"hidden": 56}),  # 56 = 2 * 28 and 112 = 4 * 28: Paley II factors
    ("qwen2", {"hidden": 48}),  # 48 = 4 * 12, 96 = 8 * 12: Paley I, with q/k/v biases
    ("llama", {"attention_bias": True, "mlp_bias": True}),  # o_proj and down_proj biases are rotated
]


@pytest.mark.parametrize("family, kw", ROTATED_MODELS, ids=lambda v: str(v) if v else "")
def test_rotated_model_logits_equal_the_original(family, kw):
    from loaq.stages.evaluate import load_whole

    model = tiny_model(family, **kw)
    tokens = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens).logits
    rotated = RotatedWeights(ModelWeights(model), seed=5)
    got = logits_of(rotated, tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    # Not merely the same model: norms are folded, weights and the residual stream are rotated.
    state = rotated.layer_state(0)
    assert torch.equal(state["input_layernorm.weight"], torch.ones_like(state["input_layernorm.weight"]))
    assert not torch.allclose(state["self_attn.q_proj.weight"], model.model.layers[0].self_attn.q_proj.weight)
    assert rotated.input_transforms(0).keys() == {"mlp.down_proj"}
    # The whole model assembled for lm-eval (online Hadamard hooked, head untied) computes the same.
    whole = load_whole(rotated, torch.float32, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(whole(tokens).logits, expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    if getattr(model.config, "tie_word_embeddings", False):
        assert not torch.equal(whole.lm_head.weight, whole.model.embed_tokens.weight)


def test_rotated_smollm2_logits_equal_the_original(smollm2):
    """The embedded SmolLM2 (576 = 16 * 36, 1536 = 128 * 12, tied embeddings), a few short sequences."""
    _, checkpoint = smollm2
    tokens = torch.randint(0, checkpoint.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = logits_of(checkpoint, tokens)
    got = logits_of(RotatedWeights(checkpoint, seed=0), tokens)
    scale = expected.abs().max().item()
    assert 5 < scale < 1000  # real logits, not a degenerate forward
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * scale)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


# -- the engine on a rotated model ---------------------------------------------------------------------

def test_engine_quantizes_a_rotated_model():
    model = tiny_model("llama", hidden=56)
    tokens = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    plain = ModelWeights(model)
    rotated = RotatedWeights(plain, seed=0)
    reference = stream_forward(rotated, tokens)
    # The rotated stream is the original one rotated: h' = h Q.
    torch.testing.assert_close(reference, rotated.residual.apply(stream_forward(plain, tokens)), rtol=0, atol=1e-5)
    # 16 bits through the engine reproduces the rotated model (its online Hadamard included).
    same = quantize_model(rotated, tokens, QuantizeConfig(method="loaq", bits=16), micro_batch=4)
    torch.testing.assert_close(same.final_hidden, reference, rtol=0, atol=1e-5)

    def error(source, ref, method):
        q = quantize_model(source, tokens, QuantizeConfig(method=method, bits=3), micro_batch=4)
        return ((q.final_hidden - ref).pow(2).mean() / ref.pow(2).mean()).item()

    unrotated = stream_forward(plain, tokens)
    errors = {method: (error(rotated, reference, method), error(plain, unrotated, method)) for method in ("gptq", "loaq")}
    for method, (rot, unrot) in errors.items():
        # A random model has no outlier channels to spread: the rotation neither helps nor hurts much.
        assert rot < 0.05 and rot < 1.5 * unrot, (method, rot, unrot)
    assert errors["loaq"][0] < errors["gptq"][0]


# -- the pipeline ----------------------------------------------------------------------------------------

ROTATE = ("model.rotation.kind=hadamard", "model.rotation.seed=3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    """The same tiny model (48 = 4 * 12) run plain and rotated on one store; the rotated one exported."""
    from loaq.configs.load import load_config
    from loaq.flows.quantize import quantize_flow

    root = tmp_path_factory.mktemp("rotation")
    checkpoint = make_checkpoint(root / "model", layers=2, hidden=48)
    config = write_config(root / "tiny.yaml", checkpoint, root / "store", shared_data)
    plain = quantize_flow(load_config(str(config)))
    rotated = quantize_flow(load_config(str(config), [*ROTATE, "export.formats=[fake_quant]"]))
    return {"root": root, "config": config, "plain": plain, "rotated": rotated}


def _plan(config, overrides=()):
    from loaq.configs.load import load_config
    from loaq.flows.plan import plan
    from loaq.flows.quantize import open_context

    cfg = load_config(str(config), list(overrides))
    return plan(open_context(cfg), cfg)


def test_pipeline_keeps_rotated_and_plain_records_apart(runs):
    from loaq.store import Store

    plain, rotated = _plan(runs["config"]), _plan(runs["config"], ROTATE)
    assert plain.model.key != rotated.model.key and rotated.model.rotated and not plain.model.rotated
    keys = lambda p: {p.calibration, p.embedding, *p.clean, *p.chain, *p.weights,
                      *(k for d in p.evals.values() for k in d.values())}
    assert not keys(plain) & keys(rotated)
    store = Store(str(runs["root"] / "store"))
    kept = lambda p: keys(p) - set(p.chain[:-1])  # retention keeps only the last quantized-stream state
    assert all(store.is_complete(k) for k in kept(plain) | kept(rotated))
    # Another seed is another model too.
    assert _plan(runs["config"], [*ROTATE[:1], "model.rotation.seed=4"]).model.key != rotated.model.key
    # The full-precision model is the same function: its perplexity is unchanged by the rotation.
    ppl = {name: {w: store.open(k).attrs["ppl"] for w, k in p.evals["wikitext2"].items()}
           for name, p in (("plain", plain), ("rotated", rotated))}
    assert ppl["rotated"]["fp"] == pytest.approx(ppl["plain"]["fp"], rel=1e-5)
    assert 1 < ppl["rotated"]["quantized"] < 1e4
    report = (runs["root"] / "runs" / "tiny" / "report.md").read_text()
    assert "Hadamard-rotated (seed 3)" in report


def test_fake_quant_export_of_a_rotated_model_reproduces_the_pipeline(runs, shared_data):
    """The online Hadamard is folded back into down_proj: plain transformers computes the pipeline's model."""
    from transformers import AutoModelForCausalLM

    from loaq.data.windows import eval_windows
    from loaq.stages.evaluate import StoredQuantizedWeights
    from loaq.store import Store

    folder = runs["rotated"]["exports"]["fake_quant"]
    assert json.loads((Path(folder) / "config.json").read_text())["tie_word_embeddings"] is False
    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    p = _plan(runs["config"], ROTATE)
    pipeline = StoredQuantizedWeights(p.model.open(), Store(str(runs["root"] / "store")), p.chain)
    windows = eval_windows(p.model.open().tokenizer(), "wikitext2", 64, 3, shared_data)
    expected = logits_of(pipeline, windows)
    with torch.no_grad():
        got = exported(windows).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_packed_export_of_a_rotated_model_is_refused_before_any_work(tmp_path, shared_data, capsys):
    from loaq.cli import main
    from loaq.store import Store

    checkpoint = make_checkpoint(tmp_path / "model", layers=2)
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    args = ["run", str(config), "--set", "export.formats=[compressed_tensors]", "--set", ROTATE[0]]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("loaq:")]
    assert len(lines) == 1 and "export.formats" in lines[0] and "fake_quant" in lines[0], err
    assert not Store(str(tmp_path / "store")).list(kind="weights")


@pytest.mark.parametrize("override, words", [
    ("model.rotation.kind=quarot", ["'model.rotation.kind'", "quarot"]),
    ("model.rotation.seed=-1", ["'model.rotation.seed'"]),
    ("model.rotation=hadamard", ["'model.rotation'"]),
])
def test_bad_rotation_field_fails_in_one_line(tmp_path, shared_data, capsys, override, words):
    from loaq.cli import main

    config = write_config(tmp_path / "c.yaml", tmp_path / "model", tmp_path / "store", shared_data)
    assert main(["run", str(config), "--set", override]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("loaq: error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), err
    assert "Traceback" not in err


def test_model_with_an_unbuildable_width_fails_in_one_line(tmp_path, shared_data, capsys):
    from loaq.cli import main

    checkpoint = make_checkpoint(tmp_path / "model", layers=1, hidden=184)  # 184 = 8 * 23: no Paley factor
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    assert main(["run", str(config), "--set", ROTATE[0]]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("loaq: error:")]
    assert len(lines) == 1 and "model.rotation.kind" in lines[0] and "hidden_size: no Hadamard matrix of size 184" in lines[0], err
