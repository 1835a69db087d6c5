"""The product's key recipes (``loaq.stages.keys``): what a quantized chain shares and what it does not."""

from __future__ import annotations

import torch

from loaq.configs.schema import EvaluationConfig, QuantizeConfig
from loaq.stages import keys
from loaq.stages.context import Runtime, StageContext
from loaq.stages.keys import chain_id, chain_keys, clean_key, embed_key, perplexity_key, weights_key


def test_chains_share_exactly_their_common_prefix(monkeypatch):
    loaq = QuantizeConfig(method="loaq", bits=3)
    chain = chain_keys("embedding", loaq, 5)
    assert len(set(chain)) == 5
    # A deeper model's chain continues the shallower one's: layers 0..2 are the same records.
    assert chain_keys("embedding", loaq, 3) == chain[:3]
    # Another config, another root or another algorithm version shares no layer.
    others = [chain_keys("embedding", loaq.model_copy(update={"bits": 4}), 5),
              chain_keys("embedding", loaq.model_copy(update={"beta": 0.3}), 5),
              chain_keys("other-embedding", loaq, 5)]
    monkeypatch.setattr(keys, "ALGORITHM_VERSION", keys.ALGORITHM_VERSION + 1)
    others.append(chain_keys("embedding", loaq, 5))
    monkeypatch.undo()
    for other in others:
        assert not set(other) & set(chain)
    # A field the method ignores is not part of its identity: GPTQ's alpha and beta change nothing.
    gptq = QuantizeConfig(method="gptq", bits=3)
    assert chain_keys("embedding", gptq, 5) == chain_keys("embedding", gptq.model_copy(update={"alpha_in": 0.9,
                                                                                               "beta": 0.1}), 5)
    assert chain_id("embedding", gptq) == chain_id("embedding", gptq.model_copy(update={"alpha_out": 0.1}))
    assert chain_id("embedding", loaq) not in chain and weights_key(chain[-1]) not in chain


def test_stream_and_evaluation_keys_follow_their_inputs():
    class Model:
        key = "m" * 32

    fp32, bf16 = (StageContext(None, "run", Runtime("cpu", dtype, 8, 1), "cache") for dtype in
                  (torch.float32, torch.bfloat16))
    # The stored stream's dtype is part of its identity; the run id is not.
    assert embed_key(fp32, Model, "calibration") != embed_key(bf16, Model, "calibration")
    assert embed_key(fp32, Model, "calibration") == embed_key(StageContext(None, "other-run", fp32.runtime, "x"),
                                                              Model, "calibration")
    assert clean_key(fp32, Model, 0, "embedding") != clean_key(fp32, Model, 1, "embedding")
    chain = chain_keys("embedding", QuantizeConfig(), 2)
    cfg = EvaluationConfig()
    fp, quantized = (perplexity_key(fp32, Model, c, "wikitext2", cfg, "data") for c in (None, chain))
    assert fp != quantized
    assert quantized == perplexity_key(fp32, Model, [chain[-1]], "wikitext2", cfg, "data")  # the last layer names it
    assert quantized != perplexity_key(fp32, Model, chain, "c4", cfg, "data")
