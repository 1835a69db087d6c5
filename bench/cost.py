"""Quantization cost of each method relative to GPTQ, measured in one run on SmolLM2.

Two situations, each timed for every method over the first ``--layers`` decoder layers:

  cold          the clean stream is not in the store: the run computes it (clean stage) and
                quantizes (quantize stage), layer after layer, as ``loaq run`` does
  clean stored  the clean stream of those layers is already in the store (an earlier variant or
                run made it): the quantize stage only

Calibration and embeddings are computed once beforehand and shared (they do not depend on the
method). The stages are called in-process exactly as the flow calls them, on a store on disk.
The machine is noisy, so the (method, situation) cells are interleaved within each repetition,
in a rotated order, and the table reports the median over repetitions and the spread (min-max)
of the per-repetition ratio to GPTQ. The per-phase breakdown (read, quantized-stream forward,
statistics, solve, write; clean stage) is summed over the layers from what each layer records.
Each cell also records its peak host memory (the process's resident-set high-water mark, reset
before the cell through ``/proc/self/clear_refs``; Linux only, "-" elsewhere) and, on CUDA, its
peak device memory (``torch.cuda.max_memory_allocated``, reset likewise).

    .venv/bin/python bench/cost.py [--layers 8] [--reps 3] [--methods gptq loaq] [--set quantize.bits=4]

Prints a table and writes ``bench/results/cost.json`` (and ``cost.md``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from loaq.configs.load import load_config
from loaq.flows.quantize import open_context
from loaq.stages.model import prepare_model
from loaq.stages.keys import calibration_key, chain_id, chain_keys, clean_key, embed_key, weights_key
from loaq.stages.quantize import quantize_layer_stage
from loaq.stages.streams import calibration_stage, clean_layer_stage, embed_stage

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
SITUATIONS = ("cold", "clean stored")


def drop(store, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        for info in store.list(kind=kind):
            store.delete(info.key)


def reset_peaks() -> None:
    """Start a new high-water mark for host RSS (Linux: writing 5 to clear_refs resets VmHWM) and
    for CUDA allocations. Memory the earlier cells freed is first handed back to the system
    (glibc's malloc_trim), so that a cell's peak does not start from what they left resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peaks() -> dict[str, float | None]:
    """Peak host RSS and peak CUDA memory (MiB) since ``reset_peaks``; None where not measurable."""
    host = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                host = int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    device = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mib": host, "peak_device_mib": device}


def time_cell(ctx, model, config, method: str, situation: str, layers: int, embedding: str) -> dict:
    """Quantize the first ``layers`` layers with ``method``; returns wall seconds and phases."""
    store = ctx.store
    cfg = config.quantize.model_copy(update={"method": method})
    drop(store, ("quant_state", "weights"))
    clean = [embedding]
    for index in range(layers):
        clean.append(clean_key(ctx, model, index, clean[index]))
    if situation == "cold":
        drop(store, ("clean_state",))
    else:  # make sure the clean stream is there (untimed)
        for index in range(layers):
            clean_layer_stage.fn(ctx, model, index, clean[index])
    chain, variant = chain_keys(embedding, cfg, model.num_layers), chain_id(embedding, cfg)
    phases: dict[str, float] = {}
    gc.collect()
    reset_peaks()
    started = time.perf_counter()
    for index in range(layers):
        if situation == "cold":
            t = time.perf_counter()
            clean_layer_stage.fn(ctx, model, index, clean[index])
            phases["clean stage"] = phases.get("clean stage", 0.0) + time.perf_counter() - t
        quantize_layer_stage.fn(ctx, model, index, cfg, variant, chain[index],
                                embedding if index == 0 else chain[index - 1], clean[index], clean[index + 1])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    memory = peaks()
    for index in range(layers):
        for phase, s in store.open(weights_key(chain[index])).attrs.get("seconds", {}).items():
            phases[phase] = phases.get(phase, 0.0) + s
    return {"seconds": seconds, "phases": phases, **memory}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="default")
    ap.add_argument("--store", default=".loaq/cost-store")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["gptq", "loaq"])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "cost.json"))
    args = ap.parse_args()
    if "gptq" not in args.methods:
        args.methods.insert(0, "gptq")

    config = load_config(args.config, [f"store.url={args.store}", *args.overrides])
    ctx = open_context(config)
    model = prepare_model.fn(config.model, ctx.model_cache)
    calibration = calibration_key(model, config.calibration, config.data_dir)
    calibration_stage.fn(ctx, model, config.calibration, config.data_dir)
    embedding = embed_key(ctx, model, calibration)
    embed_stage.fn(ctx, model, calibration)

    cells = [(m, s) for s in SITUATIONS for m in args.methods]
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in cells}
    for rep in range(args.reps):
        order = cells[rep % len(cells):] + cells[:rep % len(cells)]
        for method, situation in order:
            cell = time_cell(ctx, model, config, method, situation, args.layers, embedding)
            runs[(method, situation)].append(cell)
            print(f"rep {rep}  {method:>9} {situation:<13} {cell['seconds']:7.2f} s", flush=True)

    rows = []
    for method, situation in cells:
        mine = [r["seconds"] for r in runs[(method, situation)]]
        base = [r["seconds"] for r in runs[("gptq", situation)]]
        ratios = [a / b for a, b in zip(mine, base)]
        phase_names = sorted({p for r in runs[(method, situation)] for p in r["phases"]})
        rows.append({"method": method, "situation": situation, "seconds_median": statistics.median(mine),
                     "seconds": mine, "ratio_to_gptq_median": statistics.median(ratios),
                     "ratio_to_gptq_min": min(ratios), "ratio_to_gptq_max": max(ratios),
                     "phases_median": {p: statistics.median(r["phases"].get(p, 0.0) for r in runs[(method, situation)])
                                       for p in phase_names},
                     **{m: max((r[m] for r in runs[(method, situation)] if r[m] is not None), default=None)
                        for m in ("peak_rss_mib", "peak_device_mib")}})

    device = f"{ctx.runtime.device} ({str(ctx.runtime.dtype).removeprefix('torch.')})"
    if ctx.runtime.device == "cuda":
        device += f", {torch.cuda.get_device_name()}"
    phases = ["clean stage", "read", "quant_forward", "stats", "solve", "write"]
    memory = [("peak RSS MiB", "peak_rss_mib")]
    if any(r["peak_device_mib"] is not None for r in rows):
        memory.append(("peak device MiB", "peak_device_mib"))
    header = (f"SmolLM2-135M, {config.quantize.bits}-bit channel-wise, first {args.layers} of {model.num_layers} layers, "
              f"calibration {config.calibration.n_samples}x{config.calibration.seqlen} tokens, "
              f"{torch.get_num_threads()} threads, {args.reps} interleaved repetitions (median; ratio spread min-max; "
              f"phases in seconds; peak memory: the largest over repetitions), device {device}")
    names = phases + [name for name, _ in memory]
    lines = [header, "", "| method | situation | seconds | ratio to GPTQ | " + " | ".join(names) + " |",
             "| --- | --- | ---: | ---: |" + " ---: |" * len(names)]
    for r in rows:
        cells_ = [f"{r['phases_median'].get(p, 0.0):.2f}" for p in phases]
        cells_ += ["-" if r[key] is None else f"{r[key]:.0f}" for _, key in memory]
        lines.append(f"| {r['method']} | {r['situation']} | {r['seconds_median']:.2f} | "
                     f"{r['ratio_to_gptq_median']:.3f} ({r['ratio_to_gptq_min']:.3f}-{r['ratio_to_gptq_max']:.3f}) | "
                     + " | ".join(cells_) + " |")
    table = "\n".join(lines)
    print()
    print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "rows": rows, "commit": commit, "torch": torch.__version__,
                               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "device": device,
                               "layers": args.layers, "reps": args.reps, "config": config.model_dump(mode="json")},
                              indent=1))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
