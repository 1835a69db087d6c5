"""NeUQI grid search speed on a CPU at SmolLM2-135M's linear shapes: the binned scale ranking
(quant/neuqi.py, the default) against ranking every scale by its exact loss (``exact=True``, the
previous implementation), interleaved in one process. Also the loss of each on its own objective
(Σ_rows Σ_i d_i (q(w_i) − w_i)²) relative to each other and to min-max.

    python bench/neuqi_speed.py [--threads 1 2] [--rows 96] [--reps 3] [--bits 3]

The exact ranking is timed on the first --rows rows of each weight (its cost is per row), the
binned one on the same rows and on the whole weight. Prints a table and writes
bench/results/neuqi_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from loaq.quant import QuantSpec, fit_scale_zero
from loaq.quant.neuqi import neuqi_grid, weighted_error

# (name, rows, in): q/k/v/o; gate and up stacked; down
SHAPES = [("attn 576x576", 576, 576), ("gate+up 3072x576", 3072, 576), ("down 576x1536", 576, 1536)]


def realistic(rows: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed rows of varying scale with a few outlier input columns, and the diagonal of a
    correlated Hessian X^T X whose input channels have log-normal scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.distributions.StudentT(5.0).sample((rows, k)) * 0.02
    W *= torch.exp(0.3 * torch.randn(rows, 1, generator=g))
    W[:, torch.randperm(k, generator=g)[:4]] *= 8
    scales = torch.exp(torch.randn(k, generator=g))
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k**0.5
    X = (torch.randn(512, k, generator=g) @ mix) * scales
    return W.float(), (X * X).sum(0).double() / 512 + 1e-2


def grid(W: torch.Tensor, importance: torch.Tensor, spec: QuantSpec, exact: bool):
    s_mm, z_mm = fit_scale_zero(W, QuantSpec(bits=spec.bits))
    return neuqi_grid(W, importance, s_mm[:, 0], z_mm[:, 0], spec.maxq, spec.symmetric, spec.neuqi_coarse,
                      spec.neuqi_fine, exact=exact)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bits", type=int, default=3)
    args = parser.parse_args()
    spec = QuantSpec(bits=args.bits, grid_init="neuqi")
    results = []
    print(f"{'shape':<18} {'thr':>3} {'exact µs/w':>16} {'binned µs/w':>16} {'full µs/w':>10} {'speed-up':>16} "
          f"{'new/old':>9} {'worst row':>9} {'same':>6} {'new/mm':>7}")
    for name, rows, k in SHAPES:
        W, importance = realistic(rows, k, seed=rows + k)
        sub = W[:args.rows]
        s_mm, z_mm = fit_scale_zero(sub, QuantSpec(bits=args.bits))
        for threads in args.threads:
            torch.set_num_threads(threads)
            old_t, new_t, full_t = [], [], []
            for _ in range(args.reps):  # interleaved: the machine's load hits both alike
                t, old = timed(lambda: grid(sub, importance, spec, exact=True))
                old_t.append(t / sub.numel() * 1e6)
                t, new = timed(lambda: grid(sub, importance, spec, exact=False))
                new_t.append(t / sub.numel() * 1e6)
                t, _ = timed(lambda: grid(W, importance, spec, exact=False))
                full_t.append(t / W.numel() * 1e6)
            loss = {key: weighted_error(sub, s[:, None], z[:, None], importance, spec.maxq)
                    for key, (s, z) in {"old": old, "new": new, "mm": (s_mm[:, 0], z_mm[:, 0])}.items()}
            same = float(((old[0] == new[0]) & (old[1] == new[1])).double().mean())
            row = dict(shape=name, threads=threads, rows_timed=sub.shape[0], k=k,
                       exact_us_per_weight=dict(median=statistics.median(old_t), min=min(old_t)),
                       binned_us_per_weight=dict(median=statistics.median(new_t), min=min(new_t)),
                       binned_full_us_per_weight=dict(median=statistics.median(full_t), min=min(full_t)),
                       speedup=dict(median=statistics.median(old_t) / statistics.median(new_t),
                                    min_over_min=min(old_t) / min(new_t)),
                       loss_new_over_old=float(loss["new"].sum() / loss["old"].sum()),
                       worst_row_new_over_old=float((loss["new"] / loss["old"]).max()),
                       rows_identical=same,
                       loss_new_over_minmax=float(loss["new"].sum() / loss["mm"].sum()),
                       loss_old_over_minmax=float(loss["old"].sum() / loss["mm"].sum()))
            results.append(row)
            print(f"{name:<18} {threads:>3} {row['exact_us_per_weight']['median']:>7.2f} ({min(old_t):>6.2f}) "
                  f"{row['binned_us_per_weight']['median']:>7.3f} ({min(new_t):>6.3f}) "
                  f"{row['binned_full_us_per_weight']['median']:>10.3f} "
                  f"{row['speedup']['median']:>7.1f}x ({row['speedup']['min_over_min']:>5.1f}x) "
                  f"{row['loss_new_over_old']:>9.6f} {row['worst_row_new_over_old']:>9.5f} {same:>6.1%} "
                  f"{row['loss_new_over_minmax']:>7.4f}")
    out = Path(__file__).parent / "results" / "neuqi_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(dict(bits=args.bits, reps=args.reps, results=results), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
