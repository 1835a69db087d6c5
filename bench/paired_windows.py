"""How far apart two stored chains' perplexities must be before the evaluation windows tell them apart.

Each run is ``label|store|override|...`` (a ``default`` config on that store with those overrides; its
perplexity records must be in the store: ``loaq run`` them first). The first run is the reference. For
every other run and dataset: its perplexity, the ratio to the reference's, and a 95% interval of that
ratio from a paired bootstrap over the evaluation windows (both chains scored on the same resampled
windows; the per-window NLLs are the ones the perplexity stage stored). A ratio whose interval holds 1
is a difference the windows do not resolve. Prints a table and writes
``bench/results/paired_windows.json`` (or ``--out``).

    .venv/bin/python bench/paired_windows.py "default|/tmp/st" \\
        "l29 0.25/0|/tmp/st|quantize.layers={29: {alpha_out: 0.25, beta: 0}}" "seed 1|/tmp/st|calibration.seed=1"
"""
import argparse
import json
import math
from pathlib import Path

import torch

from loaq.configs.load import load_config
from loaq.flows.plan import plan
from loaq.flows.quantize import open_context
from loaq.stages.model import prepare_model

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("runs", nargs="+")
ap.add_argument("--resamples", type=int, default=10_000)
ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "paired_windows.json"))
args = ap.parse_args()


def window_nlls(spec: str) -> tuple[str, list[str], dict[str, torch.Tensor]]:
    label, store, *overrides = spec.split("|")
    cfg = load_config("default", [f"store.url={store}", *overrides])
    ctx = open_context(cfg)
    p = plan(ctx, cfg, prepare_model.fn(cfg.model, ctx.model_cache))
    nlls = {}
    for dataset, keys in p.evals.items():
        if not ctx.store.is_complete(keys["quantized"]):
            raise SystemExit(f"{label}: no {dataset} perplexity in {store}; run `loaq run default --set "
                             f"store.url={store} {' '.join('--set ' + repr(o) for o in overrides)}` first")
        nlls[dataset] = ctx.store.open(keys["quantized"]).read("nll").double()
    return label, overrides, nlls


def paired_interval(ref: torch.Tensor, other: torch.Tensor, resamples: int) -> tuple[float, float]:
    """95% percentile interval of exp(mean(other - ref)) over windows resampled with replacement."""
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, ref.numel(), (resamples, ref.numel()), generator=generator)
    ratios = torch.exp((other - ref)[idx].mean(dim=1)).sort().values
    return float(ratios[int(0.025 * resamples)]), float(ratios[int(0.975 * resamples) - 1])


runs = [window_nlls(spec) for spec in args.runs]
ref_label, _, ref = runs[0]
datasets = list(ref)
results = {"reference": ref_label, "resamples": args.resamples, "windows": {d: ref[d].numel() for d in datasets},
           "runs": {}}
print("| chain | " + " | ".join(f"{d} ppl | ratio | 95% interval" for d in datasets) + " |")
print("| --- |" + " ---: | ---: | --- |" * len(datasets))
for label, overrides, nlls in runs:
    row, cells = {"overrides": overrides}, []
    for d in datasets:
        ppl, ratio = math.exp(float(nlls[d].mean())), math.exp(float((nlls[d] - ref[d]).mean()))
        low, high = paired_interval(ref[d], nlls[d], args.resamples)
        row[d] = {"ppl": ppl, "ratio": ratio, "interval": [low, high], "resolved": not low <= 1.0 <= high}
        cells.append(f"{ppl:.3f} | {ratio:.4f} | {low:.4f}-{high:.4f}{'' if low <= 1.0 <= high else ' *'}")
    results["runs"][label] = row
    print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
Path(args.out).write_text(json.dumps(results, indent=1))
