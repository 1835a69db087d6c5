"""Weight-and-activation quantization (quantize.act_bits, W4A4): the token quantizer, the quantized stream
and statistics during calibration, the evaluation path, store keys, validation and export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_model
from flowkit import make_checkpoint, write_config
from loaq.configs.load import ConfigError, load_config
from loaq.configs.schema import QuantizeConfig
from loaq.engine.model import quantize_model
from loaq.engine.sources import ModelWeights
from loaq.quant import InputStats, QuantSpec, TokenQuantizer, damp_hessian, gptq
from loaq.stages.export import check_exportable
from loaq.stages.keys import chain_keys, config_identity

torch.set_num_threads(1)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def assert_rows_on_grid(x: torch.Tensor, bits: int) -> None:
    """Every row of x (tokens, d) is scale·(code − zero) for integer codes in [0, 2^bits − 1] and an
    integer zero point in that range: at most 2^bits distinct values, all integer multiples of one
    step (0 is on the grid), spanning at most 2^bits − 1 steps and leaving room for a zero point."""
    maxq = 2**bits - 1
    assert x.dim() == 2 and x.shape[1] > 2**bits  # more entries than grid points: the check has teeth
    for row in x.double():
        values = row.unique()
        assert len(values) <= 2**bits, len(values)
        if len(values) == 1:
            continue
        step = float((values[1:] - values[:-1]).min())
        k = values / step  # code − zero of each value
        tol = 1e-3
        assert float((k - k.round()).abs().max()) < tol
        k_min, k_max = round(float(k.min())), round(float(k.max()))
        # a zero point z in [0, maxq] with every code k + z in [0, maxq]
        assert max(0, -k_min) <= min(maxq, maxq - k_max), (k_min, k_max)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_token_quantizer_puts_each_token_on_its_own_grid():
    x = torch.randn(3, 5, 96) * torch.rand(3, 5, 1) * 4 + torch.randn(3, 5, 1)
    x[0, 0] = 0  # an all-zero token stays zero
    xq = TokenQuantizer(4)(x)
    assert xq.shape == x.shape and xq.dtype == x.dtype
    assert_rows_on_grid(xq.reshape(-1, 96), 4)
    assert torch.equal(xq[0, 0], torch.zeros(96))
    # per token, min-max with 0 in the range: the error is at most half a step of that token's grid
    flat, flat_q = x.reshape(-1, 96), xq.reshape(-1, 96)
    step = (flat.amax(1).clamp_min(0) - flat.amin(1).clamp_max(0)) / 15
    assert bool(((flat_q - flat).abs() <= step[:, None] / 2 * (1 + 1e-5) + 1e-7).all())
    assert not torch.equal(TokenQuantizer(8)(x), xq)
    with pytest.raises(ValueError, match="bits"):
        TokenQuantizer(16)


def install_with_quantized_activations(model, weights, bits: int | None):
    with torch.no_grad():
        for index, layer_weights in weights.items():
            for name, w in layer_weights.items():
                model.model.layers[index].get_submodule(name).weight.copy_(w)
    if bits is not None:
        quantizer = TokenQuantizer(bits)
        for layer in model.model.layers:
            for name in LINEARS:
                layer.get_submodule(name).register_forward_pre_hook(lambda m, args: (quantizer(args[0]), *args[1:]))
    return model


def last_hidden(model, tokens):
    """Hidden states after the last decoder layer, before the final norm (the engine's final_hidden)."""
    with torch.no_grad():
        hidden = model.model(tokens, output_hidden_states=True).hidden_states[-2]
        positions = torch.arange(tokens.shape[1])[None]
        return model.model.layers[-1](hidden, position_embeddings=model.model.rotary_emb(hidden, positions),
                                      attention_mask=None)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_calibration_stream_and_statistics_use_quantized_activations(family):
    model = tiny_model(family)
    tokens = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    cfg = QuantizeConfig(method="gptq", bits=4, act_bits=4)
    result = quantize_model(ModelWeights(model), tokens, cfg, micro_batch=tokens.shape[0])
    weight_only = quantize_model(ModelWeights(model), tokens, QuantizeConfig(method="gptq", bits=4),
                                 micro_batch=tokens.shape[0])
    assert not torch.allclose(result.final_hidden, weight_only.final_hidden, atol=1e-3)

    # The quantized stream is the transformers model with these weights and a 4-bit quantizer at
    # every linear input, and not the same weights with 16-bit activations.
    hand = last_hidden(install_with_quantized_activations(tiny_model(family), result.weights(), 4), tokens)
    torch.testing.assert_close(result.final_hidden, hand, rtol=0, atol=1e-5)
    no_act = last_hidden(install_with_quantized_activations(tiny_model(family), result.weights(), None), tokens)
    assert (no_act - hand).abs().max() > 1e-2

    # Every solve saw the quantized activations: GPTQ on the inputs each linear really multiplies
    # (captured after the quantizer) reproduces the engine's weights exactly.
    quantized = install_with_quantized_activations(tiny_model(family), result.weights(), 4)
    inputs = {}
    for index, layer in enumerate(quantized.model.layers):
        for name in LINEARS:
            def grab(module, args, index=index, name=name):
                inputs[(index, name)] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()
            layer.get_submodule(name).register_forward_pre_hook(grab)
    with torch.no_grad():
        quantized(tokens)
    for (index, name), x in inputs.items():
        assert_rows_on_grid(x, 4)
    for index, layer in enumerate(model.model.layers):
        for group in GROUPS:
            x = inputs[(index, group[0])]
            stats = InputStats(x.shape[1])
            stats.add(x, x)
            W = torch.cat([layer.get_submodule(n).weight.detach() for n in group]).float()
            expected = gptq(W, damp_hessian(stats.H, cfg.percdamp), QuantSpec(bits=4)).qweight.weight
            got = torch.cat([result.layers[index].weights[n].weight for n in group])
            assert torch.equal(expected, got), (index, group)


@pytest.mark.parametrize("method", ["rtn", "loaq", "gptaq", "qronos"])
def test_every_method_calibrates_on_the_quantized_activations(method):
    model = tiny_model("llama")
    tokens = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(2))
    result = quantize_model(ModelWeights(model), tokens, QuantizeConfig(method=method, bits=4, act_bits=4),
                            micro_batch=2)
    hand = last_hidden(install_with_quantized_activations(tiny_model("llama"), result.weights(), 4), tokens)
    torch.testing.assert_close(result.final_hidden, hand, rtol=0, atol=1e-5)


def test_validation_keys_and_export():
    with pytest.raises(ConfigError, match=r"'quantize.act_bits' = 16.*between 2 and 8"):
        load_config("default", ["quantize.act_bits=16"])
    assert load_config("default", ["quantize.act_bits=4"]).quantize.act_bits == 4

    def keys(*overrides):
        return chain_keys("root", load_config("default", list(overrides)).quantize, 2)

    assert keys("quantize.act_bits=4") != keys() and keys("quantize.act_bits=4") != keys("quantize.act_bits=8")
    for method in ("rtn", "gptq", "loaq", "gptaq", "qronos"):
        assert "act_bits" not in config_identity(QuantizeConfig(method=method))  # stored runs keep their keys
    for fmt in ("fake_quant", "compressed_tensors"):
        with pytest.raises(ConfigError, match="quantize.act_bits=4"):
            check_exportable(fmt, QuantizeConfig(bits=4, act_bits=4))


@pytest.fixture(scope="module")
def w4a4_run(tmp_path_factory, shared_data):
    """A weight-only W4 run, then the W4A4 run of the same model on the same store, in this process;
    every nn.Linear's input is recorded while each run evaluates its quantized model."""
    from loaq.cli import main
    from loaq.stages import evaluate
    from loaq.store import Store

    root = tmp_path_factory.mktemp("w4a4")
    checkpoint = make_checkpoint(root / "tiny-llama", layers=2)
    config = write_config(root / "tiny.yaml", checkpoint, root / "store", shared_data, method="gptq", bits=4)
    captured: dict[str, list[torch.Tensor]] = {"w4": [], "w4a4": []}
    state = {"run": None, "evaluating": False}
    real_perplexity = evaluate.perplexity

    def perplexity(source, windows, **kw):
        state["evaluating"] = isinstance(source, evaluate.StoredQuantizedWeights)
        try:
            return real_perplexity(source, windows, **kw)
        finally:
            state["evaluating"] = False

    def record(module, args, output):  # a forward hook sees the input after every pre-hook
        if state["evaluating"] and isinstance(module, nn.Linear):
            captured[state["run"]].append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())

    mp = pytest.MonkeyPatch()
    mp.setattr(evaluate, "perplexity", perplexity)
    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        for run, overrides in (("w4", []), ("w4a4", ["--set", "quantize.act_bits=4"])):
            state["run"] = run
            assert main(["run", str(config), *overrides]) == 0
    finally:
        handle.remove()
        mp.undo()
    return Store(str(root / "store")), captured


def test_evaluation_multiplies_every_linear_with_4_bit_token_activations(w4a4_run):
    _, captured = w4a4_run
    # 2 layers x 7 linears, each called once per micro-batch
    assert captured["w4a4"] and len(captured["w4a4"]) % 14 == 0
    for x in captured["w4a4"]:
        assert_rows_on_grid(x, 4)
    # the weight-only model, evaluated by the same path, multiplies full-precision activations
    assert len(captured["w4"]) == len(captured["w4a4"])
    for x in captured["w4"]:
        assert max(len(row.unique()) for row in x) > 16


def test_w4a4_evaluation_is_its_own_result(w4a4_run):
    store, _ = w4a4_run
    evals = [i for i in store.list(kind="eval") if i.attrs.get("quantized")]
    assert len(evals) == 2  # the weight-only W4 and the W4A4 perplexity, each computed
    assert evals[0].attrs["ppl"] != evals[1].attrs["ppl"]
    act_bits = [i.attrs["config"].get("act_bits") for i in store.list(kind="weights")]
    assert act_bits.count(None) == 2 and act_bits.count(4) == 2  # 2 layers of each run


def test_zero_shot_model_applies_the_quantizer_at_every_linear(tmp_path):
    """lm-eval scores a whole transformers model assembled by ``load_whole``: it carries each layer's input
    transforms, so it computes what the streamed evaluation computes."""
    from loaq.engine.forward import stream_forward
    from loaq.models.checkpoint import Checkpoint
    from loaq.stages.evaluate import load_whole

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "ckpt")
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    checkpoint = Checkpoint(tmp_path / "ckpt")
    result = quantize_model(checkpoint, tokens, QuantizeConfig(method="gptq", bits=4, act_bits=4), micro_batch=2)
    source = result.quantized_source(checkpoint)
    whole = load_whole(source, torch.float32, "cpu")
    inputs = []
    handles = [whole.model.layers[i].get_submodule(n).register_forward_hook(
        lambda m, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
        for i in range(len(whole.model.layers)) for n in LINEARS]
    with torch.no_grad():
        hidden = whole.model(tokens, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    assert len(inputs) == 2 * len(LINEARS)
    for x in inputs:
        assert_rows_on_grid(x, 4)
    # the last layer's input equals the streamed evaluation's (before the final norm, in hidden_states)
    streamed = stream_forward(source, tokens, micro_batch=2)
    final_norm = whole.model.norm
    torch.testing.assert_close(hidden[-1], final_norm(streamed), rtol=0, atol=1e-5)


def test_activation_quantizer_comes_after_the_models_own_transforms():
    """With an online rotation on down_proj's input, the quantizer acts on the rotated activations (what
    the linear multiplies), in calibration and in the streamed evaluation alike."""
    from test_engine import _RotatedDownProj
    from loaq.engine.forward import stream_forward

    model = tiny_model("llama")
    n = model.config.intermediate_size
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    rotated = _RotatedDownProj(model, Q.float())
    tokens = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(4))
    result = quantize_model(rotated, tokens, QuantizeConfig(method="gptq", bits=4, act_bits=4), micro_batch=2)
    source = result.quantized_source(rotated)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(args[0].reshape(-1, n)) if isinstance(m, nn.Linear) and m.in_features == n
        else None)
    try:
        streamed = stream_forward(source, tokens, micro_batch=2)
    finally:
        handle.remove()
    torch.testing.assert_close(streamed, result.final_hidden, rtol=0, atol=1e-5)
    assert len(seen) == 2 * 2  # down_proj of 2 layers, 2 micro-batches
    for x in seen:
        assert_rows_on_grid(x, 4)
