"""The per-layer search's cost against a fixed-pair LoaQ layer, on SmolLM2's first layers.

For each of the first ``--layers`` decoder layers (clean stream from the store; the quantized
stream's input taken as the clean one, which changes no cost), interleaved over ``--reps``
repetitions in one process: the fixed-pair layer (``LayerQuantizer.run`` with the default config's
alpha and beta), and the search over the candidate grid (``LayerSearch.run``, which ends with the
layer quantized with the choice), scored on held-out windows standing in for the separate draw (the
first ``holdout`` share of the windows again: the same shapes, hence the same cost). A searched
layer costs search / fixed. Prints a table with the search's phases and writes
``bench/results/search_cost.json``.

    .venv/bin/python bench/search_cost.py [--layers 3] [--reps 2] [--alpha 0.25 0.5 0.75] [--beta 0 0.25 0.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from loaq.configs.load import load_config
from loaq.configs.schema import SearchConfig
from loaq.engine.arrays import MemoryArray, Rows
from loaq.engine.layer import CleanStream, LayerQuantizer
from loaq.engine.search import LayerSearch
from loaq.flows.quantize import open_context
from loaq.models.layers import ContextFactory
from loaq.stages.arrays import RecordArray
from loaq.stages.keys import calibration_key, clean_key, embed_key
from loaq.stages.model import prepare_model
from loaq.stages.streams import HIDDEN, calibration_stage, clean_layer_stage, embed_stage, sublayer_output

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    ap.add_argument("--config", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--store", default=".loaq/bench-search-cost")
    ap.add_argument("--out", default=str(RESULTS / "search_cost"))
    args = ap.parse_args()
    config = load_config(args.config, [*args.overrides, f"store.url={args.store}"])
    ctx = open_context(config)
    model = prepare_model.fn(config.model, ctx.model_cache)
    calibration = calibration_key(model, config.calibration, config.data_dir)
    if not ctx.reuse("calibration", calibration):
        calibration_stage.fn(ctx, model, config.calibration, config.data_dir)
    clean = [embed_key(ctx, model, calibration)]
    if not ctx.reuse("embed", clean[0]):
        embed_stage.fn(ctx, model, calibration)
    for index in range(args.layers):
        clean.append(clean_key(ctx, model, index, clean[-1]))
        if not ctx.reuse("clean-layer", clean[-1]):
            clean_layer_stage.fn(ctx, model, index, clean[-2])
    checkpoint, rt = model.open(), ctx.runtime
    contexts = ContextFactory(checkpoint.adapter, checkpoint.config, rt.device)
    search = SearchConfig(alpha=args.alpha, beta=args.beta)
    n_held = search.held_windows(config.calibration.n_samples)

    def streams(index):
        out = ctx.store.open(clean[index + 1])
        h = RecordArray(ctx.store.open(clean[index]), HIDDEN)
        return CleanStream(h, {s.name: RecordArray(out, sublayer_output(s.name)) for s in checkpoint.adapter.sublayers}), h

    def quantizer(index, cfg):
        return LayerQuantizer(checkpoint.adapter, checkpoint.config, index, checkpoint.layer_state(index), cfg,
                              contexts, device=rt.device, dtype=rt.dtype, micro_batch=rt.micro_batch,
                              input_transforms=checkpoint.input_transforms(index))

    fixed, searched, phases = [], [], defaultdict(float)
    for _ in range(args.reps):
        for index in range(args.layers):
            stream, hq = streams(index)
            started = time.perf_counter()
            quantizer(index, config.quantize).run(stream, hq, MemoryArray(shape=hq.shape, dtype=rt.dtype))
            fixed.append(time.perf_counter() - started)
            stream, hq = streams(index)
            started = time.perf_counter()
            held = CleanStream(Rows(stream.h, 0, n_held), {k: Rows(v, 0, n_held) for k, v in stream.out.items()})
            result = LayerSearch(quantizer(index, config.quantize), search).run(
                stream, hq, MemoryArray(shape=hq.shape, dtype=rt.dtype), held, Rows(hq, 0, n_held))
            searched.append(time.perf_counter() - started)
            for phase, seconds in result.seconds.items():
                phases[phase] += seconds / args.reps
            print(f"layer {index}: fixed {fixed[-1]:.2f} s, search {searched[-1]:.2f} s", flush=True)
    ratio = sum(searched) / sum(fixed)
    c = config.calibration
    header = (f"SmolLM2-135M W{config.quantize.bits}, first {args.layers} layers x {args.reps} repetitions, calibration "
              f"{c.n_samples}x{c.seqlen}, {len(search.candidates())} candidates (alpha {args.alpha} x beta {args.beta}), "
              f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    table = "\n".join([header, "", "| fixed layer s (median) | search s (median) | searched layer / fixed layer | "
                       + " | ".join(f"search {p} s" for p in phases) + " |",
                       "| ---: | ---: | ---: |" + " ---: |" * len(phases),
                       f"| {statistics.median(fixed):.2f} | {statistics.median(searched):.2f} | {ratio:.2f}x | "
                       + " | ".join(f"{v / args.layers:.2f}" for v in phases.values()) + " |"])
    print("\n" + table)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"header": header, "fixed_s": fixed, "search_s": searched, "searched_over_fixed": ratio,
         "search_phases_per_layer": {k: v / args.layers for k, v in phases.items()}}, indent=1))
    Path(args.out).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
