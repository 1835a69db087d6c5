"""Stored W3 chains on the search's held-out draw: per-layer error weighted by the FP model's loss
gradient, normalised drift, the final logits' KL from the FP model and the held-out NLL.

Each run is ``label|store|override|...`` (a ``default`` config on that store with those overrides; its
chain is read from the plan, every layer must be in the store). One thread. Writes
``bench/results/heldout_chains.json``.

    .venv/bin/python bench/heldout_chains.py "fixed|.loaq/store" \
        "search|.loaq/s|quantize.search={alpha: [0.25, 0.5, 0.75], beta: [0.0, 0.25, 0.5]}"
"""
import json
import sys
from pathlib import Path

import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from loaq.configs.load import load_config
from loaq.flows.quantize import open_context
from loaq.flows.plan import plan
from loaq.stages.model import prepare_model
from loaq.stages.streams import calibration_spec
from loaq.stages.evaluate import StoredQuantizedWeights
from loaq.data.calibration import sample_holdout
from loaq.engine.arrays import MemoryArray
from loaq.engine.forward import embed, forward_layer, next_token_log_probs
from loaq.models.layers import ContextFactory

runs = {spec.split("|")[0]: spec.split("|")[1:] for spec in sys.argv[1:]}
base = load_config("default", ["evaluation.datasets=[wikitext2]"])
ctx = open_context(base); model = prepare_model.fn(base.model, ctx.model_cache)
ck = model.open(); spec = calibration_spec(base.calibration)
held = sample_holdout(ck.tokenizer(), spec, 8, base.data_dir)
hf = AutoModelForCausalLM.from_pretrained(ck.path, torch_dtype=torch.float32)
grads = {}
for i, layer in enumerate(hf.model.layers):
    layer.register_forward_hook(lambda m, a, o, i=i: (o[0] if isinstance(o, tuple) else o).register_hook(
        lambda g, i=i: grads.__setitem__(i, g.detach().clone())) and None)
out = hf(held, labels=held); (out.loss * held.numel()).backward(); del hf
contexts = ContextFactory(ck.adapter, ck.config, "cpu")
def stream(source):
    h = MemoryArray(embed(source, held)); outs = []
    for i in range(source.num_layers):
        o = MemoryArray(shape=h.shape, dtype=torch.float32); forward_layer(source, i, h, o, contexts); outs.append(o.tensor); h = o
    return outs
def logp(h):
    return next_token_log_probs(h, ck.final_norm_weight(), ck.lm_head_weight(), float(ck.config.rms_norm_eps))
clean = stream(ck); lp_clean = logp(clean[-1])
res = {}
for name, sets in runs.items():
    store, *overrides = sets
    cfg = load_config("default", [f"store.url={store}", *overrides, "evaluation.datasets=[wikitext2]"])
    c2 = open_context(cfg); p = plan(c2, cfg, model)
    q = stream(StoredQuantizedWeights(ck, c2.store, p.chain))
    fisher = [float(((grads[i] * (q[i] - clean[i])) ** 2).sum()) for i in range(len(q))]
    drift = [float(((q[i] - clean[i]) ** 2).sum() / (clean[i] ** 2).sum()) for i in range(len(q))]
    lq = logp(q[-1]); kl = float((lp_clean.exp() * (lp_clean - lq)).sum(-1).mean())
    nll = float(F.nll_loss(lq[:, :-1].reshape(-1, lq.shape[-1]), held[:, 1:].reshape(-1)))
    res[name] = {"fisher": fisher, "drift": drift, "kl": kl, "held_nll": nll}
    print(name, "KL", round(kl, 4), "held NLL", round(nll, 4), "fisher@2,5,11,20,29", [round(fisher[i]) for i in (2, 5, 11, 20, 29)],
          "drift@2,5,11,20,29", [round(drift[i], 4) for i in (2, 5, 11, 20, 29)], flush=True)
(Path(__file__).parent / "results" / "heldout_chains.json").write_text(json.dumps(res))
