"""Do the drift and the logits' KL on unseen windows rank fixed (alpha, beta) pairs as perplexity does?

For each pair (alpha_in = alpha_out = alpha) at ``bits``: SmolLM2 quantized in memory
(``engine.model.quantize_model``, default calibration 32x512 C4), then both streams over 8 other C4
train windows (seed 123: an independent draw, which may by chance overlap a calibration window) and over the first 8 calibration windows: the per-layer RMS-normalised
drift on each, the final logits' KL from the full-precision model and the NLL on the unseen
windows, and WikiText-2 perplexity (40x512). One thread. Writes
``bench/results/heldout_drift_<bits>_<first pair>.json``.

    .venv/bin/python bench/heldout_drift.py 3 0.5,0.25 0.75,0.5 0.25,0.5
"""
import json
import sys
import time
from pathlib import Path

import torch
torch.set_num_threads(1)
from loaq.configs.load import load_config
from loaq.flows.quantize import open_context
from loaq.stages.model import prepare_model
from loaq.stages.streams import calibration_spec
from loaq.data.calibration import sample_calibration
from loaq.data.windows import eval_windows
from loaq.engine.model import quantize_model
from loaq.engine.arrays import MemoryArray
from loaq.engine.forward import embed, forward_layer
from loaq.engine.metrics import stream_divergence
from loaq.models.layers import ContextFactory
from loaq.evaluation.perplexity import perplexity, final_norm
import torch.nn.functional as F

bits = int(sys.argv[1]); pairs = [tuple(map(float, p.split(','))) for p in sys.argv[2:]]
config = load_config("default", ["store.url=.loaq/bench-heldout-drift"])
ctx = open_context(config)
model = prepare_model.fn(config.model, ctx.model_cache)
ck = model.open(); tok = ck.tokenizer()
calib = sample_calibration(tok, calibration_spec(config.calibration), config.data_dir)
held = sample_calibration(tok, calibration_spec(config.calibration.model_copy(update={"seed": 123, "n_samples": 8})), config.data_dir)
wiki = eval_windows(tok, "wikitext2", 512, 40, config.data_dir)
contexts = ContextFactory(ck.adapter, ck.config, "cpu")

def stream(source, tokens):
    h = MemoryArray(embed(source, tokens)); outs = []
    for i in range(source.num_layers):
        o = MemoryArray(shape=h.shape, dtype=torch.float32)
        forward_layer(source, i, h, o, contexts); outs.append(o); h = o
    return outs

def logits(source, h):
    w = source.final_norm_weight().float(); head = source.lm_head_weight().float()
    return torch.cat([F.linear(final_norm(h[i], w, float(source.config.rms_norm_eps)), head).unsqueeze(0) for i in range(h.shape[0])])

clean_held = stream(ck, held)
clean_calib = stream(ck, calib[:8])
lc = logits(ck, clean_held[-1].tensor)
res = {}
for a, b in pairs:
    t = time.time()
    cfg = config.quantize.model_copy(update={"bits": bits, "alpha_in": a, "alpha_out": a, "beta": b})
    r = quantize_model(ck, calib, cfg)
    qs = r.quantized_source(ck)
    qh = stream(qs, held); qc = stream(qs, calib[:8])
    dh = [stream_divergence(c, q)["mse_normalized"] for c, q in zip(clean_held, qh)]
    dc = [stream_divergence(c, q)["mse_normalized"] for c, q in zip(clean_calib, qc)]
    lq = logits(qs, qh[-1].tensor)
    kl = F.kl_div(F.log_softmax(lq, -1), F.log_softmax(lc, -1), log_target=True, reduction="none").sum(-1).mean().item()
    nll = F.cross_entropy(lq[:, :-1].reshape(-1, lq.shape[-1]), held[:, 1:].reshape(-1)).item()
    ppl, _ = perplexity(qs, wiki)
    res[f"{a},{b}"] = {"ppl": ppl, "kl_held": kl, "nll_held": nll, "drift_held": dh, "drift_calib": dc}
    print(a, b, f"ppl {ppl:.2f} kl {kl:.4f} nll {nll:.4f} final drift held {dh[-1]:.4f} calib {dc[-1]:.4f} mid held {dh[14]:.4f} calib {dc[14]:.4f} {time.time()-t:.0f}s", flush=True)
    json.dump(res, open(Path(__file__).parent / "results" / f"heldout_drift_{bits}_{sys.argv[2]}.json", "w"))
