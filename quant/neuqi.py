"""NeUQI: near-optimal initialization of a uniform grid's (scale, zero point) (Lin, Hu & Wan 2025,
arXiv 2505.17595).

Min-max fixes the grid by the row's extremes and rounds the zero point to an integer. NeUQI instead
minimises, per row (or group) of W, the importance-weighted quantization error

    L(s, z) = Σ_i d_i (w_i − q_{s,z}(w_i))²,      q_{s,z}(w) = s·(clamp(round(w/s + z), 0, maxq) − z),

with d the diagonal of the (damped) Hessian, the per-column weight GPTQ's objective
tr((Q − W)H(Q − W)ᵀ) gives each squared error when the off-diagonal terms are ignored. The zero
point z is real, not an integer.

For a fixed scale, with u = w/s, L/s² = f(z) = Σ d_i (u_i + z − c_i(z))² is continuous and piecewise
quadratic in z (each c_i steps by one where u_i + z crosses a half-integer inside the grid), so its
minimiser is found by sweeping breakpoints. Sweeping all of them costs O(k·maxq) per row; like the
reference we do it in two passes:

1. a relaxed f̃ where a point inside the grid counts its worst rounding error 1/4 and a clamped
   point its exact error; its minimiser z̃ locates the clamping trade-off, which is all that
   distinguishes zero points one unit apart (interior errors are 1-periodic in z). f̃ is convex, so
   z̃ is found by bisection on its derivative (binary searches in each row sorted once);
2. the exact f on the window [z̃ − 1, z̃ + 1] (at most 2 breakpoints per point there, one sort).

The scale is searched on the reference's coarse-to-fine grid: t/T_c · s_mm for t = 1..T_c, then
offsets i/T_f · s_mm (|i| ≤ T_f/(2T_c)) around each row's best coarse scale, where s_mm is grid.py's
min-max scale (range including 0). Finally the min-max grid itself is compared on the exact loss
and kept where NeUQI does not beat it, so NeUQI's loss is never above min-max's.

Deliberate differences from the reference code: the top scale is this project's min-max scale
(whose range includes 0) rather than (max − min)/maxq, so the min-max grid is among the candidates;
and the final comparison with min-max (the reference keeps its search result).
"""

from __future__ import annotations

import torch


def _sweep(lo: torch.Tensor, hi: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """Minimise A x² + 2B x + C over each interval [lo, hi] (all (rows, m)); returns the best x and
    value per row, (rows,) each. A ≥ 0; where A = 0 the piece is constant and its midpoint is taken."""
    positive = A > 0
    safe_A = torch.where(positive, A, torch.ones_like(A))
    x = torch.where(positive, -B / safe_A, 0.5 * (lo + hi))
    x = torch.minimum(torch.maximum(x, lo), hi)
    value = (A * x + 2 * B) * x + C
    best = value.argmin(dim=1, keepdim=True)
    return x.gather(1, best)[:, 0], value.gather(1, best)[:, 0]


class _SortedRows:
    """Each row of w sorted once, with prefix sums of d and d·w in that order: u = w/s keeps the order
    for every scale s > 0, so the relaxed loss's derivative at any (s, z) costs two binary searches."""

    def __init__(self, w: torch.Tensor, d: torch.Tensor):
        self.w, order = w.sort(dim=1)
        d = d.gather(1, order)
        zero = torch.zeros_like(d[:, :1])
        self.d = torch.cat([zero, d.cumsum(1)], 1)  # (rows, k + 1): Σ_{i<j} d_i
        self.dw = torch.cat([zero, (d * self.w).cumsum(1)], 1)  # Σ_{i<j} d_i w_i

    def repeat(self, times: int) -> "_SortedRows":
        """The rows stacked ``times`` over (one copy per scale candidate evaluated together)."""
        out = object.__new__(_SortedRows)
        out.w, out.d, out.dw = (t.repeat(times, 1) for t in (self.w, self.d, self.dw))
        return out

    def relaxed_zero(self, scale: torch.Tensor, maxq: int, iterations: int = 40) -> torch.Tensor:
        """Minimiser of the relaxed loss f̃(z) for u = w/scale: a point counts (u + z)² below the grid
        (u + z < −½), (u + z − maxq)² above it (u + z > maxq + ½) and ¼ inside. Each term is convex
        in z (flat inside, quadratic outside), so f̃ is convex and its derivative
            f̃'(z)/2 = Σ_below d (u + z) + Σ_above d (u + z − maxq)
        is nondecreasing: bisection on its sign, each step two binary searches per row. The window of
        step 2 needs z̃ only roughly: 40 halvings of the initial bracket (< 2^11 wide) are plenty."""
        s = scale[:, None]
        total_d = self.d[:, -1:]
        u_min, u_max = self.w[:, :1] / s, self.w[:, -1:] / s
        lo, hi = -u_max - maxq - 1.0, -u_min + maxq + 1.0  # all points below / all above the grid
        du = self.dw / s  # prefix sums of d·u
        for _ in range(iterations):
            z = 0.5 * (lo + hi)
            below = torch.searchsorted(self.w, s * (-0.5 - z), side="left")  # count with u + z < -1/2
            above = torch.searchsorted(self.w, s * (maxq + 0.5 - z), side="right")  # first with u + z > maxq + 1/2
            d_below, d_above = self.d.gather(1, below), total_d - self.d.gather(1, above)
            slope = du.gather(1, below) + (du[:, -1:] - du.gather(1, above)) + z * (d_below + d_above) - maxq * d_above
            rising = slope > 0
            hi = torch.where(rising, z, hi)
            lo = torch.where(rising, lo, z)
        return (0.5 * (lo + hi))[:, 0]


def _window_zero(u: torch.Tensor, d: torch.Tensor, start: torch.Tensor, maxq: int):
    """Exact minimiser of f(z) = Σ d (u + z − clamp(round(u + z), 0, maxq))² on [start, start + 2] per row,
    and its value. u, d: (rows, k) float64; start: (rows,)."""
    v = u + start[:, None]  # u + z at the window's left end; τ = z − start ∈ [0, 2]
    unclamped = torch.floor(v + 0.5)
    code = torch.clamp(unclamped, 0, maxq)
    # A point's code steps k -> k + 1 where v + τ = k + ½ (k = 0..maxq − 1): at τ = t, t + 1, ... with
    # t = unclamped + ½ − v ∈ (0, 1]; the window holds the steps at t and t + 1, so one sort of t orders
    # all events (those at t, then those at t + 1, in the same order). A step that does not exist
    # (beyond the top or bottom code) is an event with no effect.
    t = unclamped + 0.5 - v
    residual = v - code  # each point's error at τ = 0
    A = d.sum(1, keepdim=True)
    B0 = (d * residual).sum(1, keepdim=True)
    C0 = (d * residual * residual).sum(1, keepdim=True)
    position, order = t.sort(dim=1)
    dB, dC = [], []
    for step in (0, 1):
        k = unclamped + step  # the code left at this step; below the grid the code stays 0 until k = 0
        exists = (k >= 0) & (k <= maxq - 1)
        # code k -> k + 1 changes the error v + τ − k by −1: B = Σ d·err drops by d, and
        # C = Σ d·err² changes by d((v − k − 1)² − (v − k)²) = d(1 − 2(v − k)).
        dB.append(torch.where(exists, -d, 0.0).gather(1, order))
        dC.append(torch.where(exists, d * (1 - 2 * (v - k)), 0.0).gather(1, order))
    B = B0 + torch.cat(dB, 1).cumsum(1)
    C = C0 + torch.cat(dC, 1).cumsum(1)
    zeros = torch.zeros_like(A)
    position = torch.cat([position, position + 1.0], 1)
    lo = torch.cat([zeros, position], 1)
    hi = torch.cat([position, zeros + 2.0], 1)
    tau, loss = _sweep(lo, hi, A.expand_as(lo), torch.cat([B0, B], 1), torch.cat([C0, C], 1))
    return start + tau, loss.clamp_min(0.0)


def optimal_zero(u: torch.Tensor, d: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Near-optimal real zero point per row for the fixed scale of ``u`` = w/s (rows, k), and its loss
    f(z) = Σ d (u + z − clamp(round(u + z), 0, maxq))², both (rows,), float64."""
    u, d = u.to(torch.float64), d.to(torch.float64).expand_as(u)
    start = _SortedRows(u, d).relaxed_zero(torch.ones_like(u[:, 0]), maxq) - 1.0
    return _window_zero(u, d, start, maxq)


def _fixed_zero_loss(u: torch.Tensor, d: torch.Tensor, zero: float, maxq: int) -> torch.Tensor:
    v = u + zero
    return (d * (v - torch.clamp(torch.round(v), 0, maxq)).square()).sum(1)


def weighted_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, d: torch.Tensor, maxq: int) -> torch.Tensor:
    """Σ_i d_i (q(w_i) − w_i)² per row, q the grid's fake quantization as the quantizers apply it. (rows,)"""
    from .grid import fake_quantize

    err = fake_quantize(w, scale, zero, maxq) - w
    return (d.to(torch.float64) * err.to(torch.float64).square()).sum(1)


def neuqi_grid(w: torch.Tensor, importance: torch.Tensor, scale_mm: torch.Tensor, zero_mm: torch.Tensor, maxq: int,
               symmetric: bool, coarse: int, fine: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NeUQI's (scale, zero) per row of w (rows, k) for column weights ``importance`` (k,), starting from
    the min-max grid (scale_mm, zero_mm), (rows,) each. Symmetric grids keep their fixed centre zero
    point and search the scale only. Returns (rows,) tensors in w's dtype."""
    w64 = w.to(torch.float64)
    d = importance.to(device=w.device, dtype=torch.float64).reshape(1, -1).expand_as(w64)
    if not bool((d.sum(1) > 0).all()):
        d = torch.ones_like(w64)  # no column carries weight: plain squared error
    s_mm = scale_mm.to(torch.float64)
    centre = (maxq + 1) / 2

    rows_sorted = None if symmetric else _SortedRows(w64, d)
    rows, k = w64.shape
    # Scale candidates are evaluated several at a time, stacked as extra rows, so that small problems
    # (groups, small layers) run a few large tensor operations instead of many tiny ones (kernel
    # launches dominate on a GPU); on a CPU, arrays beyond the caches only cost memory traffic.
    per_batch = max(1, (1 << (25 if w64.is_cuda else 20)) // max(rows * k, 1))

    def evaluate(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best candidate of each row among the scale multipliers t (c, rows): (t, zero, loss), (rows,) each."""
        zero_out, loss_out = torch.empty_like(t), torch.empty_like(t)
        for first in range(0, t.shape[0], per_batch):
            chunk = t[first:first + per_batch]
            times = chunk.shape[0]
            scale = (s_mm * chunk).reshape(-1)
            u = w64.repeat(times, 1) / scale[:, None]
            d_rep = d.repeat(times, 1)
            if symmetric:
                zero = torch.full_like(scale, centre)
                loss = _fixed_zero_loss(u, d_rep, centre, maxq)
            else:
                start = rows_sorted.repeat(times).relaxed_zero(scale, maxq) - 1.0
                zero, loss = _window_zero(u, d_rep, start, maxq)
            zero_out[first:first + times] = zero.reshape(times, rows)
            loss_out[first:first + times] = (loss * scale.square()).reshape(times, rows)
        # ties go to the first candidate: the larger scale in the coarse pass (it starts at min-max's)
        best = loss_out.argmin(dim=0, keepdim=True)
        return t.gather(0, best)[0], zero_out.gather(0, best)[0], loss_out.gather(0, best)[0]

    # coarse: t = 1, (T_c − 1)/T_c, ..., 1/T_c of the min-max scale
    steps = torch.arange(coarse, 0, -1, dtype=torch.float64, device=w.device) / coarse
    best_t, best_zero_point, best_loss = evaluate(steps[:, None].expand(-1, rows))
    # fine: offsets of i/T_f around each row's best coarse multiplier (never below 1/(2T_c) > 0)
    half = fine // coarse // 2
    offsets = [i / fine for i in range(-half, half + 1) if i != 0]
    if offsets:
        offsets = torch.tensor(offsets, dtype=torch.float64, device=w.device)
        t_fine, zero_fine, loss_fine = evaluate(best_t[None, :] + offsets[:, None])
        better = loss_fine < best_loss
        best_t = torch.where(better, t_fine, best_t)
        best_zero_point = torch.where(better, zero_fine, best_zero_point)
    best_scale = s_mm * best_t

    scale, zero = best_scale.to(w.dtype), best_zero_point.to(w.dtype)
    # The min-max grid stays where the search (in float64) does not beat it on the loss as the
    # quantizers compute it, so NeUQI is never worse than min-max on its own objective.
    loss = weighted_error(w, scale[:, None], zero[:, None], d, maxq)
    loss_mm = weighted_error(w, scale_mm[:, None], zero_mm[:, None], d, maxq)
    keep = loss_mm <= loss
    return torch.where(keep, scale_mm, scale), torch.where(keep, zero_mm, zero)
