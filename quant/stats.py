"""Streaming calibration statistics for the LoaQ targets (paper Algorithm 1, lines 6–16).

Two streams run through the model: the clean one (X, h) and the quantized one (X̂, ĥ). The
accumulators are fed one micro-batch at a time and only hold (in, in) and (in, out) sums, never
the tokens. Sums are kept in float64; each micro-batch product is computed in ``compute_dtype``
(float32 by default: a product of one batch is accurate far below the calibration noise) and then added in
float64 so that rounding does not grow with the number of batches. Pass
``compute_dtype=torch.float64`` for bit-for-bit reproducible sums in tests.

C = Σ X̂ᵀ(X − X̂) is accumulated from the difference X − X̂, never as Σ X̂ᵀX − Σ X̂ᵀX̂, which
would cancel catastrophically when the streams are close.

The Gram sums H = Σ X̂ᵀX̂ are symmetric, and torch has no symmetric rank-k update, so ``SymmetricSum``
forms only the block upper triangle and mirrors it once when H is read: H is the largest product
of every method (GPTQ's only one).
"""

from __future__ import annotations

import torch


def _as_tokens(x: torch.Tensor, width: int, name: str) -> torch.Tensor:
    """Flatten leading (batch, seq) dims to (tokens, width)."""
    if x.shape[-1] != width:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected {width}")
    return x.reshape(-1, width)


def _as_token_scale(s: torch.Tensor, n_tokens: int, name: str) -> torch.Tensor:
    s = s.reshape(-1)
    if s.shape[0] != n_tokens:
        raise ValueError(f"{name} has {s.shape[0]} entries, expected one per token ({n_tokens})")
    return s


class SymmetricSum:
    """Σ XᵀX over micro-batches X (t, n), in float64: the products of the column blocks on and above the
    diagonal only, mirrored below when read (``value``)."""

    #: column blocks; below ``_MIN_WIDTH`` columns the full product is taken (blocks too small to pay)
    BLOCKS = 4
    _MIN_WIDTH = 256

    def __init__(self, n: int, *, device=None) -> None:
        self._sum = torch.zeros(n, n, dtype=torch.float64, device=device)
        self._step = n if n < self._MIN_WIDTH else -(-n // self.BLOCKS)
        self._mirrored = True  # the part below the block diagonal is up to date

    @property
    def device(self) -> torch.device:
        return self._sum.device

    def add(self, X: torch.Tensor) -> None:
        """X: (t, n), in the precision the product is to be computed in; the sum stays float64."""
        n, step = X.shape[1], self._step
        for start in range(0, n, step):
            self._sum[start:start + step, start:] += X[:, start:start + step].T @ X[:, start:]
        self._mirrored = step >= n

    @property
    def value(self) -> torch.Tensor:
        """The full symmetric (n, n) float64 sum (the accumulator itself: callers may modify it)."""
        if not self._mirrored:
            n, step = self._sum.shape[0], self._step
            for start in range(0, n - step, step):
                self._sum[start + step:, start:start + step] = self._sum[start:start + step, start + step:].T
            self._mirrored = True
        return self._sum


class InputStats:
    """H = Σ X̂ᵀX̂ and C = Σ X̂ᵀ(X − X̂), both (in, in), for a layer fed by the input stream (W_in).

    GPTQ and RTN have one stream (X = X̂, C = 0): they pass ``X=None`` and C is never formed, which
    saves one (in, in) product per micro-batch and the (in, in) float64 accumulator (C stays None).
    """

    def __init__(self, n_in: int, *, compute_dtype: torch.dtype = torch.float32, device=None) -> None:
        self.n_in = n_in
        self.compute_dtype = compute_dtype
        self._H = SymmetricSum(n_in, device=device)
        self._C: torch.Tensor | None = None
        self.n_tokens = 0

    def add(self, X: torch.Tensor | None, Xq: torch.Tensor) -> None:
        """X: (..., in) clean-stream input, or None when it is Xq itself; Xq: (..., in) quantized-stream
        input, same tokens."""
        Xq = _as_tokens(Xq, self.n_in, "Xq").to(device=self._H.device, dtype=self.compute_dtype)
        self._H.add(Xq)  # float32 products added into the float64 sum (cast inline, no copy)
        if X is not None:
            X = _as_tokens(X, self.n_in, "X")
            if X.shape[0] != Xq.shape[0]:
                raise ValueError(f"X has {X.shape[0]} tokens but Xq has {Xq.shape[0]}")
            X = X.to(device=self._H.device, dtype=self.compute_dtype)
            if self._C is None:
                self._C = torch.zeros(self.n_in, self.n_in, dtype=torch.float64, device=self._H.device)
            self._C += Xq.T @ (X - Xq)
        self.n_tokens += Xq.shape[0]

    @property
    def H(self) -> torch.Tensor:
        return self._H.value

    @property
    def C(self) -> torch.Tensor | None:
        """None when only one stream was added (C = 0)."""
        return self._C


def token_rms_factor(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token RMSNorm factor r(x) = (mean(x²) + eps)^-1/2 (paper eq. 1) of x (t, d) float32 -> (t,).
    One pass over x (a vector norm) instead of x², its mean and the temporaries in between."""
    return torch.linalg.vector_norm(x, dim=-1).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


def noa_factors(u: torch.Tensor, uq: torch.Tensor, eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """NOA, eq. (12): the per-token factors s = r(h + Y), ŝ = r(ĥ + Ŷ) of the next RMSNorm, as (t, 1)
    columns; with eps None (no NOA) both are 1 and the objective is the plain sub-layer one, eq. (9)."""
    if eps is None:
        one = torch.ones((), dtype=u.dtype, device=u.device)
        return one, one
    return token_rms_factor(u, eps)[:, None], token_rms_factor(uq, eps)[:, None]


def _output_streams(h, y, hq, xq, W, bias, eps):
    """h + b, ĥ + b, u = h + Y, û = ĥ + b + X̂Wᵀ (one matmul) and the NOA factors s, ŝ of u, û."""
    hb, hqb = (h, hq) if bias is None else (h + bias, hq + bias)
    u = h + y
    uq = torch.addmm(hqb, xq, W.T)
    s, sq = noa_factors(u, uq, eps)
    return hb, hqb, u, uq, s, sq


def projected_difference(
    h: torch.Tensor,
    y: torch.Tensor,
    hq: torch.Tensor,
    xq: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    alpha: float,
    beta: float,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch's D of ``ProjectedOutputStats`` (W_out's R = Σ X̂'ᵀD), and ŝ (None without NOA).

    h, hq: (t, out) residual inputs of the two streams; y: (t, out) the clean sub-layer output
    XWᵀ + b; xq: (t, in) the quantized stream's W_out input; W: (out, in); eps: the next RMSNorm's
    epsilon for NOA (``noa_factors``), or None.

        D = α·(s·(Y − b) − ŝ·(Ŷ − b))        LLOA, eq. (8): X'Wᵀ − X̂'Wᵀ, so X̂'ᵀD sums to α·C·Wᵀ
          + β·(s·(h + b) − ŝ·(ĥ + b))        SOA, eq. (10): the residual's mismatch

    With u = h + Y and û = ĥ + Ŷ this is s·(α·u + (β − α)(h + b)) − ŝ·(α·û + (β − α)(ĥ + b)), which
    is how it is computed: û comes from the matmul that makes Ŷ (addmm) and each term is one fused
    multiply-add over (t, out), which runs on every token of every W_out.
    """
    hb, hqb, u, uq, s, sq = _output_streams(h, y, hq, xq, W, bias, eps)
    D = u.mul_(s * alpha)  # u is ours: scaled in place
    D.addcmul_(uq, sq, value=-alpha)
    if beta != alpha:
        D.addcmul_(hb, s, value=beta - alpha).addcmul_(hqb, sq, value=alpha - beta)
    return D, (None if eps is None else sq[:, 0])


def projected_terms(
    h: torch.Tensor,
    y: torch.Tensor,
    hq: torch.Tensor,
    xq: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(D_lloa, D_soa, ŝ): ``projected_difference``'s D at (α, β) = (1, 0) and (0, 1), from one
    X̂Wᵀ, so that D(α, β) = α·D_lloa + β·D_soa for any pair; arguments as there.

        D_soa = s·(h + b) − ŝ·(ĥ + b),   D_lloa = s·u − ŝ·û − D_soa   (u = h + Y, û = ĥ + Ŷ)
    """
    hb, hqb, u, uq, s, sq = _output_streams(h, y, hq, xq, W, bias, eps)
    D_soa = hb * s - hqb * sq
    D_lloa = u.mul_(s).sub_(uq.mul_(sq)).sub_(D_soa)
    return D_lloa, D_soa, (None if eps is None else sq[:, 0])


def normalised_output_error(u: torch.Tensor, uq: torch.Tensor, eps: float) -> tuple[float, float]:
    """(Σ‖s·u − ŝ·û‖², Σ‖s·u‖²) over tokens of u, û (t, d): the sub-layer output as the next RMSNorm
    sees it (eq. 12 without its elementwise weight), clean against quantized."""
    u, uq = u.float(), uq.float()
    s, sq = noa_factors(u, uq, eps)
    ref = u * s
    return float((ref - uq * sq).square().sum()), float(ref.square().sum())


class ProjectedOutputStats:
    """W_out statistics for the LoaQ family gathered without the clean stream's W_out input X.

    The target needs C and B only through the (in, out) right-hand side R = α·C·Wᵀ + β·B (see
    ``targets.loaq_target``), and with X'·Wᵀ = s·(Y − b) it is one sum over tokens:

        R = Σ X̂'ᵀ D,   D = α·(s·(Y − b) − ŝ·(Ŷ − b)) + β·(s·(h + b) − ŝ·(ĥ + b))   (t, out)

    where Y = XWᵀ + b is the clean sub-layer output (stored with the clean stream), Ŷ = X̂Wᵀ + b,
    h, ĥ the residual inputs and s, ŝ the next norm's per-token factors (ones when unnormalised).
    The caller forms D (``projected_difference``), so X is never needed. H = Σ X̂'ᵀX̂'.
    """

    def __init__(self, n_in: int, n_out: int, *, compute_dtype: torch.dtype = torch.float32, device=None) -> None:
        self.n_in, self.n_out = n_in, n_out
        self.compute_dtype = compute_dtype
        self._H = SymmetricSum(n_in, device=device)
        self._R = torch.zeros(n_in, n_out, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add(self, Xq: torch.Tensor, D: torch.Tensor, sq: torch.Tensor | None = None) -> None:
        """Xq: (..., in) quantized-stream input of W_out; D: (..., out) as above; sq: (...,) or None."""
        Xq, (D,) = self._tokens(Xq, (D,), sq)
        self._H.add(Xq)
        self._R += Xq.T @ D
        self.n_tokens += Xq.shape[0]

    def _tokens(self, Xq: torch.Tensor, Ds: tuple[torch.Tensor, ...], sq: torch.Tensor | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Xq (tokens, in) weighted by ŝ and each D (tokens, out), in the compute dtype on H's device."""
        dev, dt = self._H.device, self.compute_dtype
        Xq = _as_tokens(Xq, self.n_in, "Xq").to(device=dev, dtype=dt)
        Ds = tuple(_as_tokens(D, self.n_out, "D").to(device=dev, dtype=dt) for D in Ds)
        if any(D.shape[0] != Xq.shape[0] for D in Ds):
            raise ValueError(f"Xq has {Xq.shape[0]} tokens but D has {Ds[0].shape[0]}")
        if sq is not None:
            Xq = _as_token_scale(sq, Xq.shape[0], "sq").to(device=dev, dtype=dt)[:, None] * Xq
        return Xq, Ds

    @property
    def H(self) -> torch.Tensor:
        return self._H.value

    @property
    def R(self) -> torch.Tensor:
        return self._R


class ProjectedTermStats(ProjectedOutputStats):
    """``ProjectedOutputStats`` with the LLOA and SOA parts of R kept apart, for trying several
    (α, β) on one pass over the tokens: R(α, β) = α·R_lloa + β·R_soa, since D is linear in (α, β)
    (``projected_terms``). The NOA factors weight H and both parts alike."""

    def __init__(self, n_in: int, n_out: int, *, compute_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(n_in, n_out, compute_dtype=compute_dtype, device=device)
        self._R_soa = torch.zeros(n_in, n_out, dtype=torch.float64, device=device)

    def add(self, Xq: torch.Tensor, D_lloa: torch.Tensor, D_soa: torch.Tensor, sq: torch.Tensor | None = None) -> None:
        """Xq: (..., in); D_lloa, D_soa: (..., out), the D of (α, β) = (1, 0) and (0, 1); sq as in ``add``."""
        Xq, (D_lloa, D_soa) = self._tokens(Xq, (D_lloa, D_soa), sq)
        self._H.add(Xq)
        self._R += Xq.T @ D_lloa
        self._R_soa += Xq.T @ D_soa
        self.n_tokens += Xq.shape[0]

    def rhs(self, alpha: float, beta: float) -> torch.Tensor:
        """R of (α, β), (in, out) float64."""
        return self._R * alpha + self._R_soa * beta


def summed_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Σ over tokens of KL(p ‖ q) between next-token distributions given as log-probabilities
    (t, vocab): p the reference (full precision), q the quantized model's."""
    log_p, log_q = log_p.float(), log_q.float()
    return float((log_p.exp() * (log_p - log_q)).sum())
