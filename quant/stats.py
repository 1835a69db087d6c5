"""Streaming calibration statistics for the LoaQ targets (paper Algorithm 1, lines 6–16).

Two streams run through the model: the clean one (X, h) and the quantized one (X̂, ĥ). The
accumulators are fed one micro-batch at a time and only hold (in, in) and (in, out) sums, never
the tokens. Sums are kept in float64; each micro-batch product is computed in ``compute_dtype``
(float32 by default: the cost is a (t, in)ᵀ(t, in) matmul per batch, and float32 products of one
batch are accurate to ~1e-7 relative, far below the calibration noise) and then added in
float64 so that rounding does not grow with the number of batches. Pass
``compute_dtype=torch.float64`` for bit-for-bit reproducible sums in tests.

C = Σ X̂ᵀ(X − X̂) is accumulated from the difference X − X̂, never as Σ X̂ᵀX − Σ X̂ᵀX̂, which
would cancel catastrophically when the streams are close.

The Gram sums H = Σ X̂ᵀX̂ are symmetric, and torch has no symmetric rank-k update, so ``SymmetricSum``
forms only the block upper triangle (4 column blocks: 10 of 16 block products, ~0.63 of the flops)
and mirrors it once when H is read. H is the largest product of every method (GPTQ's only one).
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
    diagonal only, mirrored below when read (``value``). Measured here on 4096 tokens into a float64
    sum: 576 wide 14.5 -> 9.9 ms, 1536 wide 108 -> 67 ms per batch (2 threads)."""

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

    def add_sum(self, other: "SymmetricSum") -> None:
        """Add another sum of the same width (its mirrored part is rebuilt from the upper one)."""
        self._sum += other._sum.to(self._sum.device)
        self._mirrored = self._mirrored and other._mirrored

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

    def merge(self, other: "InputStats") -> "InputStats":
        """Add another accumulator's sums (e.g. a resumed partial run) into this one."""
        if not isinstance(other, InputStats) or other.n_in != self.n_in:
            raise ValueError("can only merge InputStats of the same width")
        self._H.add_sum(other._H)
        if other._C is not None:
            self._C = other._C.to(self._H.device).clone() if self._C is None else self._C + other._C.to(self._H.device)
        self.n_tokens += other.n_tokens
        return self

    @property
    def H(self) -> torch.Tensor:
        return self._H.value

    @property
    def C(self) -> torch.Tensor | None:
        """None when only one stream was added (C = 0)."""
        return self._C

    @property
    def B(self) -> None:
        return None


class OutputStats:
    """Statistics for the sub-layer output projection W_out (SOA / NOA in the paper).

    With per-token scales s (clean) and ŝ (quantized stream), X' = diag(s)X, X̂' = diag(ŝ)X̂:
        H = Σ X̂'ᵀX̂'  (in, in),  C = Σ X̂'ᵀ(X' − X̂')  (in, in),  B = Σ X̂'ᵀ(s·h − ŝ·ĥ)  (in, out)
    where h, ĥ (t, out) are the residual streams the sub-layer output is added to. With
    s = ŝ = R(h + XW) / R(ĥ + X̂W) (the RMSNorm factors) this is the normalized objective (12);
    with s = ŝ = None (all ones) it is the plain sub-layer objective (9).
    """

    def __init__(
        self, n_in: int, n_out: int, *, compute_dtype: torch.dtype = torch.float32, device=None
    ) -> None:
        self.n_in = n_in
        self.n_out = n_out
        self.compute_dtype = compute_dtype
        self._H = SymmetricSum(n_in, device=device)
        self._C = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self._B = torch.zeros(n_in, n_out, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add(
        self,
        X: torch.Tensor,
        Xq: torch.Tensor,
        h: torch.Tensor,
        hq: torch.Tensor,
        s: torch.Tensor | None = None,
        sq: torch.Tensor | None = None,
    ) -> None:
        """X, Xq: (..., in) inputs of W_out; h, hq: (..., out) residuals; s, sq: (...,) or None."""
        if (s is None) != (sq is None):
            raise ValueError("pass both s and sq (normalized) or neither (unnormalized)")
        dev, dt = self._H.device, self.compute_dtype
        X = _as_tokens(X, self.n_in, "X").to(device=dev, dtype=dt)
        Xq = _as_tokens(Xq, self.n_in, "Xq").to(device=dev, dtype=dt)
        h = _as_tokens(h, self.n_out, "h").to(device=dev, dtype=dt)
        hq = _as_tokens(hq, self.n_out, "hq").to(device=dev, dtype=dt)
        n = X.shape[0]
        if not (Xq.shape[0] == h.shape[0] == hq.shape[0] == n):
            raise ValueError("X, Xq, h and hq must have the same number of tokens")
        if s is not None:
            s = _as_token_scale(s, n, "s").to(device=dev, dtype=dt)[:, None]  # (t, 1)
            sq = _as_token_scale(sq, n, "sq").to(device=dev, dtype=dt)[:, None]
            X, h = s * X, s * h
            Xq, hq = sq * Xq, sq * hq
        self._H.add(Xq)
        self._C += Xq.T @ (X - Xq)
        self._B += Xq.T @ (h - hq)
        self.n_tokens += n

    def merge(self, other: "OutputStats") -> "OutputStats":
        """Add another accumulator's sums (e.g. a resumed partial run) into this one."""
        if not isinstance(other, OutputStats) or (other.n_in, other.n_out) != (self.n_in, self.n_out):
            raise ValueError("can only merge OutputStats of the same shape")
        self._H.add_sum(other._H)
        self._C += other._C.to(self._C.device)
        self._B += other._B.to(self._B.device)
        self.n_tokens += other.n_tokens
        return self

    @property
    def H(self) -> torch.Tensor:
        return self._H.value

    @property
    def C(self) -> torch.Tensor:
        return self._C

    @property
    def B(self) -> torch.Tensor:
        return self._B


def token_rms_factor(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token RMSNorm factor r(x) = (mean(x²) + eps)^-1/2 (paper eq. 1) of x (t, d) float32 -> (t,).
    One pass over x (a vector norm) instead of x², its mean and the temporaries in between."""
    return torch.linalg.vector_norm(x, dim=-1).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


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
    """D of ``ProjectedOutputStats`` for one micro-batch, and ŝ (None when unnormalised).

    h, hq: (t, out) residual inputs of the two streams; y: (t, out) the clean sub-layer output
    XWᵀ + b; xq: (t, in) the quantized stream's W_out input; W: (out, in); eps: the next RMSNorm's
    epsilon (s, ŝ = r(h + Y), r(ĥ + Ŷ), paper eq. 12), or None for s = ŝ = 1 (eq. 9).

    With u = h + Y and û = ĥ + Ŷ the sub-layer outputs added to their residuals,
        α(Y − b) + β(h + b) = α·u + (β − α)(h + b),
    so D = s·(α·u + (β − α)(h + b)) − ŝ·(α·û + (β − α)(ĥ + b)). Written this way D costs û in the
    matmul that makes Ŷ (addmm), one vector norm per stream and one fused multiply-add per term: a
    quarter of the elementwise passes of forming each side separately (this runs on every token of
    every W_out, so its passes over (t, out) cost as much as the statistics' matmuls on a CPU).
    """
    hb, hqb = (h, hq) if bias is None else (h + bias, hq + bias)
    u = h + y
    uq = torch.addmm(hqb, xq, W.T)  # ĥ + b + X̂Wᵀ
    if eps is None:
        s = sq = torch.ones((), dtype=u.dtype, device=u.device)
    else:
        s, sq = token_rms_factor(u, eps)[:, None], token_rms_factor(uq, eps)[:, None]
    D = u.mul_(s * alpha)  # u is ours: scaled in place
    D.addcmul_(uq, sq, value=-alpha)
    if beta != alpha:
        D.addcmul_(hb, s, value=beta - alpha).addcmul_(hqb, sq, value=alpha - beta)
    return D, (None if eps is None else sq[:, 0])


class ProjectedOutputStats:
    """W_out statistics for the LoaQ family gathered without the clean stream's W_out input X.

    The target needs C and B only through the (in, out) right-hand side α·C·Wᵀ + β·B (see
    ``targets.shifted_target``), and with X'·Wᵀ = s·(Y − b) it is one sum over tokens:

        R = Σ X̂'ᵀ D,   D = α·(s·(Y − b) − ŝ·(Ŷ − b)) + β·(s·(h + b) − ŝ·(ĥ + b))   (t, out)

    where Y = XWᵀ + b is the clean sub-layer output (stored with the clean stream), Ŷ = X̂Wᵀ + b,
    h, ĥ the residual inputs and s, ŝ the next norm's per-token factors (ones when unnormalised).
    Equal to OutputStats' α·C·Wᵀ + β·B; the caller forms D, so X is never needed. H = Σ X̂'ᵀX̂'.
    """

    def __init__(self, n_in: int, n_out: int, *, compute_dtype: torch.dtype = torch.float32, device=None) -> None:
        self.n_in, self.n_out = n_in, n_out
        self.compute_dtype = compute_dtype
        self._H = SymmetricSum(n_in, device=device)
        self._R = torch.zeros(n_in, n_out, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add(self, Xq: torch.Tensor, D: torch.Tensor, sq: torch.Tensor | None = None) -> None:
        """Xq: (..., in) quantized-stream input of W_out; D: (..., out) as above; sq: (...,) or None."""
        dev, dt = self._H.device, self.compute_dtype
        Xq = _as_tokens(Xq, self.n_in, "Xq").to(device=dev, dtype=dt)
        D = _as_tokens(D, self.n_out, "D").to(device=dev, dtype=dt)
        if Xq.shape[0] != D.shape[0]:
            raise ValueError(f"Xq has {Xq.shape[0]} tokens but D has {D.shape[0]}")
        if sq is not None:
            Xq = _as_token_scale(sq, Xq.shape[0], "sq").to(device=dev, dtype=dt)[:, None] * Xq
        self._H.add(Xq)
        self._R += Xq.T @ D
        self.n_tokens += Xq.shape[0]

    @property
    def H(self) -> torch.Tensor:
        return self._H.value

    @property
    def R(self) -> torch.Tensor:
        return self._R
