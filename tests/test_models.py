"""The embedded SmolLM2: GGUF conversion to per-layer safetensors, and perplexity by streaming layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loaq.engine.forward import stream_forward
from loaq.evaluation.perplexity import final_norm, perplexity


@pytest.fixture(scope="module")
def reference_model(smollm2):
    """SmolLM2 loaded whole by transformers' own GGUF loader (independent of our conversion)."""
    from transformers import AutoModelForCausalLM

    gguf, _ = smollm2
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def test_conversion_is_one_shard_per_layer_and_matches_transformers_gguf_loader(smollm2, reference_model):
    _, ckpt = smollm2
    assert ckpt.num_layers == 30 and ckpt.adapter.family == "llama"
    assert len(ckpt.shard_files()) == 31  # 30 layers + embeddings/final norm
    state = reference_model.state_dict()
    for index in (0, 29):
        for name, tensor in ckpt.layer_state(index).items():
            assert torch.equal(tensor, state[f"model.layers.{index}.{name}"]), name
    tokens = torch.randint(0, ckpt.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_model(tokens).logits
    hidden = stream_forward(ckpt, tokens, micro_batch=2)
    logits = F.linear(final_norm(hidden, ckpt.final_norm_weight(), ckpt.config.rms_norm_eps), ckpt.lm_head_weight())
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_wikitext2_perplexity_equals_an_independent_computation(smollm2, reference_model, shared_data):
    from loaq.data.windows import eval_windows

    _, ckpt = smollm2
    windows = eval_windows(ckpt.tokenizer(), "wikitext2", 256, 3, shared_data)
    ppl, _ = perplexity(ckpt, windows, micro_batch=3)
    # Independently: transformers' whole model, labels shifted by the model's own loss.
    nlls = []
    with torch.no_grad():
        for w in windows:
            nlls.append(reference_model(w[None], labels=w[None]).loss.double() * w.numel())
    expected = torch.exp(torch.stack(nlls).sum() / windows.numel()).item()
    assert ppl == pytest.approx(expected, rel=1e-4)
    assert 5 < ppl < 200  # a real language model on real text
