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
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402

from loaq.configs.load import load_config  # noqa: E402
from loaq.flows.quantize import open_context, quantize_flow  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# (method, bits, act_order)
GRIDS = {
    "default": [(m, 3, False) for m in ("rtn", "gptq", "lloa", "lloa_soa", "loaq")]
    + [("rtn", 4, False), ("gptq", 4, False), ("gptq", 4, True), ("loaq", 4, False), ("loaq", 4, True)]
    + [(m, 16, False) for m in ("gptq", "loaq")],
    "w3": [(m, 3, False) for m in ("rtn", "gptq", "loaq")],
    # The rows the engine's acceptance needs, in the order they are most informative.
    "core": [("rtn", 3, False), ("gptq", 3, False), ("loaq", 3, False), ("rtn", 4, False), ("gptq", 4, False),
             ("gptq", 4, True), ("loaq", 4, False), ("gptq", 16, False), ("loaq", 16, False)],
    "ablation": [(m, 3, False) for m in ("lloa", "lloa_soa")],
    # The paper's comparison (its Tables 1-3): GPTQ, GPTAQ, Qronos and LoaQ, channel-wise; GPTQ first
    # at each width, so that the others' cost is measured against it in the same run.
    "baselines": [(m, bits, False) for bits in (2, 3, 4) for m in ("gptq", "gptaq", "qronos", "loaq")],
}
# Grids whose table is written next to, not over, the main quality table.
SEPARATE_TABLES = {"baselines"}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def add_cost_ratios(rows: list[dict]) -> None:
    """quantize_ratio_to_gptq: quantize seconds over those of the GPTQ row with the same bits and act-order,
    both computed (not reused) in this run; None otherwise."""
    gptq = {(r["bits"], r["act_order"]): r for r in rows if r["method"] == "gptq" and r.get("quantize_computed")}
    for r in rows:
        base = gptq.get((r["bits"], r["act_order"]))
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
    ap.add_argument("--append", action="store_true", help="add rows to the existing table instead of replacing it")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(RESULTS / (f"quality_{args.grid}" if args.grid in SEPARATE_TABLES else "quality"))
    if args.fresh:
        args.store = f"{args.store.rstrip('/')}-{time.strftime('%Y%m%d-%H%M%S')}"

    rows = []
    fp = None
    previous = Path(args.out).with_suffix(".json")
    if args.append and previous.is_file():
        rows = json.loads(previous.read_text())["rows"]
    this_run = []  # cost ratios only within this invocation
    for method, bits, act_order in GRIDS[args.grid]:
        config = load_config(args.config, [*args.overrides, f"store.url={args.store}", f"quantize.method={method}",
                                           f"quantize.bits={bits}", f"quantize.act_order={str(act_order).lower()}",
                                           f"name=bench-{method}-w{bits}{'-act' if act_order else ''}"])
        started = time.perf_counter()
        result = quantize_flow(config)
        wall = time.perf_counter() - started
        store = open_context(config).store
        events = store.events(result["run_id"])
        layers = [e for e in events if e["stage"] == "quantize-layer"]
        quant_s = sum(e.get("seconds") or 0 for e in layers if e["action"] == "computed")
        ppl = {d: store.open(k["quantized"]).attrs["ppl"] for d, k in result["evals"].items()}
        fp = {d: store.open(k["fp"]).attrs for d, k in result["evals"].items()}
        row = {"method": method, "bits": bits, "act_order": act_order, "ppl": ppl,
               "quantize_seconds": round(quant_s, 1), "wall_seconds": round(wall, 1),
               "quantize_computed": bool(layers) and all(e["action"] == "computed" for e in layers),
               "run_id": result["run_id"]}
        rows.append(row)
        this_run.append(row)
        print(json.dumps(row), flush=True)
    add_cost_ratios(this_run)

    q = config.quantize
    cal = config.calibration
    datasets = list(fp)
    header = (f"SmolLM2-135M-Instruct (embedded GGUF, dequantized to fp32), channel-wise asymmetric weights, "
              f"calibration {cal.n_samples}x{cal.seqlen} tokens from the C4 train prefix (seed {cal.seed}), "
              f"evaluation: " + ", ".join(f"{fp[d]['label']} {fp[d]['windows']}x{fp[d]['seqlen']}" for d in datasets)
              + f" (GPTQ protocol, token perplexity); LoaQ alpha_in={q.alpha_in} alpha_out={q.alpha_out} beta={q.beta}; "
              f"GPTAQ alpha={q.gptaq_alpha}; Qronos with the clean stream restarted at every decoder layer; "
              f"damping percdamp={q.percdamp} for all; "
              f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, commit {commit()}, {time.strftime('%Y-%m-%d')}")
    lines = [f"_{header}_", "", "| method | bits | act-order | " + " | ".join(f"{d} ppl" for d in datasets)
             + " | quantize s | x GPTQ |", "| --- | ---: | --- | " + " | ".join("---:" for _ in datasets) + " | ---: | ---: |",
             "| FP | 32 | - | " + " | ".join(f"{fp[d]['ppl']:.2f}" for d in datasets) + " | - | - |"]
    for r in rows:
        ratio = r.get("quantize_ratio_to_gptq")
        lines.append(f"| {r['method']} | {r['bits']} | {'yes' if r['act_order'] else 'no'} | "
                     + " | ".join(f"{r['ppl'][d]:.2f}" for d in datasets) + f" | {r['quantize_seconds']} | "
                     + ("-" if ratio is None else f"{ratio:.2f}") + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"protocol": header, "fp": {d: fp[d]["ppl"] for d in datasets}, "rows": rows,
         "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__}, "commit": commit()}, indent=1))


if __name__ == "__main__":
    main()
