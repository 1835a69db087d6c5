"""Stage: the run's report (report.md, report.json, plots), rebuilt from the store alone."""

from __future__ import annotations

import json
import os

from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.schema import RunConfig

from .context import StageContext
from .model import ModelRef
from .quantize import weights_key


def collect(ctx: StageContext, chain: list[str], evals: dict) -> dict:
    layers = []
    for index, key in enumerate(chain):
        attrs = ctx.store.open(weights_key(key)).attrs
        layers.append({"layer": index, **attrs.get("divergence", {}), "solver": attrs.get("solver", {})})
    ppl = {}
    for dataset, keys in evals.items():
        ppl[dataset] = {which: ctx.store.open(k).attrs for which, k in keys.items()}
    return {"layers": layers, "perplexity": ppl}


def plot_divergence(layers: list[dict], label: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [row["layer"] for row in layers]
    for ax, field, title in zip(axes, ("mse", "mse_normalized"), ("hidden states", "RMS-normalised hidden states")):
        ax.plot(x, [row[field] for row in layers], marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("MSE vs clean stream (outliers excluded)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@task(name="report", cache_policy=NONE)
def report_stage(ctx: StageContext, config: RunConfig, model: ModelRef, chain: list[str], evals: dict,
                 zero_shot: dict | None = None) -> str:
    data = collect(ctx, chain, evals)
    data["zero_shot"] = {which: ctx.store.open(k).attrs["zero_shot"] for which, k in (zero_shot or {}).items()}
    q = config.quantize
    label = f"{q.method} W{q.bits}" + (f" g{q.group_size}" if q.group_size else "")
    out_dir = os.path.join(config.report_dir, config.name)
    os.makedirs(out_dir, exist_ok=True)
    report = {"name": config.name, "model": config.model.source, "model_key": model.key, "chain": chain[-1],
              "config": json.loads(config.model_dump_json()), **data}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot_divergence(data["layers"], label, os.path.join(out_dir, "divergence.png"))
    lines = [f"# loaq report: {config.name}", "", f"Model `{config.model.source}` ({model.family}, {model.num_layers} layers), "
             f"{label}, calibration {config.calibration.n_samples}x{config.calibration.seqlen} C4 tokens (seed {config.calibration.seed}).",
             "", "| dataset | windows x seqlen | FP ppl | quantized ppl |", "| --- | --- | ---: | ---: |"]
    for dataset, row in data["perplexity"].items():
        fp, qa = row["fp"], row["quantized"]
        lines.append(f"| {fp['label']} | {fp['windows']} x {fp['seqlen']} | {fp['ppl']:.3f} | {qa['ppl']:.3f} |")
    if data["zero_shot"]:
        tasks = [t for t in data["zero_shot"]["fp"] if t != "skipped"]
        lines += ["", "| zero-shot (lm-eval) | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
        for which, res in data["zero_shot"].items():
            cells = [f"{res[t]['acc']:.4f}" + (f" / {res[t]['acc_norm']:.4f}" if res[t].get("acc_norm") is not None else "")
                     for t in tasks]
            lines.append(f"| {which} (acc / acc_norm, n={res[tasks[0]]['n']}) | " + " | ".join(cells) + " |")
        for task, reason in data["zero_shot"]["fp"].get("skipped", {}).items():
            lines.append(f"\nskipped {task}: {reason}")
    lines += ["", "Perplexity is token-level with the GPTQ protocol (non-overlapping windows), not lm-eval's word perplexity.",
              "", "![per-layer divergence](divergence.png)", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return out_dir
