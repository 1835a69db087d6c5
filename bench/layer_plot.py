"""Per-layer drift of the quantized stream for several variants in one picture (paper, Fig. 4).

Reads the store only (nothing is computed): for each variant of the default config it finds the
layer records by their keys and plots the clean-vs-quantized MSE, raw and RMS-normalised, outlier
tokens excluded, one line per variant.

    .venv/bin/python bench/layer_plot.py --bits 3 --methods rtn gptq loaq
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loaq.configs.load import load_config
from loaq.flows.plan import plan
from loaq.flows.quantize import open_context

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="default")
    ap.add_argument("--store", default=".loaq/bench-store")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "loaq"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides, as for loaq run")
    args = ap.parse_args()
    out = Path(args.out or RESULTS / f"layers_w{args.bits}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    data = {}
    for method in args.methods:
        config = load_config(args.config, [*args.overrides, f"store.url={args.store}", f"quantize.method={method}", f"quantize.bits={args.bits}"])
        ctx = open_context(config)
        p = plan(ctx, config)
        if not all(ctx.store.is_complete(k) for k in p.weights):
            print(f"{method} W{args.bits}: not in the store, skipped")
            continue
        rows = [ctx.store.open(k).attrs["divergence"] for k in p.weights]
        data[method] = rows
        for ax, field in zip(axes, ("mse", "mse_normalized")):
            ax.plot(range(len(rows)), [r[field] for r in rows], marker="o", ms=3, label=f"{method} W{args.bits}")
    for ax, title in zip(axes, ("hidden states", "RMS-normalised hidden states")):
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("MSE vs clean stream (outliers excluded)")
        ax.set_title(f"SmolLM2-135M W{args.bits}: {title}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    if "gptq" in data and "loaq" in data:
        below = sum(l["mse_normalized"] < g["mse_normalized"] for l, g in zip(data["loaq"], data["gptq"]))
        print(f"LoaQ's normalised MSE is below GPTQ's in {below} of {len(data['loaq'])} layers")
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
