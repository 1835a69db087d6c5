"""Quality table on the embedded SmolLM2-135M: perplexity per method x bits (x act-order).

Every variant runs through the real pipeline (``quantize_flow``) on one store, so calibration,
embeddings, the clean stream and the FP evaluation are computed once and shared. Prints a markdown
table and writes ``bench/results/quality.json`` and ``bench/results/quality.md``
(``quality_<grid>.*`` for the baselines grid).

Each row's ``quantize s`` is the time of the quantization stages this run computed, and
``x GPTQ`` its ratio to the GPTQ row of the same bits and act-order *of the same run* ("-" when
either was reused from the store: use ``--fresh`` to time every variant).

    .venv/bin/python bench/quality.py                      # the default grid (see GRIDS)
    .venv/bin/python bench/quality.py --grid w3 --set calibration.n_samples=64
    .venv/bin/python bench/quality.py --grid baselines --fresh   # GPTQ, GPTAQ, Qronos, LoaQ at W2/W3/W4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402

from loaq.configs.load import load_config  # noqa: E402
from loaq.flows.quantize import open_context, quantize_flow  # noqa: E402
from loaq.stages.context import Runtime  # noqa: E402

RESULTS = Path(__file__).parent / "results"

@dataclass(frozen=True)
class Variant:
    """One row of a quality table: a method at a width, channel-wise unless ``group`` is set, in a
    named ``setting`` (a set of config overrides from SETTINGS, "" for plain weight quantization)."""

    method: str
    bits: int
    act_order: bool = False
    group: int | None = None
    setting: str = ""

    def overrides(self) -> list[str]:
        return [f"quantize.method={self.method}", f"quantize.bits={self.bits}",
                f"quantize.act_order={str(self.act_order).lower()}",
                f"quantize.group_size={self.group if self.group else 'null'}", *SETTINGS[self.setting]]

    def name(self) -> str:
        parts = [self.method, f"w{self.bits}", f"g{self.group}" if self.group else "", "act" if self.act_order else "",
                 self.setting.replace("+", "-")]
        return "bench-" + "-".join(p for p in parts if p)

    def baseline(self) -> tuple:
        """What the 'x GPTQ' ratio compares against: the GPTQ row of the same width, grouping and setting."""
        return (self.bits, self.act_order, self.group, self.setting)


# Named settings: config overrides that combine with every method.
SETTINGS: dict[str, tuple[str, ...]] = {
    "": (),
    "hadamard": ("model.rotation.kind=hadamard",),  # QuaRot rotation of the residual stream and down_proj input
    "neuqi": ("quantize.grid_init=neuqi",),  # NeUQI's (scale, zero point) instead of min-max
    "hadamard+neuqi": ("model.rotation.kind=hadamard", "quantize.grid_init=neuqi"),
    "w4a4": ("quantize.act_bits=4",),  # activations of every quantized linear: 4-bit, per token, dynamic
    "hadamard+w4a4": ("model.rotation.kind=hadamard", "quantize.act_bits=4"),
}
_PAPER_METHODS = ("gptq", "loaq", "gptaq", "qronos")

_METHODS = ("gptq", "rtn", "loaq", "gptaq", "qronos", "lloa", "lloa_soa")


def _rows(methods, widths, **kw) -> list[Variant]:
    return [Variant(m, b, **kw) for b in widths for m in methods]


GRIDS: dict[str, list[Variant]] = {
    "default": _rows(("rtn", "gptq", "lloa", "lloa_soa", "loaq"), (3,))
    + [Variant("rtn", 4), Variant("gptq", 4), Variant("gptq", 4, True), Variant("loaq", 4), Variant("loaq", 4, True)]
    + _rows(("gptq", "loaq"), (16,)),
    "w3": _rows(("rtn", "gptq", "loaq"), (3,)),
    # The rows the engine's acceptance needs, in the order they are most informative.
    "core": [Variant("rtn", 3), Variant("gptq", 3), Variant("loaq", 3), Variant("rtn", 4), Variant("gptq", 4),
             Variant("gptq", 4, True), Variant("loaq", 4), Variant("gptq", 16), Variant("loaq", 16)],
    "ablation": _rows(("lloa", "lloa_soa"), (3,)),
    # The paper's comparison (its Tables 1-3): GPTQ, GPTAQ, Qronos and LoaQ, channel-wise; GPTQ first
    # at each width, so that the others' cost is measured against it in the same run.
    "baselines": _rows(("gptq", "gptaq", "qronos", "loaq"), (2, 3, 4)),
    # What `bench/run` regenerates: every method and the ablation at W3, W4, W2 channel-wise, then
    # GPTQ and LoaQ with groups of 128 columns (GPTQ first in each block).
    "bench": _rows(_METHODS, (3, 4, 2)) + _rows(("gptq", "loaq"), (3, 4, 2), group=128),
    # Zero-shot accuracy (run with evaluation.zero_shot_tasks set) for the widths where the models
    # still answer better than chance.
    "zeroshot": _rows(("gptq", "loaq"), (4, 3)),
    # The paper's other settings (its Tables 2-4): rotation and grid initialisation at W3/W2, W4A4
    # with and without rotation; also runnable one setting family at a time.
    "rotation": _rows(_PAPER_METHODS, (3, 2), setting="hadamard"),
    "neuqi": [v for s in ("neuqi", "hadamard+neuqi") for v in _rows(_PAPER_METHODS, (3, 2), setting=s)],
    "w4a4": [v for s in ("w4a4", "hadamard+w4a4") for v in _rows(_PAPER_METHODS, (4,), setting=s)],
    # NeUQI's search costs ~2 CPU-minutes per SmolLM2 model: GPTQ and LoaQ at W3 only, for short runs.
    "neuqi-w3": [v for s in ("neuqi", "hadamard+neuqi") for v in _rows(("gptq", "loaq"), (3,), setting=s)],
}
# Every setting, GPTQ against LoaQ (what `bench/run` regenerates): rotation and NeUQI's grid at W3, and
# W4A4 with rotation (the paper's W4A4 setting, QuaRot's). The other baselines, W2, rotation with NeUQI
# and W4A4 without rotation (which wrecks every method here): settings-full.
GRIDS["settings"] = ([v for s in ("hadamard", "neuqi") for v in _rows(("gptq", "loaq"), (3,), setting=s)]
                     + _rows(("gptq", "loaq"), (4,), setting="hadamard+w4a4"))
GRIDS["settings-full"] = GRIDS["rotation"] + GRIDS["neuqi"] + GRIDS["w4a4"]

# Grids whose table is written next to, not over, the main quality table.
SEPARATE_TABLES = {"baselines", "bench", "zeroshot", "settings", "settings-full", "rotation", "neuqi", "w4a4", "neuqi-w3"}


def runtime_label(config) -> str:
    """The device and the dtype the forwards and evaluations ran in, as the stages resolve them
    (statistics are float32 products in float64 sums, solves float32/float64, whatever it is)."""
    rt = Runtime.resolve(config.runtime)
    device = "CPU" if rt.device == "cpu" else rt.device
    return f"{device}, forwards in {str(rt.dtype).removeprefix('torch.')}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def accuracies(summary: dict) -> dict[str, float]:
    """task -> acc_norm where the task defines it (ARC, HellaSwag, PIQA), else acc (WinoGrande)."""
    return {t: (v["acc_norm"] if v.get("acc_norm") is not None else v["acc"])
            for t, v in summary.items() if t != "skipped"}


def baseline_of(row: dict) -> tuple:
    return (row["bits"], row["act_order"], row.get("group"), row.get("setting", ""))


def add_cost_ratios(rows: list[dict]) -> None:
    """quantize_ratio_to_gptq: quantize seconds over those of the GPTQ row with the same width, act-order,
    grouping and setting, both computed (not reused) in this run; None otherwise."""
    gptq = {baseline_of(r): r for r in rows if r["method"] == "gptq" and r.get("quantize_computed")}
    for r in rows:
        base = gptq.get(baseline_of(r))
        ok = base is not None and r.get("quantize_computed") and base["quantize_seconds"] > 0
        r["quantize_ratio_to_gptq"] = round(r["quantize_seconds"] / base["quantize_seconds"], 3) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="default", choices=sorted(GRIDS))
    ap.add_argument("--config", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--store", default=".loaq/bench-store")
    ap.add_argument("--fresh", action="store_true",
                    help="use a new empty store next to --store, so that every variant is computed and timed")
    ap.add_argument("--out", default=None, help="output path without suffix (default bench/results/quality[_GRID])")
    ap.add_argument("--append", action="store_true",
                    help="add rows to the existing table instead of replacing it; variants already in it are skipped")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(RESULTS / (f"quality_{args.grid}" if args.grid in SEPARATE_TABLES else "quality"))
    if args.fresh:
        args.store = f"{args.store.rstrip('/')}-{time.strftime('%Y%m%d-%H%M%S')}"

    rows = []
    fp, fp_zero_shot = None, {}
    previous = Path(args.out).with_suffix(".json")
    if args.append and previous.is_file():
        rows = json.loads(previous.read_text())["rows"]
    this_run = []  # cost ratios only within this invocation
    in_table = {(r["method"], r["bits"], r["act_order"], r.get("group"), r.get("setting", "")) for r in rows}
    for variant in GRIDS[args.grid]:
        if (variant.method, variant.bits, variant.act_order, variant.group, variant.setting) in in_table:
            print(f"{variant.name()}: already in {previous}, kept", flush=True)
            continue
        config = load_config(args.config, [*args.overrides, f"store.url={args.store}", *variant.overrides(),
                                           f"name={variant.name()}"])
        started = time.perf_counter()
        result = quantize_flow(config)
        wall = time.perf_counter() - started
        store = open_context(config).store
        events = store.events(result["run_id"])
        layers = [e for e in events if e["stage"] == "quantize-layer"]
        quant_s = sum(e.get("seconds") or 0 for e in layers if e["action"] == "computed")
        ppl = {d: store.open(k["quantized"]).attrs["ppl"] for d, k in result["evals"].items()}
        fp = {d: store.open(k["fp"]).attrs for d, k in result["evals"].items()}
        if result["zero_shot"]:
            fp_zero_shot = accuracies(store.open(result["zero_shot"]["fp"]).attrs["zero_shot"])
        row = {"method": variant.method, "bits": variant.bits, "act_order": variant.act_order, "group": variant.group,
               "setting": variant.setting, "ppl": ppl,
               "quantize_seconds": round(quant_s, 1), "wall_seconds": round(wall, 1),
               "quantize_computed": bool(layers) and all(e["action"] == "computed" for e in layers),
               "run_id": result["run_id"]}
        if result["zero_shot"]:
            row["zero_shot"] = accuracies(store.open(result["zero_shot"]["quantized"]).attrs["zero_shot"])
        rows.append(row)
        this_run.append(row)
        print(json.dumps(row), flush=True)
    if not this_run and args.append:
        print(f"every variant of grid {args.grid!r} is already in {previous}; table left as it is")
        return
    add_cost_ratios(this_run)

    q = config.quantize
    cal = config.calibration
    datasets = list(fp)
    header = (f"SmolLM2-135M-Instruct (embedded GGUF, dequantized to fp32), asymmetric weights (channel-wise unless a group size is given), "
              f"calibration {cal.n_samples}x{cal.seqlen} tokens from the C4 train prefix (seed {cal.seed}), "
              f"evaluation: " + ", ".join(f"{fp[d]['label']} {fp[d]['windows']}x{fp[d]['seqlen']}" for d in datasets)
              + f" (GPTQ protocol, token perplexity); LoaQ alpha_in={q.alpha_in} alpha_out={q.alpha_out} beta={q.beta}; "
              f"GPTAQ alpha={q.gptaq_alpha}; Qronos with the clean stream restarted at every decoder layer; "
              f"damping percdamp={q.percdamp} for all; "
              f"{runtime_label(config)}, {torch.get_num_threads()} threads, torch {torch.__version__}, commit {commit()}, "
              f"{time.strftime('%Y-%m-%d')}")
    tasks = sorted({t for r in rows for t in r.get("zero_shot", {}) if t != "mean"})
    if tasks:
        ev = config.evaluation
        header += (f"; zero-shot (lm-eval, 0-shot, acc_norm where defined, else acc): first "
                   f"{ev.zero_shot_limit or 'all'} items of each task")
        if ev.zero_shot_limit:
            # binomial standard error, at its largest (accuracy 50%)
            header += (f" (standard error up to {50 / ev.zero_shot_limit ** 0.5:.1f} points per task, "
                       f"{50 / (ev.zero_shot_limit * len(tasks)) ** 0.5:.1f} for the mean)")
        # the mean over the tasks, where a model has every one of them
        for accs in (fp_zero_shot, *(r["zero_shot"] for r in rows if "zero_shot" in r)):
            present = [accs[t] for t in tasks if accs.get(t) is not None]
            accs["mean"] = sum(present) / len(tasks) if len(present) == len(tasks) else None
        tasks = [*tasks, "mean"]
    cell = lambda acc: "-" if acc is None else f"{100 * acc:.1f}"
    lines = [f"_{header}_", "", "| method | bits | group | setting | act-order | "
             + " | ".join([*(f"{d} ppl" for d in datasets), *tasks]) + " | quantize s | x GPTQ |",
             "| --- | ---: | ---: | --- | --- | " + " | ".join("---:" for _ in [*datasets, *tasks]) + " | ---: | ---: |",
             "| FP | 32 | - | - | - | " + " | ".join([*(f"{fp[d]['ppl']:.2f}" for d in datasets),
                                                     *(cell(fp_zero_shot.get(t)) for t in tasks)]) + " | - | - |"]
    for r in rows:
        ratio = r.get("quantize_ratio_to_gptq")
        zs = r.get("zero_shot", {})
        lines.append(f"| {r['method']} | {r['bits']} | {r.get('group') or 'channel'} | {r.get('setting') or '-'} | "
                     f"{'yes' if r['act_order'] else 'no'} | "
                     + " | ".join([*(f"{r['ppl'][d]:.2f}" for d in datasets), *(cell(zs.get(t)) for t in tasks)])
                     + f" | {r['quantize_seconds']} | " + ("-" if ratio is None else f"{ratio:.2f}") + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"protocol": header, "fp": {d: fp[d]["ppl"] for d in datasets}, "fp_zero_shot": fp_zero_shot, "rows": rows,
         "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__}, "commit": commit()}, indent=1))


if __name__ == "__main__":
    main()
