"""Stage: reports (report.md, report.json, PNG plots), rebuilt from the store alone.

Two kinds: a run's report (one variant, with any RTN/GPTQ baselines of the same model, calibration
and bits that the store holds drawn beside it) and a sweep's report (every variant of a sweep: a
perplexity table, the alpha x beta heatmap, one drift line per variant).
"""

from __future__ import annotations

import json
import os

from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.schema import QuantizeConfig, RunConfig

from .context import StageContext
from .model import ModelRef
from .plots import plot_divergence, plot_heatmaps, plot_strengths
from .keys import weights_key


def variant_label(q: QuantizeConfig, with_terms: bool = False) -> str:
    label = f"{q.method} {q.scheme}" + (f" g{q.group_size}" if q.group_size else "")
    label += " neuqi" if q.grid_init == "neuqi" else ""
    if q.search is not None:
        return label + " search"
    if with_terms and any(q.terms):
        alpha_in, alpha_out, beta = q.alphas_beta()
        alpha = f"{alpha_in:g}" if alpha_in == alpha_out else f"{alpha_in:g}/{alpha_out:g}"
        label += f" a={alpha}" + (f" b={beta:g}" if q.terms.soa else "")
    return label + (" per-layer" if q.layers and any(q.terms) else "")


def layer_rows(ctx: StageContext, chain: list[str]) -> list[dict]:
    """Per layer of ``chain``: its drift, solver record and strengths (from its weights record)."""
    return weights_rows(ctx, [weights_key(key) for key in chain])


def weights_rows(ctx: StageContext, weights: list[str]) -> list[dict]:
    rows = []
    for index, key in enumerate(weights):
        attrs = ctx.store.open(key).attrs
        rows.append({"layer": index, **attrs.get("divergence", {}), "solver": attrs.get("solver", {}),
                     **({"strengths": attrs["strengths"]} if "strengths" in attrs else {})})
    return rows


def perplexities(ctx: StageContext, evals: dict) -> dict:
    return {dataset: {which: ctx.store.open(k).attrs for which, k in keys.items()} for dataset, keys in evals.items()}


def model_name(config: RunConfig) -> str:
    return os.path.basename(config.model.source.rstrip("/")).removeprefix("embedded:")


def _header(config: RunConfig, model: ModelRef) -> str:
    c = config.calibration
    r = config.model.rotation
    rotation = f", Hadamard-rotated (seed {r.seed})" if r.kind == "hadamard" else ""
    return (f"Model `{config.model.source}` ({model.family}, {model.num_layers} layers{rotation}); calibration "
            f"{c.n_samples}x{c.seqlen} C4 tokens (seed {c.seed}).")


PPL_NOTE = "Perplexity is token-level with the GPTQ protocol (non-overlapping windows), not lm-eval's word perplexity."


@task(name="report", cache_policy=NONE)
def report_stage(ctx: StageContext, config: RunConfig, model: ModelRef, chain: list[str], evals: dict,
                 zero_shot: dict | None = None, baselines: dict[str, list[str]] | None = None) -> str:
    """``baselines``: label -> chain keys of other variants on the same model and calibration, drawn
    beside this one in the drift plot when the store has all their layers."""
    label = variant_label(config.quantize)
    series = {label: layer_rows(ctx, chain)}
    for other, other_chain in (baselines or {}).items():
        if all(ctx.store.is_complete(weights_key(k)) for k in other_chain):
            series[other] = layer_rows(ctx, other_chain)
    data = {"layers": series[label], "baselines": {k: v for k, v in series.items() if k != label},
            "perplexity": perplexities(ctx, evals),
            "zero_shot": {which: ctx.store.open(k).attrs["zero_shot"] for which, k in (zero_shot or {}).items()}}
    out_dir = os.path.join(config.report_dir, config.name)
    os.makedirs(out_dir, exist_ok=True)
    report = {"name": config.name, "model": config.model.source, "model_key": model.key, "chain": chain[-1],
              "config": json.loads(config.model_dump_json()), **data}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot_divergence(series, os.path.join(out_dir, "divergence.png"), title=f"{model_name(config)} {label}")
    lines = [f"# loaq report: {config.name}", "", _header(config, model) + f" Quantized: {variant_label(config.quantize, True)}.",
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
        for name, reason in data["zero_shot"]["fp"].get("skipped", {}).items():
            lines.append(f"\nskipped {name}: {reason}")
    lines += ["", PPL_NOTE, "", "Per-layer drift of the quantized stream"
              + (f" (with {', '.join(data['baselines'])} from the same store)" if data["baselines"] else "") + ":",
              "", "![per-layer divergence](divergence.png)", ""]
    for other, rows in data["baselines"].items():
        below = sum(a["mse_normalized"] < b["mse_normalized"] for a, b in zip(data["layers"], rows))
        lines.append(f"- normalised MSE below {other}'s in {below} of {len(rows)} layers")
    q = config.quantize
    if (q.search or q.layers) and all("strengths" in row for row in data["layers"]):
        plot_strengths(data["layers"], os.path.join(out_dir, "strengths.png"), title=model_name(config))
        how = "chosen by the search on held-out calibration windows" if q.search else "as configured"
        lines += ["", f"Strengths per layer ({how}):", "", "![strengths per layer](strengths.png)", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return out_dir


@task(name="sweep-report", cache_policy=NONE)
def sweep_report_stage(ctx: StageContext, config: RunConfig, model: ModelRef, variants: list[dict]) -> str:
    """``variants``: one dict per variant with ``quantize`` (QuantizeConfig), ``chain`` (keys) and
    ``evals`` (dataset -> {"fp", "quantized"} keys), all complete in the store."""
    out_dir = os.path.join(config.report_dir, f"{config.name}-sweep")
    os.makedirs(out_dir, exist_ok=True)
    rows, series = [], {}
    for v in variants:
        q: QuantizeConfig = v["quantize"]
        alpha_in, alpha_out, beta = q.alphas_beta()
        label = variant_label(q, True)
        series[label] = layer_rows(ctx, v["chain"])
        ppl = perplexities(ctx, v["evals"])
        rows.append({"label": label, "method": q.method, "bits": q.bits, "group_size": q.group_size,
                     "alpha_in": alpha_in, "alpha_out": alpha_out, "beta": beta, "chain": v["chain"][-1],
                     "ppl": {d: r["quantized"]["ppl"] for d, r in ppl.items()},
                     "fp_ppl": {d: r["fp"]["ppl"] for d, r in ppl.items()},
                     "dataset_labels": {d: r["fp"]["label"] for d, r in ppl.items()},
                     "mean_mse_normalized": sum(r["mse_normalized"] for r in series[label]) / len(series[label])})
    datasets = list(rows[0]["ppl"])
    labels = rows[0]["dataset_labels"]

    # alpha x beta heatmaps: one per (method, bits, group) that varies alpha or beta.
    panels = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["bits"], row["group_size"]), []).append(row)
    for (method, bits, group), members in groups.items():
        alphas = sorted({r["alpha_in"] for r in members})
        betas = sorted({r["beta"] for r in members})
        if len(members) > 1 and (len(alphas) > 1 or len(betas) > 1):
            d = datasets[0]
            panels.append({"title": f"{method} W{bits}" + (f" g{group}" if group else "") + f": {labels[d]} ppl",
                           "alphas": alphas, "betas": betas, "ppl": {(r["alpha_in"], r["beta"]): r["ppl"][d] for r in members}})
    if panels:
        plot_heatmaps(panels, os.path.join(out_dir, "heatmap.png"))
    plot_divergence(series, os.path.join(out_dir, "divergence.png"), title=f"{model_name(config)} sweep")

    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"name": f"{config.name}-sweep", "model": config.model.source, "model_key": model.key,
                   "variants": rows, "layers": series}, f, indent=1)
    best = {d: min(rows, key=lambda r: r["ppl"][d]) for d in datasets}
    lines = [f"# loaq sweep report: {config.name}", "", _header(config, model), "",
             "| variant | " + " | ".join(f"{labels[d]} ppl" for d in datasets) + " | mean normalised MSE |",
             "| --- |" + " ---: |" * (len(datasets) + 1),
             "| FP | " + " | ".join(f"{rows[0]['fp_ppl'][d]:.3f}" for d in datasets) + " | 0 |"]
    for row in rows:
        cells = [(f"**{row['ppl'][d]:.3f}**" if best[d] is row else f"{row['ppl'][d]:.3f}") for d in datasets]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {row['mean_mse_normalized']:.3e} |")
    lines += ["", PPL_NOTE + " Best per dataset in bold.", ""]
    if panels:
        lines += ["alpha x beta (alpha_in = alpha_out):", "", "![alpha x beta heatmap](heatmap.png)", ""]
    lines += ["Per-layer drift of the quantized stream, one line per variant:", "",
              "![per-layer divergence](divergence.png)", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return out_dir
