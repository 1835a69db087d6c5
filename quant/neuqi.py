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

Speed (CPU). Ranking the T_c + T_f/T_c (96) scales of a row by the exact window sweep needs a sort
per row and scale (``bench/neuqi_speed.py`` times both). The scales are instead ranked by a binned sweep
(_binned_loss), and only the chosen scale's zero point is found by the exact sweep:

* each code step of the window is moved to the left edge of its bin (128 per unit of z): a step moved
  earlier by δ rounds its point to the neighbouring code while the error is in (½ − δ, ½], which costs
  2δ·d, so the binned minimum is an upper bound of the exact one, above it by at most 2/128 of the
  weight of the steps in one bin (~1e-4 of the loss on spread-out rows). Per-bin sums of d and d·t
  (two scatter-adds, no sort) give B and C at every bin edge, and each bin's quadratic is minimised
  in closed form;
* it runs in float32 (ranking only) on cache-sized chunks of rows × candidates, each row's candidates
  broadcast against the row rather than stacked copies; on a CPU each thread searches its share of the
  rows with single-threaded ops;
* its window comes from 16 bisection steps (the bracket to ~1e-4 of a code; 40 for the exact sweep).

A row thus gets the scale the exact ranking would choose unless two candidates are within the
binned error of each other, where either is near-optimal; the chosen scale's zero point and the
min-max fallback are exact (float64) as before. ``exact=True`` ranks every scale by the exact sweep
(the previous search; tests and bench/neuqi_speed.py compare the two).

Deliberate differences from the reference code: the top scale is this project's min-max scale
(whose range includes 0) rather than (max − min)/maxq, so the min-max grid is among the candidates;
and the final comparison with min-max (the reference keeps its search result).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from .uniform import fake_quantize

# bins per unit of z in the binned search
_BINS = 128
_CPU_CHUNK = 18


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
        self.w = self.w.contiguous()  # sort keeps a strided input's layout; searchsorted wants rows contiguous
        d = d.gather(1, order)
        zero = torch.zeros_like(d[:, :1])
        self.d = torch.cat([zero, d.cumsum(1)], 1)  # (rows, k + 1): Σ_{i<j} d_i
        self.dw = torch.cat([zero, (d * self.w).cumsum(1)], 1)  # Σ_{i<j} d_i w_i

    def relaxed_zero(self, scale: torch.Tensor, maxq: int, iterations: int = 40) -> torch.Tensor:
        """Minimiser of the relaxed loss f̃(z) for u = w/scale, for each row and each of its scales
        ``scale`` (rows, c) (c candidates share the row's sorted copy; no stacked copies); returns
        (rows, c). A point counts (u + z)² below the grid (u + z < −½), (u + z − maxq)² above it
        (u + z > maxq + ½) and ¼ inside. Each term is convex in z (flat inside, quadratic outside),
        so f̃ is convex and its derivative
            f̃'(z)/2 = Σ_below d (u + z) + Σ_above d (u + z − maxq)
        is nondecreasing: bisection on its sign, each step two binary searches per row and scale.
        The exact window needs z̃ only roughly: 40 halvings of the initial bracket (< 2^11 wide) are
        plenty; the binned search, which only ranks scales, uses fewer."""
        s = scale
        total_d = self.d[:, -1:]
        u_min, u_max = self.w[:, :1] / s, self.w[:, -1:] / s
        lo, hi = -u_max - maxq - 1.0, -u_min + maxq + 1.0  # all points below / all above the grid
        du_total = self.dw[:, -1:] / s  # Σ d·u; Σ_{i<j} d_i u_i = dw_j / s
        for _ in range(iterations):
            z = 0.5 * (lo + hi)
            below = torch.searchsorted(self.w, s * (-0.5 - z), side="left")  # count with u + z < -1/2
            above = torch.searchsorted(self.w, s * (maxq + 0.5 - z), side="right")  # first with u + z > maxq + 1/2
            d_below, d_above = self.d.gather(1, below), total_d - self.d.gather(1, above)
            slope = (self.dw.gather(1, below) / s + (du_total - self.dw.gather(1, above) / s)
                     + z * (d_below + d_above) - maxq * d_above)
            rising = slope > 0
            hi = torch.where(rising, z, hi)
            lo = torch.where(rising, lo, z)
        return 0.5 * (lo + hi)


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
    start = _SortedRows(u, d).relaxed_zero(torch.ones_like(u[:, :1]), maxq)[:, 0] - 1.0
    return _window_zero(u, d, start, maxq)


def _binned_loss(w: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, start: torch.Tensor, maxq: int,
                 bins: int) -> torch.Tensor:
    """An upper bound, within 2·(Σ d of one bin's events)/bins of the exact minimum, of min f(z) on the
    window [start, start + 2] for u = w/scale; w (rows, k), d (k,), scale and start (rows, c) -> (rows, c).

    The window sweep of _window_zero with each code step moved to the left edge of its bin
    (``bins`` per unit of z): no sort, two scatter-adds per point. Moving a step earlier by δ < 1/bins
    rounds that point to the neighbouring code while its error is in (½ − δ, ½], which raises its
    squared error by 2δ·d; so the binned loss is never below the exact one, and above it by at most
    2/bins times the weight of the steps in the bin where it is evaluated."""
    rows, c = scale.shape
    # (rows, c, k): u + z at the window's left end, and the nearest code (a tie may round either way)
    v = torch.addcmul(start[:, :, None], w[:, None, :], scale.reciprocal()[:, :, None])
    unclamped = torch.round(v)
    t = unclamped + 0.5 - v  # position in [0, 1] of the point's first code step; the second is at t + 1
    residual = v - unclamped.clamp(0, maxq)
    weighted = d * residual
    B0, C0 = weighted.sum(-1), (weighted * residual).sum(-1)
    # Steps exist for codes k -> k + 1 with 0 <= k <= maxq - 1: the first (k = unclamped) for
    # 0 <= unclamped <= maxq - 1, the second for -1 <= unclamped <= maxq - 2. One scatter sorts points
    # into three classes x bins: 0: unclamped = -1 (second step only), 1: both steps, 2: unclamped =
    # maxq - 1 (first step only); points with no step in the window get weight 0.
    has_step = (unclamped >= -1) & (unclamped <= maxq - 1)
    d_step = torch.where(has_step, d, 0.0)
    cls = (unclamped + 1).clamp_(0, 1) + (unclamped - (maxq - 2)).clamp_(0, 1)
    index = (t * bins).clamp_(max=bins - 0.5).add_(cls * bins).long().view(rows * c, -1)
    mass = torch.zeros(rows * c, 3 * bins, dtype=w.dtype, device=w.device)
    moment = torch.zeros_like(mass)
    mass.scatter_add_(1, index, d_step.view(rows * c, -1))
    moment.scatter_add_(1, index, (d_step * t).view(rows * c, -1))
    mass, moment = mass.view(rows, c, 3, bins), moment.view(rows, c, 3, bins)
    first_d, first_t = mass[:, :, 1] + mass[:, :, 2], moment[:, :, 1] + moment[:, :, 2]
    second_d, second_t = mass[:, :, 0] + mass[:, :, 1], moment[:, :, 0] + moment[:, :, 1]
    # a step of a point with weight d at position p: B = Σ d·err drops by d, C = Σ d·err² rises by
    # d(1 − 2(v − k)) = 2d·p (first step, k = unclamped) or 2d·(p + 1) (second step, k = unclamped + 1)
    B = B0[..., None] - torch.cat([first_d, second_d], -1).cumsum(-1)
    C = C0[..., None] + torch.cat([2 * first_t, 2 * (second_t + second_d)], -1).cumsum(-1)
    A = d.sum()
    edges = torch.arange(2 * bins + 1, dtype=w.dtype, device=w.device) / bins
    x = torch.minimum(torch.maximum(-B / A, edges[:-1]), edges[1:])
    return ((A * x + 2 * B) * x + C).amin(-1).clamp_min(0.0)


def _fixed_zero_loss(u: torch.Tensor, d: torch.Tensor, zero: float, maxq: int) -> torch.Tensor:
    v = u + zero
    return (d * (v - torch.clamp(torch.round(v), 0, maxq)).square()).sum(1)


def weighted_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, d: torch.Tensor, maxq: int) -> torch.Tensor:
    """Σ_i d_i (q(w_i) − w_i)² per row, q the grid's fake quantization as the quantizers apply it. (rows,)"""
    err = fake_quantize(w, scale, zero, maxq) - w
    return (d.to(torch.float64) * err.to(torch.float64).square()).sum(1)


def neuqi_grid(w: torch.Tensor, importance: torch.Tensor, scale_mm: torch.Tensor, zero_mm: torch.Tensor, maxq: int,
               symmetric: bool, coarse: int, fine: int, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """NeUQI's (scale, zero) per row of w (rows, k) for column weights ``importance`` (k,), starting from
    the min-max grid (scale_mm, zero_mm), (rows,) each. Symmetric grids keep their fixed centre zero
    point and search the scale only. ``exact``: rank every scale candidate by its exact loss (slow on
    a CPU) instead of the binned one. Returns (rows,) tensors in w's dtype."""
    search = lambda rows: _neuqi_grid(w[rows], importance, scale_mm[rows], zero_mm[rows], maxq, symmetric,
                                      coarse, fine, exact)
    if w.is_cuda:
        return search(slice(None))
    # On a CPU the search is many cache-sized ops: fanning each out over OpenMP threads waits on
    # descheduled ones when the machine is loaded. Rows are independent, so instead each of the
    # configured threads searches its own share of the rows with single-threaded ops (torch releases
    # the GIL inside each op): the same result, bit for bit (``bench/neuqi_speed.py``).
    threads = torch.get_num_threads()
    share = max(1, -(-w.shape[0] // threads))
    parts = [slice(start, start + share) for start in range(0, w.shape[0], share)]  # views, no copies
    torch.set_num_threads(1)
    try:
        if len(parts) <= 1:
            return search(slice(None))
        with ThreadPoolExecutor(len(parts)) as pool:
            found = list(pool.map(search, parts))
        return torch.cat([scale for scale, _ in found]), torch.cat([zero for _, zero in found])
    finally:
        torch.set_num_threads(threads)


def _neuqi_grid(w, importance, scale_mm, zero_mm, maxq, symmetric, coarse, fine, exact):
    w64 = w.to(torch.float64)
    d = importance.to(device=w.device, dtype=torch.float64).reshape(1, -1).expand_as(w64)
    if not bool((d.sum(1) > 0).all()):
        d = torch.ones_like(w64)  # no column carries weight: plain squared error
    s_mm = scale_mm.to(torch.float64)
    centre = (maxq + 1) / 2
    rows, k = w64.shape
    rows_sorted = None if symmetric else _SortedRows(w64, d)
    binned = not (symmetric or exact)
    w32, d32 = w.to(torch.float32), d[0].to(torch.float32)
    # Rows are processed in chunks of about 2^18 (CPU: cache-sized) or 2^25 (GPU) elements x candidates.
    budget = 1 << (25 if w.is_cuda else _CPU_CHUNK)

    def exact_loss(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact best zero point and loss for the scale multipliers t (rows, c): (rows, c) each."""
        zero_out, loss_out = torch.empty_like(t), torch.empty_like(t)
        step = max(1, budget // max(t.shape[1] * k * 16, 1))  # the window sweep holds ~16 arrays of (., k)
        for first in range(0, rows, step):
            part = slice(first, first + step)
            scale = s_mm[part, None] * t[part]
            u = w64[part, None, :] / scale[..., None]
            if symmetric:
                zero = torch.full_like(scale, centre)
                loss = _fixed_zero_loss(u.flatten(0, 1), d[:1], centre, maxq).view_as(scale)
            else:
                sub = object.__new__(_SortedRows)
                sub.w, sub.d, sub.dw = rows_sorted.w[part], rows_sorted.d[part], rows_sorted.dw[part]
                start = sub.relaxed_zero(scale, maxq) - 1.0
                zero, loss = _window_zero(u.flatten(0, 1), d[:1].expand(u.shape[0] * u.shape[1], -1),
                                          start.flatten(), maxq)
                zero, loss = zero.view_as(scale), loss.view_as(scale)
            zero_out[part], loss_out[part] = zero, loss * scale.square()
        return zero_out, loss_out

    def binned_loss(t: torch.Tensor) -> torch.Tensor:
        """Binned loss (an upper bound of the exact one) for the scale multipliers t (rows, c)."""
        scale = s_mm[:, None] * t
        start = rows_sorted.relaxed_zero(scale, maxq, iterations=16) - 1.0
        step = max(1, budget // (t.shape[1] * k))
        loss = torch.cat([_binned_loss(w32[i:i + step], d32, scale[i:i + step].float(), start[i:i + step].float(),
                                       maxq, _BINS) for i in range(0, rows, step)])
        return loss.double() * scale.square()

    def best(t: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row the candidate of least loss, the first on ties: (t, loss), (rows,) each."""
        i = loss.argmin(dim=1, keepdim=True)
        return t.gather(1, i)[:, 0], loss.gather(1, i)[:, 0]

    evaluate = binned_loss if binned else (lambda t: exact_loss(t)[1])
    # coarse: t = 1, (T_c − 1)/T_c, ..., 1/T_c of the min-max scale; ties go to the larger scale
    steps = torch.arange(coarse, 0, -1, dtype=torch.float64, device=w.device) / coarse
    best_t, best_loss = best(steps[None, :].expand(rows, -1).contiguous(), evaluate(steps[None, :].expand(rows, -1)))
    # fine: offsets of i/T_f around each row's best coarse multiplier (never below 1/(2T_c) > 0)
    half = fine // coarse // 2
    offsets = [i / fine for i in range(-half, half + 1) if i != 0]
    if offsets:
        t_fine = best_t[:, None] + torch.tensor(offsets, dtype=torch.float64, device=w.device)
        t_fine, loss_fine = best(t_fine, evaluate(t_fine))
        best_t = torch.where(loss_fine < best_loss, t_fine, best_t)
    # the zero point of the chosen scale by the exact search
    best_zero_point = exact_loss(best_t[:, None])[0][:, 0]
    best_scale = s_mm * best_t

    scale, zero = best_scale.to(w.dtype), best_zero_point.to(w.dtype)
    # The min-max grid stays where the search (in float64) does not beat it on the loss as the
    # quantizers compute it, so NeUQI is never worse than min-max on its own objective.
    loss = weighted_error(w, scale[:, None], zero[:, None], d, maxq)
    loss_mm = weighted_error(w, scale_mm[:, None], zero_mm[:, None], d, maxq)
    keep = loss_mm <= loss
    return torch.where(keep, scale_mm, scale), torch.where(keep, zero_mm, zero)
