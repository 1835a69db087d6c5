"""Per-layer strengths in the quantized chain, and the search that chooses them on held-out windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from flowkit import computed_stages, make_checkpoint, run_cli, run_id, write_config
from loaq.configs.schema import LayerSetting, QuantizeConfig, SearchConfig
from loaq.engine.arrays import MemoryArray
from loaq.engine.forward import clean_layer_forward, embed
from loaq.engine.layer import CleanStream, LayerQuantizer
from loaq.engine.search import LayerSearch
from loaq.engine.sources import ModelWeights
from loaq.models.layers import ContextFactory
from loaq.stages.keys import chain_keys, weights_key
from loaq.store import Store

ROOT = "embedding-key"


def test_a_layer_setting_changes_exactly_the_keys_from_its_layer_on():
    base = QuantizeConfig(method="loaq", alpha_in=0.5, alpha_out=0.5, beta=0.25)
    keys = chain_keys(ROOT, base, 5)
    for setting in ({"beta": 0.5}, {"alpha_in": 0.25}, {"mlp": {"beta": 0.0}}, {"attn": {"alpha_out": 0.75}}):
        other = chain_keys(ROOT, base.model_copy(update={"layers": {2: LayerSetting.model_validate(setting)}}), 5)
        assert other[:2] == keys[:2], setting
        assert all(a != b for a, b in zip(other[2:], keys[2:])), setting
    # A layer set to the run's own values is the run's layer: the same key.
    same = base.model_copy(update={"layers": {1: LayerSetting(alpha_in=0.5, alpha_out=0.5, beta=0.25),
                                              3: LayerSetting(mlp={"beta": 0.25})}})
    assert chain_keys(ROOT, same, 5) == keys


def test_configs_that_agree_up_to_a_layer_share_its_records(tmp_path, shared_data):
    checkpoint = make_checkpoint(tmp_path / "model", layers=3)
    fixed = write_config(tmp_path / "fixed.yaml", checkpoint, tmp_path / "store", shared_data)
    per_layer = write_config(tmp_path / "layers.yaml", checkpoint, tmp_path / "store", shared_data,
                             layers={1: {"beta": 0.5}, 2: {"mlp": {"alpha_in": 0.25, "alpha_out": 0.25}}})
    # Every layer's quantized stream kept, so the second run can continue from the shared layer 0.
    keep = ("--set", "store.keep_quant_states=all")
    runs = [run_cli("run", str(fixed), *keep), run_cli("run", str(per_layer), *keep)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    store = Store(str(tmp_path / "store"))
    second = [e for e in store.events(run_id(runs[1])) if e["stage"] == "quantize-layer"]
    assert [e["action"] for e in second] == ["reused", "computed", "computed"]
    layers = {}
    for info in store.list(kind="weights"):
        layers.setdefault(info.attrs["layer"], []).append(info.attrs["strengths"])
    assert len(layers[0]) == 1 and len(layers[1]) == 2 and len(layers[2]) == 2  # layer 0 is shared
    assert {"attn": [0.5, 0.5, 0.5], "mlp": [0.5, 0.5, 0.5]} in layers[1]
    assert {"attn": [0.5, 0.5, 0.25], "mlp": [0.25, 0.25, 0.25]} in layers[2]
    status = run_cli("status", str(per_layer))
    assert status.returncode == 0, status.stderr[-3000:]
    rows = [line.split() for line in status.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert rows[1][-1] == "0.5/0.5/0.5" and rows[2][-4:] == ["attn", "0.5/0.5/0.25", "mlp", "0.25/0.25/0.25"]


def weights_by_layer(store_url: Path) -> dict[int, dict[str, torch.Tensor]]:
    store = Store(str(store_url))
    out = {}
    for info in store.list(kind="weights"):
        record = store.open(info.key)
        out[info.attrs["layer"]] = {name: record.read(name) for name in record.names}
    return out


@pytest.fixture(scope="module")
def searched(tmp_path_factory, shared_data):
    """A 3-layer model searched over 2x2 candidates, uninterrupted."""
    root = tmp_path_factory.mktemp("search")
    checkpoint = make_checkpoint(root / "model", layers=3)
    config = write_config(root / "search.yaml", checkpoint, root / "store", shared_data,
                          search={"alpha": [0.25, 0.75], "beta": [0.0, 0.5]})
    proc = run_cli("run", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"checkpoint": checkpoint, "config": config, "store": root / "store", "proc": proc}


def test_search_keeps_each_sub_layers_best_candidate_and_reports_it(searched):
    store = Store(str(searched["store"]))
    records = sorted(store.list(kind="search"), key=lambda i: i.attrs["layer"])
    assert [r.attrs["layer"] for r in records] == [0, 1, 2]
    weights = {i.attrs["layer"]: i.attrs["strengths"] for i in store.list(kind="weights")}
    for record in records:
        for sub, scores in record.attrs["scores"].items():
            assert len(scores) == 4
            best = min(scores, key=lambda s: s[2])  # (alpha_out, beta, objective); the first of equals wins
            alpha_out, beta = best[:2]
            # alpha_in stays the run's (0.5); the weights record carries the layer's chosen strengths.
            assert record.attrs["choice"][sub] == [0.5, alpha_out, beta]
            assert weights[record.attrs["layer"]][sub] == [0.5, alpha_out, beta]
    report = searched["store"].parent / "runs" / "tiny"
    assert (report / "strengths.png").stat().st_size > 1000 and "strengths.png" in (report / "report.md").read_text()
    assert "loaq W3 search" in searched["proc"].stdout


def test_the_objective_uses_only_windows_the_solves_did_not_see(searched):
    """Recorded: the held-out windows are a separate draw sharing no window with the calibration, and
    every solve's H summed over the calibration windows' tokens only (4 windows of 64 tokens)."""
    store = Store(str(searched["store"]))
    calibration = [store.open(i.key) for i in store.list(kind="calibration")]
    (held,) = [r for r in calibration if "holdout" in r.attrs]
    (cal,) = [r for r in calibration if "holdout" not in r.attrs]
    held_tokens, cal_tokens = held.read("tokens"), cal.read("tokens")
    assert held_tokens.shape == (1, 64) and cal_tokens.shape == (4, 64)
    assert not any(torch.equal(h, c) for h in held_tokens for c in cal_tokens)
    for info in store.list(kind="search"):
        a = info.attrs
        assert a["tokens"] == {"solve": 4 * 64, "held_out": 64}
        assert set(a["solver_tokens"].values()) == {4 * 64}


def _layer_zero(tokens: torch.Tensor, held: torch.Tensor, cfg: QuantizeConfig):
    model = tiny_model("llama", layers=1, hidden=64)
    source = ModelWeights(model)
    contexts = ContextFactory(source.adapter, source.config, "cpu")

    def streams(t):
        h = MemoryArray(embed(source, t, torch.float32))
        clean = CleanStream(h, {sub.name: MemoryArray(shape=h.shape) for sub in source.adapter.sublayers})
        clean_layer_forward(source, 0, h, MemoryArray(shape=h.shape), clean.out, contexts, device="cpu",
                            dtype=torch.float32, micro_batch=2)
        return clean, MemoryArray(h.tensor.clone())

    quantizer = LayerQuantizer(source.adapter, source.config, 0, source.layer_state(0), cfg, contexts, micro_batch=2)
    return quantizer, *streams(tokens), *streams(held)


def test_held_out_windows_move_the_scores_but_never_the_solves():
    search = SearchConfig(alpha=[0.5], beta=[0.25])
    cfg = QuantizeConfig(method="loaq", bits=3, search=search)
    randint = lambda shape, seed: torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))
    tokens, held, other_held = randint((6, 32), 0), randint((2, 32), 1), randint((2, 32), 2)
    changed = tokens.clone()
    changed[0] = randint((32,), 3)
    results = {}
    for name, (t, h) in {"base": (tokens, held), "held": (tokens, other_held), "solve": (changed, held)}.items():
        quantizer, clean, hq, held_clean, held_hq = _layer_zero(t, h, cfg)
        out = MemoryArray(shape=hq.shape)
        results[name] = LayerSearch(quantizer, search).run(clean, hq, out, held_clean, held_hq).layer
    base, other, solve = results["base"], results["held"], results["solve"]
    for name, q in base.weights.items():
        assert torch.equal(q.weight, other.weights[name].weight), name
    assert any(not torch.equal(q.weight, solve.weights[name].weight) for name, q in base.weights.items())
    assert all(info["tokens"] == 6 * 32 for info in base.solver.values())


def test_held_out_windows_decide_between_candidates():
    """Two candidates: their scores are those of their own weights on the held-out windows, so other
    held-out windows give other scores (and the choice is the lower one)."""
    search = SearchConfig(alpha=[0.25, 0.75], beta=[0.5])
    cfg = QuantizeConfig(method="loaq", bits=3, search=search)
    randint = lambda shape, seed: torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))
    scores = []
    for seed in (1, 2):
        quantizer, clean, hq, held_clean, held_hq = _layer_zero(randint((6, 32), 0), randint((2, 32), seed), cfg)
        result = LayerSearch(quantizer, search).run(clean, hq, MemoryArray(shape=hq.shape), held_clean, held_hq)
        for sub, pairs in result.scores.items():
            assert result.choice[sub] == (cfg.alpha_in, *min(pairs, key=lambda s: s[2])[:2])
        scores.append(result.scores["attn"])
    assert [s[:2] for s in scores[0]] == [s[:2] for s in scores[1]] == [(0.25, 0.5), (0.75, 0.5)]
    assert all(a[2] != b[2] for a, b in zip(*scores))


def test_search_with_one_candidate_is_the_fixed_run_bit_for_bit(tmp_path, searched, shared_data):
    checkpoint = searched["checkpoint"]
    one = write_config(tmp_path / "one.yaml", checkpoint, tmp_path / "searched", shared_data,
                       search={"alpha": [0.25], "beta": [0.5]})
    fixed = write_config(tmp_path / "fixed.yaml", checkpoint, tmp_path / "fixed", shared_data,
                         alpha_in=0.5, alpha_out=0.25, beta=0.5)
    for config in (one, fixed):
        proc = run_cli("run", str(config))
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights_by_layer(tmp_path / "searched"), weights_by_layer(tmp_path / "fixed")
    assert a.keys() == b.keys() == {0, 1, 2}
    for layer in a:
        assert a[layer].keys() == b[layer].keys()
        for name in a[layer]:
            assert torch.equal(a[layer][name], b[layer][name]), (layer, name)
    # The chosen path is an ordinary chain: the fixed config on the search's store computes no layer.
    again = write_config(tmp_path / "again.yaml", checkpoint, tmp_path / "searched", shared_data,
                         alpha_in=0.5, alpha_out=0.25, beta=0.5)
    proc = run_cli("run", str(again))
    assert proc.returncode == 0, proc.stderr[-3000:]
    computed = computed_stages(tmp_path / "searched", [run_id(proc)])
    assert not any(stage == "quantize-layer" for stage, _ in computed), computed


def test_the_searched_layers_are_those_of_a_run_configured_with_the_choice(tmp_path, searched, shared_data):
    """Four candidates: a run given the chosen per-layer values on its own store computes every
    weight bit for bit as the search wrote it."""
    store = Store(str(searched["store"]))
    layers = {}
    for info in store.list(kind="search"):
        choice = info.attrs["choice"]
        layers[info.attrs["layer"]] = {sub: dict(zip(("alpha_in", "alpha_out", "beta"), choice[sub])) for sub in choice}
    config = write_config(tmp_path / "chosen.yaml", searched["checkpoint"], tmp_path / "chosen", shared_data,
                          layers=layers)
    proc = run_cli("run", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = weights_by_layer(searched["store"]), weights_by_layer(tmp_path / "chosen")
    assert expected.keys() == got.keys() == {0, 1, 2}
    for layer in expected:
        for name in expected[layer]:
            assert torch.equal(expected[layer][name], got[layer][name]), (layer, name)


def test_a_search_killed_mid_layer_resumes_to_the_same_weights(tmp_path, searched, shared_data):
    config = write_config(tmp_path / "search.yaml", searched["checkpoint"], tmp_path / "store", shared_data,
                          search={"alpha": [0.25, 0.75], "beta": [0.0, 0.5]})
    for point in ("layer-search:1:before", "quantize-layer:1:mid"):
        killed = run_cli("run", str(config), env={"LOAQ_FAILPOINT": point})
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
    done = run_cli("run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    computed = computed_stages(tmp_path / "store", [run_id(done)])
    per_stage = {stage: sum(n for (s, _), n in computed.items() if s == stage) for stage, _ in computed}
    # Layer 0 is kept; layer 1's search was killed while writing its layer: layers 1-2 are searched,
    # and the search writes each layer's records, so no ordinary quantization runs.
    assert per_stage["layer-search"] == 2 and "quantize-layer" not in per_stage, computed
    expected, got = weights_by_layer(searched["store"]), weights_by_layer(tmp_path / "store")
    for layer in expected:
        for name in expected[layer]:
            assert torch.equal(expected[layer][name], got[layer][name]), (layer, name)


def test_a_kl_search_of_the_last_layer_shares_the_fixed_runs_prefix_and_scores_the_models_kl(tmp_path, searched,
                                                                                            shared_data):
    """``last: 1``: layers 0-1 are the fixed run's own records (reused, not searched); layer 2 is
    searched by the KL of the final next-token distribution, and the chosen MLP's score is that KL as
    transformers' model computes it with the stored weights on the held-out windows."""
    from transformers import AutoModelForCausalLM

    from loaq.stages.quantize import read_weights

    checkpoint, store_url = searched["checkpoint"], tmp_path / "store"
    fixed = write_config(tmp_path / "fixed.yaml", checkpoint, store_url, shared_data)
    kl = write_config(tmp_path / "kl.yaml", checkpoint, store_url, shared_data,
                      search={"alpha": [0.25, 0.75], "beta": [0.0, 0.5], "objective": "kl", "last": 1})
    keep = ("--set", "store.keep_quant_states=all")
    runs = [run_cli("run", str(fixed), *keep), run_cli("run", str(kl), *keep)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    store = Store(str(store_url))
    computed = computed_stages(store_url, [run_id(runs[1])])
    per_stage = {stage: sum(n for (s, _), n in computed.items() if s == stage) for stage, _ in computed}
    assert per_stage["layer-search"] == 1 and "quantize-layer" not in per_stage, computed
    (search,) = store.list(kind="search")
    assert search.attrs["layer"] == 2 and search.attrs["objective"] == "kl"
    mlp = search.attrs["scores"]["mlp"]
    chosen = min(mlp, key=lambda s: s[2])
    assert search.attrs["choice"]["mlp"][1:] == chosen[:2] and len({s[2] for s in mlp}) == 4

    (held,) = [store.open(i.key) for i in store.list(kind="calibration") if "holdout" in i.attrs]
    tokens = held.read("tokens").long()
    fp = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    quantized = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    status = run_cli("status", str(kl))
    assert status.returncode == 0 and "objective kl last 1" in status.stdout, status.stderr[-2000:]
    rows = [line.split() for line in status.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert rows[0][-1] == rows[1][-1] == "0.5/0.5/0.25"  # the run's own strengths before the searched layer
    chain = plan_chain(kl)
    for index, key in enumerate(chain):
        record = store.open(weights_key(key))
        for name, q in read_weights(record, record.attrs["linears"]).items():
            quantized.model.layers[index].get_submodule(name).weight.data = q.weight.float()
    with torch.no_grad():
        log_p = torch.log_softmax(fp(tokens).logits.float(), -1)
        log_q = torch.log_softmax(quantized(tokens).logits.float(), -1)
    expected = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert chosen[2] == pytest.approx(expected, rel=1e-4)


def plan_chain(config: Path) -> list[str]:
    from loaq.configs.load import load_config
    from loaq.flows.plan import plan
    from loaq.flows.quantize import open_context

    cfg = load_config(str(config))
    return plan(open_context(cfg), cfg).chain


@pytest.mark.parametrize("quantize, message", [
    ({"method": "gptq", "search": {}}, "quantize.search"),
    ({"layers": {5: {"beta": 0.5}}}, "quantize.layers sets layer 5, but the model has 3 layers"),
    ({"layers": {1: {"beta": 2}}}, "quantize.layers"),
    ({"search": {"objective": "kl", "last": 0}}, "quantize.search.last"),
    ({"search": {"objective": "logits"}}, "quantize.search.objective"),
])
def test_bad_per_layer_settings_fail_in_one_line(tmp_path, searched, shared_data, quantize, message):
    config = write_config(tmp_path / "bad.yaml", searched["checkpoint"], tmp_path / "store", shared_data, **quantize)
    proc = run_cli("plan", str(config))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_the_two_term_parts_sum_to_any_pairs_difference(eps):
    """``projected_terms`` is ``projected_difference`` split by term: α·D_lloa + β·D_soa = D(α, β)."""
    from loaq.quant import projected_difference, projected_terms

    g = torch.Generator().manual_seed(0)
    h, y, hq = (torch.randn(50, 8, generator=g, dtype=torch.float64) for _ in range(3))
    xq, W, bias = (torch.randn(50, 12, generator=g, dtype=torch.float64),
                   torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64))
    D_lloa, D_soa, s_hat = projected_terms(h, y, hq, xq, W, bias, eps)
    for alpha, beta in ((0.5, 0.25), (0.75, 0.0), (0.25, 0.5)):
        D, expected_s_hat = projected_difference(h, y, hq, xq, W, bias, alpha, beta, eps)
        torch.testing.assert_close(alpha * D_lloa + beta * D_soa, D, rtol=1e-12, atol=1e-12)
        assert (s_hat is None) == (expected_s_hat is None)
