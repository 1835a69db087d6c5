"""Stage: the zoo report, one table of model x setting -> perplexity, accuracy, time, size.

Read from the store alone: every number of a completed member comes from its records (evaluations,
quantized weights) and its ``zoo-member`` event; a failed member is a row with its reason.

Size is what the quantized decoder linears take at their bit width, computed from the stored
codes' shapes: ``bits`` bits per weight, one 16-bit scale and (asymmetric grids) one ``bits``-bit
zero point per row and group, as a packed checkpoint stores them (compressed-tensors
``pack-quantized`` rounds each row up to whole int32 words; that is not counted). The FP row is the
same linears in fp16. Embeddings, norms and the head are left out: no method here quantizes them,
so they are the same in every row of a model.
"""

from __future__ import annotations

import json
import math
import os

from prefect import task
from prefect.cache_policies import NONE

from .context import StageContext
from .report import PPL_NOTE

#: The event stage under which a zoo member records its outcome (in its own run's log).
ZOO_MEMBER_STAGE = "zoo-member"


def linear_bytes(ctx: StageContext, weight_keys: list[str]) -> tuple[int, int]:
    """(bytes of the quantized linears at their bit width, the same linears' fp16 bytes)."""
    packed = fp16 = 0
    for key in weight_keys:
        record = ctx.store.open(key)
        bits = record.attrs["bits"]
        for name in record.attrs["linears"]:
            if f"{name}.weight" in record:  # 16-bit runs keep the weight itself
                n = math.prod(record.shape(f"{name}.weight"))
                packed, fp16 = packed + 2 * n, fp16 + 2 * n
                continue
            out_features, in_features = (record.attrs["shapes"][name] if "shapes" in record.attrs
                                         else record.shape(f"{name}.codes"))
            groups = math.prod(record.shape(f"{name}.scales"))
            zero_bits = 0 if record.attrs["symmetric"] else bits
            packed += math.ceil(out_features * in_features * bits / 8) + 2 * groups + math.ceil(groups * zero_bits / 8)
            fp16 += 2 * out_features * in_features
    return packed, fp16


def mean_accuracy(ctx: StageContext, key: str | None) -> float | None:
    if key is None:
        return None
    results = ctx.store.open(key).attrs["zero_shot"]
    accs = [r["acc"] for task_name, r in results.items() if task_name != "skipped"]
    return sum(accs) / len(accs) if accs else None


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


@task(name="zoo-report", cache_policy=NONE)
def zoo_report_stage(ctx: StageContext, name: str, report_dir: str, members: list[dict]) -> str:
    """``members``: one dict per member, in zoo order, with ``model``, ``setting``, ``name``,
    ``run_id``, ``status`` ("completed" or "failed"), ``error``, ``seconds`` and, when completed,
    the member's store keys ``weights`` (list), ``evals`` (dataset -> {"fp", "quantized"}) and
    ``zero_shot`` ({"fp", "quantized"}, empty when no task is configured)."""
    rows, fp_rows, labels = [], {}, {}
    for m in members:
        row = {k: m[k] for k in ("model", "setting", "name", "run_id", "status", "error", "seconds")}
        if m["status"] == "completed":
            evals = {d: {w: ctx.store.open(k).attrs for w, k in keys.items()} for d, keys in m["evals"].items()}
            labels.update({d: e["fp"]["label"] for d, e in evals.items()})
            row["ppl"] = {d: e["quantized"]["ppl"] for d, e in evals.items()}
            row["accuracy"] = mean_accuracy(ctx, m["zero_shot"].get("quantized"))
            row["linear_bytes"], fp16 = linear_bytes(ctx, m["weights"])
            if m["model"] not in fp_rows:  # every member of a model has the same FP evaluation
                fp_rows[m["model"]] = {"ppl": {d: e["fp"]["ppl"] for d, e in evals.items()},
                                       "accuracy": mean_accuracy(ctx, m["zero_shot"].get("fp")),
                                       "linear_bytes": fp16}
        rows.append(row)
    datasets = list(labels)
    failed = [r for r in rows if r["status"] != "completed"]

    out_dir = os.path.join(report_dir, f"{name}-zoo")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"name": name, "zoo_run_id": ctx.run_id, "members": rows, "fp": fp_rows,
                   "failed": [r["name"] for r in failed]}, f, indent=1)

    header = ["model", "setting", *(f"{labels[d]} ppl" for d in datasets), "zero-shot acc", "time s",
              "linears MiB", "status"]
    lines = [f"# loaq zoo report: {name}", "",
             f"Zoo run {ctx.run_id}: {len(rows)} members, {len(rows) - len(failed)} completed, {len(failed)} failed.",
             "", "| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(datasets) + 3) + " --- |"]
    shown = set()
    for row in rows:
        if row["model"] in fp_rows and row["model"] not in shown:
            shown.add(row["model"])
            fp = fp_rows[row["model"]]
            lines.append(f"| {row['model']} | FP | " + " | ".join(f"{fp['ppl'][d]:.3f}" for d in datasets)
                         + f" | {_cell(fp['accuracy'], '.4f')} | - | {fp['linear_bytes'] / 2**20:.2f} | |")
        if row["status"] == "completed":
            cells = [f"{row['ppl'][d]:.3f}" for d in datasets]
            cells += [_cell(row["accuracy"], ".4f"), f"{row['seconds']:.1f}", f"{row['linear_bytes'] / 2**20:.2f}",
                      "completed"]
        else:
            cells = ["-"] * (len(datasets) + 3) + [f"failed: {row['error']}".replace("|", "\\|")]
        lines.append(f"| {row['model']} | {row['setting']} | " + " | ".join(cells) + " |")
    lines += ["", PPL_NOTE,
              "zero-shot acc: mean lm-eval accuracy over the configured tasks (- when none are configured).",
              "time s: the member's wall time; the first member of each model also computes the stages its "
              "model's members share (calibration, embeddings, clean stream, FP evaluation), the others reuse them.",
              "linears MiB: the decoder's linear weights at the quantized bit width (codes, 16-bit scales and, "
              "for asymmetric grids, zero points), FP: the same linears in fp16; embeddings, norms and head are "
              "not counted.", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return out_dir
