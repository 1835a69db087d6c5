"""Quality table on the embedded SmolLM2-135M: perplexity per method x bits (x act-order).

Every variant runs through the real pipeline (``quantize_flow``) on one store, so calibration,
embeddings, the clean stream and the FP evaluation are computed once and shared. Prints a markdown
table and writes ``bench/results/quality.json`` and ``bench/results/quality.md``.

    .venv/bin/python bench/quality.py                      # the default grid (see GRIDS)
    .venv/bin/python bench/quality.py --grid w3 --set calibration.n_samples=64
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
    # What `bench/run` regenerates: every method at W2, W3, W4, the ablation at W3.
    "bench": [(m, b, False) for b in (3, 4, 2) for m in ("rtn", "gptq", "loaq")]
    + [(m, 3, False) for m in ("lloa", "lloa_soa")],
}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="default", choices=sorted(GRIDS))
    ap.add_argument("--config", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--store", default=".loaq/bench-store")
    ap.add_argument("--out", default=str(RESULTS / "quality"))
    ap.add_argument("--append", action="store_true", help="add rows to the existing table instead of replacing it")
    args = ap.parse_args()

    rows = []
    fp = None
    previous = Path(args.out).with_suffix(".json")
    if args.append and previous.is_file():
        rows = json.loads(previous.read_text())["rows"]
    for method, bits, act_order in GRIDS[args.grid]:
        config = load_config(args.config, [*args.overrides, f"store.url={args.store}", f"quantize.method={method}",
                                           f"quantize.bits={bits}", f"quantize.act_order={str(act_order).lower()}",
                                           f"name=bench-{method}-w{bits}{'-act' if act_order else ''}"])
        started = time.perf_counter()
        result = quantize_flow(config)
        wall = time.perf_counter() - started
        store = open_context(config).store
        events = store.events(result["run_id"])
        quant_s = sum(e.get("seconds") or 0 for e in events if e["stage"] == "quantize-layer" and e["action"] == "computed")
        ppl = {d: store.open(k["quantized"]).attrs["ppl"] for d, k in result["evals"].items()}
        fp = {d: store.open(k["fp"]).attrs for d, k in result["evals"].items()}
        row = {"method": method, "bits": bits, "act_order": act_order, "ppl": ppl,
               "quantize_seconds": round(quant_s, 1), "wall_seconds": round(wall, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    q = config.quantize
    cal = config.calibration
    datasets = list(fp)
    header = (f"SmolLM2-135M-Instruct (embedded GGUF, dequantized to fp32), channel-wise asymmetric weights, "
              f"calibration {cal.n_samples}x{cal.seqlen} tokens from the C4 train prefix (seed {cal.seed}), "
              f"evaluation: " + ", ".join(f"{fp[d]['label']} {fp[d]['windows']}x{fp[d]['seqlen']}" for d in datasets)
              + f" (GPTQ protocol, token perplexity); LoaQ alpha_in={q.alpha_in} alpha_out={q.alpha_out} beta={q.beta}; "
              f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, commit {commit()}, {time.strftime('%Y-%m-%d')}")
    lines = [f"_{header}_", "", "| method | bits | act-order | " + " | ".join(f"{d} ppl" for d in datasets)
             + " | quantize s |", "| --- | ---: | --- | " + " | ".join("---:" for _ in datasets) + " | ---: |",
             "| FP | 32 | - | " + " | ".join(f"{fp[d]['ppl']:.2f}" for d in datasets) + " | - |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits']} | {'yes' if r['act_order'] else 'no'} | "
                     + " | ".join(f"{r['ppl'][d]:.2f}" for d in datasets) + f" | {r['quantize_seconds']} |")
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
