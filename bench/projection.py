"""GPU projection: one decoder layer with the exact shapes of LLaMA-3-8B and LLaMA-3-70B, timed per
stage and projected to the whole model, with the device memory the engine needs by design.

For each shape the script builds a random LLaMA decoder layer and random calibration hidden states
(cost depends on shapes only) and runs what the pipeline runs per layer: the clean stage
(``clean_layer_forward``: the layer and its sub-layer outputs) and the quantize stage
(``LayerQuantizer``) for GPTQ and LoaQ. Per-layer times x layers (+ the embedding/evaluation
forward, estimated as one clean forward of the whole model per evaluated set) give the whole-model
projection, shown next to the paper's Table 6 and the GPTQ times users report for other tools.

* On a GPU: the real shapes with 128 x 2048 calibration tokens (bf16 streams, float64 solves);
  peak device memory is measured (``torch.cuda.max_memory_allocated``) per stage.
* On a CPU: a scaled-down shape (every width / ``--scale``, tokens / ``--token-scale``) so that it
  stays testable; times are for that shape (no projection), and the memory column gives the
  *accounted* peak of the real shapes: the tensors the engine holds at its largest moment, sized
  from the shapes (see ``accounted_peak``), which is how the 70B layer is shown to fit in 40 GB.

    .venv/bin/python bench/projection.py                 # CPU: scaled down; GPU: real shapes
    .venv/bin/python bench/projection.py --shapes llama3-8b --samples 32

Prints a table and writes ``bench/results/projection.json`` (another path with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loaq.configs.schema import QuantizeConfig
from loaq.engine.arrays import MemoryArray
from loaq.engine.forward import clean_layer_forward
from loaq.engine.layer import CleanStream, LayerQuantizer
from loaq.models.adapters import adapter_for
from loaq.models.layers import ContextFactory

RESULTS = Path(__file__).parent / "results"
GiB = 2**30


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int = 128256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def scaled(self, k: int) -> "Shape":
        return Shape(self.hidden // k, self.intermediate // k, max(1, self.heads // k), max(1, self.kv_heads // k),
                     self.layers, self.vocab)


SHAPES = {
    "llama3-8b": Shape(4096, 14336, 32, 8, 32),
    "llama3-70b": Shape(8192, 28672, 64, 8, 80),
    # SmolLM2-135M's layer: LoaQ's cost over GPTQ's at the shapes the SmolLM2 benchmarks use, on a
    # device where the real model cannot be loaded (random weights: the cost depends on shapes only)
    "smollm2-135m": Shape(576, 1536, 9, 3, 30, 49152),
}
#: Shapes at most this wide run at their real widths on a CPU (only their tokens are scaled down).
CPU_FULL_WIDTH = 1024
# What other tools and the paper report (minutes), for the table's reference columns.
REFERENCE_MINUTES = {
    "llama3-8b": {"GPTQ, other tools (A100)": 30.0, "paper Table 6, Qwen3-8B A40: GPTQ": 11.48,
                  "paper Table 6, Qwen3-8B A40: LoaQ": 19.68},
    "llama3-70b": {"GPTQ, other tools (H100)": 390.0},
}


def layer_params(s: Shape) -> int:
    kv = s.kv_heads * s.head_dim
    return s.hidden * (s.hidden + 2 * kv) + s.hidden * s.hidden + 3 * s.hidden * s.intermediate


def accounted_peak(s: Shape, samples: int, seqlen: int, micro_batch: int, method: str, stream_bytes: int = 2) -> dict:
    """Device bytes the engine holds at its largest moment of a layer, by design (what the code
    allocates, term by term; streams live on the host and move by micro-batch):

    * the layer's weights in the stream dtype (one layer: the clean stage's and the quantize
      stage's layers are never alive together);
    * one micro-batch of activations: the MLP's gate, up, their product and the output
      (4 x tokens x intermediate) dominate the attention's;
    * the solve of the widest linear, down_proj (in = intermediate, out = hidden), in float64:
      the Hessian accumulator damped in place (H), and inside GPTQ's factorisation the
      reordered Cholesky factor, the identity and the triangular inverse (3 more in x in, the
      reordered copy being freed before the identity is made); for LoaQ also R (in x out),
      freed before GPTQ, so it does not add to that moment; GPTQ's float32 working copies of W (2 x in x out).
    """
    weights = layer_params(s) * stream_bytes
    activations = micro_batch * seqlen * (4 * s.intermediate + 4 * s.hidden) * stream_bytes
    n_in, n_out = s.intermediate, s.hidden
    hessian = n_in * n_in * 8
    solve = hessian + 3 * hessian + 2 * n_in * n_out * 4
    total = weights + max(activations, solve)
    return {"weights": weights, "activations": activations, "solve": solve, "total": total}


def build_layer_state(s: Shape, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, num_hidden_layers=1, vocab_size=256,
                         max_position_embeddings=8192, head_dim=s.head_dim)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        layer = LlamaDecoderLayer(config, 0).to(dtype)
    state = {f"model.layers.0.{k}": v.detach() for k, v in layer.state_dict().items()}
    del layer
    return config, state


class OneLayer:
    """A ``WeightSource`` with one random decoder layer (no embeddings: calibration states are random)."""

    def __init__(self, config, state):
        self.config, self.adapter, self.num_layers, self._state = config, adapter_for(config), 1, state

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        prefix = self.adapter.layer_prefix.format(index=index)
        return {k[len(prefix):]: v for k, v in self._state.items() if k.startswith(prefix)}

    def input_transforms(self, index: int) -> dict:
        return {}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, s: Shape, samples: int, seqlen: int, micro_batch: int, device: str, dtype: torch.dtype,
            methods: list[str], reps: int = 1) -> dict:
    """One layer of shape ``s``: the clean stage once, then each method's quantize stage ``reps`` times
    (interleaved); the median time per method and the median and range of LoaQ's ratio to GPTQ."""
    config, state = build_layer_state(s, dtype, device)
    source = OneLayer(config, state)
    contexts = ContextFactory(source.adapter, config, device)
    g = torch.Generator().manual_seed(0)
    h = MemoryArray(torch.randn(samples, seqlen, s.hidden, generator=g).to(dtype))
    clean = CleanStream(h, {sub.name: MemoryArray(shape=h.shape, dtype=dtype) for sub in source.adapter.sublayers})
    h_out = MemoryArray(shape=h.shape, dtype=dtype)
    row: dict = {"shape": name, "dims": s.__dict__, "samples": samples, "seqlen": seqlen, "micro_batch": micro_batch}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    started = time.perf_counter()
    clean_layer_forward(source, 0, h, h_out, clean.out, contexts, device=device, dtype=dtype, micro_batch=micro_batch)
    sync(device)
    row["clean_stage_s"] = time.perf_counter() - started
    if device == "cuda":
        row["clean_stage_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    # The quantized stream starts as a perturbed copy of the clean one, as after earlier layers.
    hq = MemoryArray((h.tensor.float() + 0.05 * torch.randn(h.shape, generator=g)).to(dtype))
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(reps):
        # interleaved, the first method alternating, so that neither always runs on a cold device
        for method in (methods if rep % 2 == 0 else methods[::-1]):
            cfg = QuantizeConfig(method=method, bits=3)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            started = time.perf_counter()
            quantizer = LayerQuantizer(source.adapter, config, 0, source.layer_state(0), cfg, contexts,
                                       device=device, dtype=dtype, micro_batch=micro_batch)
            result = quantizer.run(clean, hq, MemoryArray(shape=h.shape, dtype=dtype))
            sync(device)
            seconds[method].append(time.perf_counter() - started)
            row[f"{method}_phases"] = result.seconds  # of the last repetition
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated() / GiB
                row[f"{method}_peak_gib"] = max(peak, row.get(f"{method}_peak_gib", 0.0))
            del quantizer, result
    for method, times in seconds.items():
        row[f"{method}_s"] = statistics.median(times)
        row[f"{method}_runs_s"] = times
    if {"gptq", "loaq"} <= set(methods):
        ratios = [loaq / gptq for loaq, gptq in zip(seconds["loaq"], seconds["gptq"])]
        row["loaq_over_gptq"] = statistics.median(ratios)
        row["loaq_over_gptq_range"] = [min(ratios), max(ratios)]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--scale", type=int, default=16, help="CPU only: divide every width by this")
    ap.add_argument("--token-scale", type=int, default=64, help="CPU only: divide the calibration tokens by this")
    ap.add_argument("--methods", nargs="+", default=["gptq", "loaq"], choices=["gptq", "loaq"])
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each method's quantize stage (interleaved)")
    ap.add_argument("--out", default=str(RESULTS / "projection.json"))
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for name in args.shapes:
        real = SHAPES[name]
        shape, samples = real, args.samples
        if device == "cpu":
            shape = real if real.hidden <= CPU_FULL_WIDTH else real.scaled(args.scale)
            samples = max(1, args.samples // args.token_scale)
        row = measure(name, shape, samples, args.seqlen, args.micro_batch, device, dtype, args.methods, args.reps)
        row["accounted_peak_real_shape_gib"] = {k: v / GiB for k, v in accounted_peak(
            real, args.samples, args.seqlen, args.micro_batch, "loaq").items()}
        row["projected"] = device == "cuda"
        if device == "cuda":
            evals = 2  # WikiText-2 and C4: one forward of the model each, ~ one clean stage per layer
            for method in args.methods:
                row[f"{method}_model_min"] = (row["clean_stage_s"] * (1 + evals) + row[f"{method}_s"]) * real.layers / 60
        row["reference_minutes"] = REFERENCE_MINUTES.get(name, {})
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_phases")}, default=str), flush=True)

    lines = [f"Device: {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'CPU'} "
             f"({device}, {dtype}); calibration {args.samples}x{args.seqlen} tokens"
             + ("" if device == "cuda" else f", run scaled down: widths / {args.scale} (shapes up to {CPU_FULL_WIDTH} "
                f"wide at their own), tokens / {args.token_scale}")
             + (f"; {args.reps} interleaved repetitions per method (median; ratio range min-max)" if args.reps > 1 else ""),
             "", "| shape | clean stage s | GPTQ layer s | LoaQ layer s | LoaQ / GPTQ | peak GiB (measured) | "
             "accounted peak GiB, real shape | projected model min (GPTQ / LoaQ) | reference min |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        peak = f"{max(r.get('gptq_peak_gib', 0), r.get('loaq_peak_gib', 0), r.get('clean_stage_peak_gib', 0)):.1f}" \
            if r["projected"] else "-"
        num = lambda key, fmt=".2f": format(r[key], fmt) if key in r else "-"  # a method left out: "-"
        proj = f"{num('gptq_model_min', '.1f')} / {num('loaq_model_min', '.1f')}" if r["projected"] else "- (scaled run)"
        ratio = "-"
        if "loaq_over_gptq" in r:
            low, high = r["loaq_over_gptq_range"]
            ratio = f"{r['loaq_over_gptq']:.2f}" + (f" ({low:.2f}-{high:.2f})" if args.reps > 1 else "")
        ref = "; ".join(f"{k}: {v:g}" for k, v in r["reference_minutes"].items())
        lines.append(f"| {r['shape']} | {r['clean_stage_s']:.2f} | {num('gptq_s')} | {num('loaq_s')} | "
                     f"{ratio} | {peak} | {r['accounted_peak_real_shape_gib']['total']:.1f} | {proj} | {ref} |")
    table = "\n".join(lines)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "dtype": str(dtype), "rows": rows}, indent=1, default=str))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
