"""Time the layer solver on this CPU: (a) damping + GPTQ vs (b) damping + LoaQ target + GPTQ, and
the baselines (c) damping + GPTAQ and (d) damping + Qronos on the same problem.

Shapes are (in × out) of a Llama-7B-like attention projection (4096 × 4096) and MLP up/gate
projection (4096 × 11008); 4-bit per-channel asymmetric, block 128, no act_order. H, C and B are
synthetic: H and C from a few thousand correlated random tokens (content does not change the
cost, only the shapes do), B random. Repeats of (a) and (b) are interleaved so that load from
other processes hits both alike; the median is reported.

    .venv/bin/python bench/solver.py            # full run, writes bench/results/solver.json
    .venv/bin/python bench/solver.py --quick    # small shapes, prints only (unless --out is given)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from loaq.quant import QuantSpec, damp_hessian, gptaq, gptq, loaq_target, qronos

THREADS = 2
FULL_SHAPES = [(4096, 4096), (4096, 11008)]  # (in, out)
QUICK_SHAPES = [(1024, 1024), (1024, 2752)]
ALPHA, BETA = 0.5, 0.25
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "solver.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synthetic_problem(n_in: int, n_out: int, tokens: int, generator: torch.Generator):
    """H, C (in, in) from correlated tokens with a drifted quantized stream; B (in, out); W (out, in)."""
    rank = 128  # shared low-rank factors make the inputs correlated, like real activations
    column_scale = torch.rand(n_in, generator=generator) * 2 + 0.1
    X = torch.randn(tokens, n_in, generator=generator) * column_scale
    X += torch.randn(tokens, rank, generator=generator) @ torch.randn(rank, n_in, generator=generator)
    Xq = X + 0.05 * torch.randn(tokens, n_in, generator=generator)
    H = Xq.T @ Xq
    C = Xq.T @ (X - Xq)
    B = torch.randn(n_in, n_out, generator=generator) * float(C.abs().mean())
    W = torch.randn(n_out, n_in, generator=generator) * 0.02
    return H, C, B, W


def run_gptq_only(H, W, spec):
    t0 = time.perf_counter()
    hessian = damp_hessian(H)
    gptq(W, hessian, spec)
    return time.perf_counter() - t0, 0.0


def run_loaq(H, C, B, W, spec):
    t0 = time.perf_counter()
    hessian = damp_hessian(H)
    t_target = time.perf_counter()
    target = loaq_target(W, hessian, ALPHA * C @ W.T.to(C.dtype) + BETA * B)  # R = αCWᵀ + βB, as W_out's
    t_target = time.perf_counter() - t_target
    gptq(target, hessian, spec)
    return time.perf_counter() - t0, t_target


def run_gptaq(H, C, W, spec):
    t0 = time.perf_counter()
    gptaq(W, damp_hessian(H), C, spec)
    return time.perf_counter() - t0


def run_qronos(H, C, W, spec):
    t0 = time.perf_counter()
    qronos(W, damp_hessian(H), C, spec)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (1024 × 1024, 1024 × 2752)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens for the synthetic H")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON output (default {DEFAULT_OUT} for full runs, none for --quick)")
    args = parser.parse_args(argv)
    out_path = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    torch.set_num_threads(THREADS)
    spec = QuantSpec(bits=4)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    header = {
        "benchmark": "solver",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "repeats": args.repeats,
        "tokens_for_H": args.tokens,
        "quant": {"bits": spec.bits, "group_size": None, "symmetric": False, "block_size": 128,
                  "act_order": False, "percdamp": 0.01},
        "target": {"alpha": ALPHA, "beta": BETA, "C": True, "B": True},
        "note": "a = damp_hessian + gptq; b = damp_hessian + loaq_target + gptq; c = damp_hessian + gptaq "
                "(alpha 0.25); d = damp_hessian + qronos; medians of interleaved repeats",
    }
    print(f"torch {header['torch']} | {header['cpu']} | torch threads = {header['torch_threads']}")
    print(f"4-bit per-channel GPTQ (block 128), target alpha={ALPHA}, beta={BETA}; "
          f"median of {args.repeats} interleaved repeats")

    rows = []
    generator = torch.Generator().manual_seed(0)
    for n_in, n_out in shapes:
        H, C, B, W = synthetic_problem(n_in, n_out, args.tokens, generator)
        times_a, times_b, times_target, times_c, times_d = [], [], [], [], []
        for _ in range(args.repeats):
            times_a.append(run_gptq_only(H, W, spec)[0])
            total, target = run_loaq(H, C, B, W, spec)
            times_b.append(total)
            times_target.append(target)
            times_c.append(run_gptaq(H, C, W, spec))
            times_d.append(run_qronos(H, C, W, spec))
        a, b = statistics.median(times_a), statistics.median(times_b)
        c, d = statistics.median(times_c), statistics.median(times_d)
        rows.append({
            "in": n_in, "out": n_out,
            "a_gptq_s": a, "b_loaq_s": b, "ratio_b_over_a": b / a,
            "c_gptaq_s": c, "ratio_c_over_a": c / a, "d_qronos_s": d, "ratio_d_over_a": d / a,
            "target_only_s": statistics.median(times_target),
            "a_min_s": min(times_a), "b_min_s": min(times_b),
            "a_runs_s": times_a, "b_runs_s": times_b,
        })
        del H, C, B, W

    print(f"\n{'in × out':>14} | {'(a) GPTQ s':>10} | {'(b) LoaQ s':>10} | {'target s':>8} | {'b/a':>5} | "
          f"{'min a':>6} | {'min b':>6} | {'(c) GPTAQ s':>11} | {'c/a':>5} | {'(d) Qronos s':>12} | {'d/a':>5}")
    print("-" * 124)
    for r in rows:
        print(f"{r['in']:>6} × {r['out']:<5} | {r['a_gptq_s']:>10.2f} | {r['b_loaq_s']:>10.2f} | "
              f"{r['target_only_s']:>8.2f} | {r['ratio_b_over_a']:>5.2f} | {r['a_min_s']:>6.2f} | {r['b_min_s']:>6.2f} | "
              f"{r['c_gptaq_s']:>11.2f} | {r['ratio_c_over_a']:>5.2f} | {r['d_qronos_s']:>12.2f} | {r['ratio_d_over_a']:>5.2f}")
    print("(medians; min = best single run, less sensitive to other processes on the machine)")

    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(json.dumps({**header, "results": rows}, indent=2) + "\n")
        tmp.replace(out_path)
        print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
