"""The two-stream engine on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from loaq.configs.schema import QuantizeConfig
from loaq.engine.model import quantize_model
from loaq.engine.sources import ModelWeights
from loaq.models.checkpoint import Checkpoint
from loaq.quant import InputStats, QuantSpec, damp_hessian, gptq

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tokens_for(model, n=4, seqlen=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=g)


def install(model, weights: dict[int, dict[str, torch.Tensor]]):
    with torch.no_grad():
        for index, layer_weights in weights.items():
            for name, w in layer_weights.items():
                model.model.layers[index].get_submodule(name).weight.copy_(w)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "loaq"])
def test_streamed_equals_whole_and_matches_transformers_forward(tmp_path, family, method):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "ckpt")
    tokens = tokens_for(model)
    cfg = QuantizeConfig(method=method, bits=3)

    whole = quantize_model(ModelWeights(model), tokens, cfg, micro_batch=2)
    streamed = quantize_model(Checkpoint(tmp_path / "ckpt"), tokens, cfg, micro_batch=2)
    for a, b in zip(whole.layers, streamed.layers):
        assert set(a.weights) == set(LINEARS)
        for name in LINEARS:
            assert torch.equal(a.weights[name].weight, b.weights[name].weight), name
    assert torch.equal(whole.final_hidden, streamed.final_hidden)

    # The engine's quantized stream is what transformers computes with the quantized weights.
    quantized = install(tiny_model(family), whole.weights())
    with torch.no_grad():
        hidden = quantized.model(tokens, output_hidden_states=True).hidden_states[-2]
        last = quantized.model.layers[-1](hidden, position_embeddings=quantized.model.rotary_emb(hidden, torch.arange(tokens.shape[1])[None]),
                                          attention_mask=None)
    torch.testing.assert_close(last, whole.final_hidden, rtol=0, atol=1e-5)
    # Quantization actually happened and stayed close.
    w = model.model.layers[0].self_attn.q_proj.weight
    q = whole.layers[0].weights["self_attn.q_proj"].weight
    assert 0 < (q - w).abs().max() < w.abs().max()
    assert len(q.unique()) <= w.shape[0] * 2**3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_gptq_equals_core_solver_on_hand_collected_statistics(family):
    model = tiny_model(family)
    tokens = tokens_for(model)
    cfg = QuantizeConfig(method="gptq", bits=3)
    result = quantize_model(ModelWeights(model), tokens, cfg, micro_batch=tokens.shape[0])

    # Install every quantized weight, then collect each linear's inputs with forward hooks: in
    # true-sequential order, a linear's input does not depend on its own quantization.
    quantized = install(tiny_model(family), result.weights())
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(quantized.model.layers):
        for name in LINEARS:
            def grab(module, args, index=index, name=name):
                inputs[(index, name)] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(grab))
    with torch.no_grad():
        quantized(tokens)
    for h in hooks:
        h.remove()

    groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    for index, layer in enumerate(model.model.layers):
        for group in groups:
            stats = InputStats(inputs[(index, group[0])].shape[1])
            stats.add(inputs[(index, group[0])], inputs[(index, group[0])])
            W = torch.cat([layer.get_submodule(n).weight.detach() for n in group]).float()
            expected = gptq(W, damp_hessian(stats.H, cfg.percdamp), QuantSpec(bits=3)).qweight.weight
            got = torch.cat([result.layers[index].weights[n].weight for n in group])
            mismatch = (expected != got).float().mean().item()
            assert mismatch == 0.0, (index, group, mismatch)


def test_unsupported_architecture_fails_with_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    from loaq.models.adapters import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match=r"unsupported architecture 'gpt2'.*supported: llama, mistral, qwen2, qwen3"):
        Checkpoint(tmp_path).adapter


def test_methods_reduce_output_error_of_a_layer_in_order():
    """On one model, every solver beats RTN on the quantized stream's drift at the last layer."""
    model = tiny_model("llama", layers=2, hidden=64)
    tokens = tokens_for(model, n=8, seqlen=32)
    drift = {}
    for method in ("rtn", "gptq", "loaq"):
        r = quantize_model(ModelWeights(model), tokens, QuantizeConfig(method=method, bits=3), micro_batch=4)
        drift[method] = r.divergence[-1]["mse"]
        assert len(r.divergence) == 2 and all(d["mse"] > 0 and d["mse_normalized"] > 0 for d in r.divergence)
    assert drift["gptq"] < drift["rtn"]
    assert drift["loaq"] < drift["gptq"]


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_layer_forward_is_bit_identical_and_records_sublayer_outputs(family):
    """The clean stream with its sub-layer outputs is the transformers layer's output, bit for bit."""
    from loaq.engine.arrays import MemoryArray
    from loaq.engine.forward import clean_layer_forward, embed, forward_layer
    from loaq.models.layers import ContextFactory

    model = tiny_model(family)
    source = ModelWeights(model)
    h = MemoryArray(embed(source, tokens_for(model)))
    contexts = ContextFactory(source.adapter, source.config, "cpu")
    plain, out = MemoryArray(shape=h.shape), MemoryArray(shape=h.shape)
    subs = {sub.name: MemoryArray(shape=h.shape) for sub in source.adapter.sublayers}
    forward_layer(source, 1, h, plain, contexts, micro_batch=2)
    clean_layer_forward(source, 1, h, out, subs, contexts, micro_batch=2)
    assert torch.equal(out.tensor, plain.tensor)
    assert torch.equal(h.tensor + subs["attn"].tensor + subs["mlp"].tensor, out.tensor)
    assert subs["attn"].tensor.abs().max() > 0 and subs["mlp"].tensor.abs().max() > 0


class _RotatedDownProj(ModelWeights):
    """down_proj reads x Q (an online transform) and holds W Q: the same function as the original."""

    def __init__(self, model, Q):
        super().__init__(model)
        self.Q = Q

    def layer_state(self, index):
        state = dict(super().layer_state(index))
        state["mlp.down_proj.weight"] = state["mlp.down_proj.weight"] @ self.Q
        return state

    def input_transforms(self, index):
        return {"mlp.down_proj": [lambda x: x @ self.Q.to(x.dtype)]}


@pytest.mark.parametrize("method", ["gptq", "loaq", "gptaq"])
def test_online_input_transforms_reach_every_forward_and_the_solver(method):
    from loaq.engine.forward import stream_forward

    model = tiny_model("llama")
    tokens = tokens_for(model)
    n = model.config.intermediate_size
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    plain, rotated = ModelWeights(model), _RotatedDownProj(model, Q.float())
    torch.testing.assert_close(stream_forward(rotated, tokens), stream_forward(plain, tokens), rtol=0, atol=1e-5)

    # Unquantized (16 bits) through the engine: the quantized stream is the model itself, so the
    # W_out stand-in must apply the transform too.
    same = quantize_model(rotated, tokens, QuantizeConfig(method=method, bits=16), micro_batch=2)
    torch.testing.assert_close(same.final_hidden, stream_forward(plain, tokens), rtol=0, atol=1e-5)
    # Quantized: the solver saw the transformed inputs (its H), so its output error is that of a
    # real GPTQ solve, far below what untransformed inputs against the folded weight would give.
    q = quantize_model(rotated, tokens, QuantizeConfig(method=method, bits=4), micro_batch=2)
    ref = stream_forward(plain, tokens)
    err = (q.final_hidden - ref).pow(2).mean() / ref.pow(2).mean()
    assert err < 0.05
