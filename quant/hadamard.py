"""Orthonormal Hadamard matrices of size n = 2^k * m and their fast application.

A Hadamard matrix of order n has entries +-1 and orthogonal rows (H H^T = n I); H / sqrt(n) is a
rotation. Orders built here: Sylvester's powers of two, and their Kronecker products with one
small matrix from Paley's constructions (q prime):

* Paley I,  q = 3 mod 4: order m = q + 1     (12 from q = 11, 20, 24, 44, 48, 140, ...)
* Paley II, q = 1 mod 4: order m = 2 (q + 1) (28 from q = 13, 36 from 17, 148 from 73, 924 from 461)

which covers the widths of the common model families (SmolLM2 576 = 16 * 36 and 1536 = 128 * 12,
LLaMA-3-70B's 28672 = 1024 * 28, Qwen's 18944 = 128 * 148 and 29568 = 32 * 924).

``x H`` for H = A_m (x) S_{2^k} never forms the n x n matrix: S_{2^k} is itself a Kronecker product
of small Sylvester matrices, and with x viewed as (..., m, f_1, f_2, ...) each factor is one small
matrix product along its own axis (n * (m + f_1 + f_2 + ...) operations instead of n^2). The
randomised rotation (QuaRot) is Q = D H / sqrt(n), D a seeded random +-1 diagonal.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

#: Largest Paley factor built (a dense m x m matrix); larger ones would cost more than they save.
MAX_PALEY_ORDER = 4096


class HadamardSizeError(ValueError):
    """No Hadamard matrix of the requested size can be built here."""


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, math.isqrt(q) + 1))


def _legendre(q: int) -> torch.Tensor:
    """chi(a) for a in 0..q-1: 0 for a = 0, +1 for a quadratic residue mod q, -1 otherwise."""
    chi = -torch.ones(q, dtype=torch.float64)
    chi[0] = 0
    chi[sorted({a * a % q for a in range(1, q)})] = 1
    return chi


def _conference(q: int, skew: bool) -> torch.Tensor:
    """Paley's conference matrix of order q + 1: [[0, 1^T], [+-1, J]] with J[i, j] = chi(j - i)."""
    chi = _legendre(q)
    index = torch.arange(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1 if skew else 1
    S[1:, 1:] = chi[(index[None, :] - index[:, None]) % q]
    return S


def paley_factor(m: int) -> tuple[str, int] | None:
    """Which Paley construction builds order ``m`` (("I" | "II", q)), or None."""
    if m % 4 or m > MAX_PALEY_ORDER:
        return None
    if _is_prime(m - 1):  # m = 0 mod 4 makes q = m - 1 = 3 mod 4
        return "I", m - 1
    q = m // 2 - 1
    if q % 4 == 1 and _is_prime(q):
        return "II", q
    return None


@lru_cache(maxsize=None)
def paley_matrix(m: int) -> torch.Tensor:
    """The +-1 Hadamard matrix of order ``m`` from Paley's constructions (float64, m x m)."""
    found = paley_factor(m)
    if found is None:
        raise HadamardSizeError(f"no Paley construction of order {m}")
    kind, q = found
    if kind == "I":  # S skew-symmetric with S S^T = q I, so (I + S)(I + S)^T = (q + 1) I
        return torch.eye(m, dtype=torch.float64) + _conference(q, skew=True)
    # S symmetric with S^2 = q I: the 0 diagonal becomes [[1,-1],[-1,-1]], each +-1 becomes +-[[1,1],[1,-1]]
    S = _conference(q, skew=False)
    P = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    R = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(S, P) + torch.kron(torch.eye(q + 1, dtype=torch.float64), R)


def factorize(n: int) -> tuple[int, int]:
    """(2^k, m) with n = 2^k * m and m = 1 or a Paley order, the smallest such m (cheapest to apply)."""
    if n < 1:
        raise HadamardSizeError(f"no Hadamard matrix of size {n}")
    power = n & -n  # largest power of two dividing n
    tried = []
    p = power
    while p >= 1:
        m = n // p
        if m == 1 or paley_factor(m) is not None:
            return p, m
        tried.append(f"{p}*{m}")
        p //= 2
    raise HadamardSizeError(
        f"no Hadamard matrix of size {n}: none of {', '.join(tried)} has a factor m that Paley's constructions "
        f"build (m = q+1 with q = 3 mod 4 prime, or m = 2(q+1) with q = 1 mod 4 prime, m <= {MAX_PALEY_ORDER})")


#: Largest Sylvester factor applied as one dense product: 2^k is split into factors of at most
#: this size, so x S costs a few small matrix products (fast in BLAS) instead of k butterfly passes.
SYLVESTER_BLOCK = 64


@lru_cache(maxsize=None)
def sylvester_matrix(p: int) -> torch.Tensor:
    """The +-1 Sylvester-Hadamard matrix of order p = 2^k: S[i, j] = (-1)^popcount(i & j), symmetric."""
    if p < 1 or p & (p - 1):
        raise HadamardSizeError(f"Sylvester's construction needs a power of two, not {p}")
    S = torch.ones(1, 1, dtype=torch.float64)
    H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while S.shape[0] < p:
        S = torch.kron(S, H2)
    return S


def sylvester_factors(p: int) -> list[int]:
    """Orders of at most ``SYLVESTER_BLOCK`` whose Kronecker product is S_p (S_a (x) S_b = S_ab)."""
    factors = []
    while p > 1:
        factors.append(min(p, SYLVESTER_BLOCK))
        p //= factors[-1]
    return factors


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """x (F_1 (x) ... (x) F_k) along the last axis (or x (...)^T): index i = (i_1, ..., i_k), i_1 slowest,
    so each factor contracts its own axis of x viewed as (..., f_1, ..., f_k)."""
    sizes = [F.shape[0] for F in factors]
    X = x.reshape(-1, *sizes)
    for axis, F in enumerate(factors, start=1):
        X = torch.movedim(torch.movedim(X, axis, -1) @ (F.T if transpose else F), -1, axis)
    return X.reshape(x.shape)


class Hadamard:
    """The orthonormal n x n rotation Q = D H / sqrt(n), applied to the last axis of a tensor:
    ``apply(x)`` = x Q and ``apply(x, transpose=True)`` = x Q^T. D is +-1 from ``seed`` (randomised
    Hadamard, as QuaRot) or the identity for ``seed=None``. Computes in x's dtype."""

    def __init__(self, n: int, seed: int | None = None):
        self.n = n
        self.power, self.m = factorize(n)
        # H = A_m (x) S_{2^k}, S_{2^k} itself a product of small Sylvester factors.
        self.factors = ([paley_matrix(self.m)] if self.m > 1 else []) + [
            sylvester_matrix(f) for f in sylvester_factors(self.power)]
        self.signs = None
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            self.signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        self._cache: dict = {}

    def _on(self, like: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The factors and signs in ``like``'s dtype and device (converted once)."""
        key = (like.dtype, like.device)
        if key not in self._cache:
            to = lambda t: t.to(dtype=like.dtype, device=like.device)
            self._cache[key] = ([to(F) / math.sqrt(F.shape[0]) for F in self.factors],
                                None if self.signs is None else to(self.signs))
        return self._cache[key]

    def apply(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"Hadamard of size {self.n} applied to a last axis of {x.shape[-1]}")
        factors, signs = self._on(x)
        if signs is not None and not transpose:  # x Q = (x D) H / sqrt(n);  x Q^T = (x H^T / sqrt(n)) D
            x = x * signs
        out = kron_apply(x, factors, transpose) if factors else x.clone()
        if signs is not None and transpose:
            out = out * signs
        return out

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Q itself (n x n): for tests and small sizes."""
        return self.apply(torch.eye(self.n, dtype=dtype))
