"""Damping of the layer Hessian H = X̂ᵀX̂, shared by GPTQ and the LoaQ targets.

The LoaQ target W̃ and the GPTQ solver must see the *same* damped H: the target is the minimiser
of ‖X̂(Q − W̃)‖² + λ‖Q − W̃‖² only if both use the same λ (paper Appendix B.1, eq. 33). So H is
damped once, here, and both consumers read the result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

# When a user asked for percdamp = 0 (exact least squares) and H is singular, multiplying by the
# escalation factor would stay at 0; this is the first non-zero value tried instead.
_FIRST_NONZERO_PERCDAMP = 1e-6


class HessianDampingError(RuntimeError):
    """H stays non positive-definite even at the largest allowed damping."""


@dataclass
class DampedHessian:
    """H (in, in) float64 after dead-input repair and damping, with its Cholesky factor.

    dead: (in,) bool, inputs whose diagonal was exactly 0 (never active in calibration); their
        diagonal was set to 1 before damping, like the GPTQ reference.
    lam: the absolute λ added to the diagonal (= percdamp · mean of the repaired diagonal).
    percdamp: the relative damping finally used (larger than requested after escalations).
    escalations: how many times the damping had to be increased for Cholesky to succeed.
    """

    H: torch.Tensor
    dead: torch.Tensor
    lam: float
    percdamp: float
    escalations: int
    cholesky_lower: torch.Tensor = field(repr=False)  # L with H = L Lᵀ, float64

    @property
    def n_in(self) -> int:
        return self.H.shape[0]

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """H⁻¹ · rhs for rhs (in, k) or (in,), in float64, via the stored Cholesky factor."""
        if rhs.shape[0] != self.n_in:
            raise ValueError(f"rhs has {rhs.shape[0]} rows, H is {self.n_in}x{self.n_in}")
        rhs64 = rhs.to(device=self.H.device, dtype=torch.float64)
        if rhs64.dim() == 1:
            return torch.cholesky_solve(rhs64[:, None], self.cholesky_lower)[:, 0]
        return torch.cholesky_solve(rhs64, self.cholesky_lower)

    def drop_factor(self) -> None:
        """Free the Cholesky factor once no more solves are needed (GPTQ only needs H itself)."""
        self.cholesky_lower = None

    def inverse_cholesky_upper(self, perm: torch.Tensor | None = None) -> torch.Tensor:
        """Upper-triangular U (float64) with UᵀU = (P H Pᵀ)⁻¹, P the column order ``perm``.

        This is the factor GPTQ propagates errors through. It is computed without forming H⁻¹:
        with J the order reversal and L' the lower Cholesky factor of J P H Pᵀ J,
        (P H Pᵀ)⁻¹ = (J L'⁻¹ J)ᵀ (J L'⁻¹ J) and J L'⁻¹ J is upper triangular with a positive
        diagonal, hence *the* Cholesky factor. One Cholesky and one triangular solve instead of
        the reference's Cholesky, cholesky_inverse and second Cholesky (a triangular solve is far
        cheaper than torch's CPU cholesky_inverse), and no Cholesky of the worse-conditioned H⁻¹.
        Permuting H does not change the damping decided here.
        """
        # Peak memory is held to H + 3 (in x in): the reordered copy is freed once factored.
        if perm is None:
            H_rev = self.H.flip((0, 1))
        else:
            reversed_order = perm.to(self.H.device).flip(0)
            H_rev = self.H[reversed_order[:, None], reversed_order]
        L_rev, info = torch.linalg.cholesky_ex(H_rev)
        del H_rev
        if int(info) != 0:
            raise HessianDampingError(
                f"Cholesky of the reordered H failed at pivot {int(info)} although H itself factored "
                f"(percdamp={self.percdamp:g}); H is too ill-conditioned, use a larger percdamp"
            )
        eye = torch.eye(self.n_in, dtype=torch.float64, device=self.H.device)
        L_rev_inv = torch.linalg.solve_triangular(L_rev, eye, upper=False)  # lower
        del L_rev, eye
        return L_rev_inv.flip((0, 1))  # J L'⁻¹ J: upper


def _symmetrize_(H: torch.Tensor, block: int = 1024) -> None:
    """H <- (H + Hᵀ)/2 in place, by blocks of rows, so the temporaries are (block x in) only."""
    n = H.shape[0]
    for start in range(0, n, block):
        stop = min(n, start + block)
        # rows [start, stop) against columns [0, stop): the mirrored pairs not yet averaged
        lower = H[start:stop, :stop]
        upper = H[:stop, start:stop].T
        mean = (lower + upper) / 2
        H[start:stop, :stop] = mean
        H[:stop, start:stop] = mean.T


def damp_hessian(
    H: torch.Tensor,
    percdamp: float = 0.01,
    max_percdamp: float = 1.0,
    escalation_factor: float = 10.0,
    overwrite: bool = False,
) -> DampedHessian:
    """Repair dead inputs and add λ = percdamp · mean(diag H) to the diagonal, in float64.

    If the damped H is not positive definite (Cholesky fails), percdamp is multiplied by
    ``escalation_factor`` (the last try is ``max_percdamp`` itself) with a warning naming the value
    finally used; past ``max_percdamp`` a HessianDampingError is raised. The input is not modified,
    unless ``overwrite`` and it is float64: then it becomes the damped H (for an accumulator that
    is not needed afterwards; it saves the largest allocation of a layer).
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square (in, in), got shape {tuple(H.shape)}")
    if not (0.0 <= percdamp <= max_percdamp):
        raise ValueError(f"need 0 <= percdamp <= max_percdamp, got percdamp={percdamp}, max_percdamp={max_percdamp}")
    if not escalation_factor > 1.0:
        raise ValueError(f"escalation_factor must be > 1, got {escalation_factor}")
    # Cholesky reads one triangle only; symmetrising makes solve() and the stored H agree.
    if overwrite and H.dtype == torch.float64:
        H64 = H  # the caller's accumulator becomes the damped H: no in x in copy (the largest tensor)
    else:
        H64 = H.to(torch.float64, copy=True)
    _symmetrize_(H64)
    if not torch.isfinite(H64).all():
        raise ValueError("H contains NaN or inf")
    diag = H64.diagonal()
    dead = diag == 0
    # A zero diagonal means the input was exactly 0 on every calibration token: its weights do
    # not affect the loss, and a unit diagonal keeps H invertible without coupling it to others.
    diag[dead] = 1.0
    mean_diag = float(diag.mean())
    if not mean_diag > 0.0:
        raise ValueError(f"mean of diag(H) is {mean_diag:g}; H is not a Gram matrix X̂ᵀX̂")
    requested = percdamp
    attempt = percdamp
    escalations = 0
    lam = 0.0
    while True:
        # Damping is applied in place (no second in x in copy): the diagonal moves from the
        # previous attempt's lambda to this one's.
        new_lam = attempt * mean_diag
        diag.add_(new_lam - lam)
        lam = new_lam
        L, info = torch.linalg.cholesky_ex(H64)
        if int(info) == 0:
            break
        del L
        if attempt >= max_percdamp:
            raise HessianDampingError(
                f"H is not positive definite even with percdamp={attempt:g} (λ={lam:g}); "
                f"requested percdamp={requested:g}, bound max_percdamp={max_percdamp:g}"
            )
        next_attempt = attempt * escalation_factor if attempt > 0 else _FIRST_NONZERO_PERCDAMP
        attempt = min(next_attempt, max_percdamp)
        escalations += 1
    H_damped = H64
    if escalations:
        warnings.warn(
            f"Cholesky of the damped Hessian failed at percdamp={requested:g}; "
            f"using percdamp={attempt:g} (λ={lam:.6g}) after {escalations} escalation(s)",
            stacklevel=2,
        )
    return DampedHessian(
        H=H_damped, dead=dead, lam=lam, percdamp=attempt, escalations=escalations, cholesky_lower=L
    )
