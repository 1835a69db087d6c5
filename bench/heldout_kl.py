"""Stored chains on the search's held-out draw: the final next-token distribution's KL from the FP
model's and the held-out NLL, per chain. No gradients (``heldout_chains.py`` adds the per-layer
Fisher-weighted error and drift).

Each run is ``label|store|override|...`` (a ``default`` config on that store with those overrides; its
chain is read from the plan, every layer must be in the store). One thread. Prints a table and
writes ``bench/results/heldout_kl.json`` (or ``--out``).

    .venv/bin/python bench/heldout_kl.py --windows 8 "fixed|.loaq/store" \\
        "l29|.loaq/store|quantize.layers={29: {alpha_out: 0.25, beta: 0}}"
"""
import argparse
import json
from pathlib import Path

import torch
torch.set_num_threads(1)
import torch.nn.functional as F  # noqa: E402

from loaq.configs.load import load_config  # noqa: E402
from loaq.data.calibration import sample_holdout  # noqa: E402
from loaq.engine.forward import next_token_log_probs, stream_forward  # noqa: E402
from loaq.flows.plan import plan  # noqa: E402
from loaq.flows.quantize import open_context  # noqa: E402
from loaq.quant import summed_kl  # noqa: E402
from loaq.stages.evaluate import StoredQuantizedWeights  # noqa: E402
from loaq.stages.model import prepare_model  # noqa: E402
from loaq.stages.streams import calibration_spec  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("runs", nargs="+")
ap.add_argument("--windows", type=int, default=8, help="held-out windows (the search's: holdout x n_samples)")
ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "heldout_kl.json"))
args = ap.parse_args()
base = load_config("default", ["evaluation.datasets=[wikitext2]"])
ctx = open_context(base)
model = prepare_model.fn(base.model, ctx.model_cache)
checkpoint = model.open()
held = sample_holdout(checkpoint.tokenizer(), calibration_spec(base.calibration), args.windows, base.data_dir)


def log_probs(hidden):
    return next_token_log_probs(hidden, checkpoint.final_norm_weight(), checkpoint.lm_head_weight(),
                                float(checkpoint.config.rms_norm_eps))


log_p = log_probs(stream_forward(checkpoint, held))
results = {}
print("| chain | KL | held-out NLL |\n| --- | ---: | ---: |")
for spec in args.runs:
    label, store, *overrides = spec.split("|")
    cfg = load_config("default", [f"store.url={store}", *overrides, "evaluation.datasets=[wikitext2]"])
    run_ctx = open_context(cfg)
    chain = plan(run_ctx, cfg, model).chain
    log_q = log_probs(stream_forward(StoredQuantizedWeights(checkpoint, run_ctx.store, chain), held))
    kl = summed_kl(log_p.flatten(0, -2), log_q.flatten(0, -2)) / log_p[..., 0].numel()
    nll = float(F.nll_loss(log_q[:, :-1].reshape(-1, log_q.shape[-1]), held[:, 1:].reshape(-1)))
    results[label] = {"kl": kl, "held_nll": nll, "overrides": overrides}
    print(f"| {label} | {kl:.4f} | {nll:.4f} |", flush=True)
Path(args.out).write_text(json.dumps({"windows": args.windows, "runs": results}, indent=1))
