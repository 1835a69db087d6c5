"""Does the error weighted by the loss gradient (Fisher diagonal) rank fixed (alpha, beta) pairs as KL does?

The full-precision model's NLL gradient at each decoder layer's output on the 8 held-out windows of
the search (``data.calibration.sample_holdout``), one backward pass; then for each pair
(alpha_in = alpha_out = alpha, SmolLM2 quantized in memory on the default calibration) both
streams over those windows, and per layer sum (g * (h_hat - h))^2 ("fisher_diag") and the sum over
tokens of (g . (h_hat - h))^2 ("first_order_sq"). One thread. Writes
``bench/results/heldout_fisher_<bits>_<first pair>.json``; compare with ``heldout_drift_*.json``.

    .venv/bin/python bench/heldout_fisher.py 3 0.5,0.25 0.75,0.5 0.5,0
"""
import json
import sys
import time
from pathlib import Path

import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from loaq.configs.load import load_config
from loaq.flows.quantize import open_context
from loaq.stages.model import prepare_model
from loaq.stages.streams import calibration_spec
from loaq.data.calibration import sample_calibration, sample_holdout
from loaq.engine.model import quantize_model
from loaq.engine.arrays import MemoryArray
from loaq.engine.forward import embed, forward_layer
from loaq.models.layers import ContextFactory

bits = int(sys.argv[1]); pairs = [tuple(map(float, p.split(','))) for p in sys.argv[2:]]
config = load_config("default", ["store.url=.loaq/bench-heldout-fisher"])
ctx = open_context(config); model = prepare_model.fn(config.model, ctx.model_cache)
ck = model.open(); tok = ck.tokenizer()
spec = calibration_spec(config.calibration)
calib = sample_calibration(tok, spec, config.data_dir)
held = sample_holdout(tok, spec, 8, config.data_dir)
hf = AutoModelForCausalLM.from_pretrained(ck.path, torch_dtype=torch.float32)
grads = {}
for i, layer in enumerate(hf.model.layers):
    def f(mod, inp, out, i=i):
        h = out[0] if isinstance(out, tuple) else out
        h.register_hook(lambda g: grads.__setitem__(i, g.detach().clone()))
    layer.register_forward_hook(f)
out = hf(held, labels=held)
(out.loss * held.numel()).backward()
contexts = ContextFactory(ck.adapter, ck.config, "cpu")
def stream(source, tokens):
    h = MemoryArray(embed(source, tokens)); outs = []
    for i in range(source.num_layers):
        o = MemoryArray(shape=h.shape, dtype=torch.float32); forward_layer(source, i, h, o, contexts); outs.append(o.tensor); h = o
    return outs
clean = stream(ck, held)
res = {}
for a, b in pairs:
    t = time.time()
    r = quantize_model(ck, calib, config.quantize.model_copy(update={"bits": bits, "alpha_in": a, "alpha_out": a, "beta": b}))
    q = stream(r.quantized_source(ck), held)
    diag = [float(((grads[i] * (q[i] - clean[i])) ** 2).sum()) for i in range(len(q))]
    tok1 = [float(((grads[i] * (q[i] - clean[i])).sum(-1) ** 2).sum()) for i in range(len(q))]
    res[f"{a},{b}"] = {"fisher_diag": diag, "first_order_sq": tok1}
    print(a, b, "diag@5,10,15,20,25,29", [f"{diag[i]:.3g}" for i in (5,10,15,20,25,29)], "tok1", [f"{tok1[i]:.3g}" for i in (5,10,15,20,25,29)], f"{time.time()-t:.0f}s", flush=True)
    json.dump(res, open(Path(__file__).parent / "results" / f"heldout_fisher_{bits}_{sys.argv[2]}.json", "w"))
