"""How far the quantized stream has drifted from the clean one (paper, Fig. 3-4).

Both the raw hidden states and their RMS-normalised versions (what the next sub-layer actually
reads) are compared. Outlier tokens, whose clean hidden state is orders of magnitude larger than
the rest (attention sinks such as the first token), dominate any mean; like the paper we exclude
them: a token is an outlier when its clean RMS exceeds ``outlier_factor`` times the median RMS.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

from .arrays import SampleArray, micro_batches


def outlier_threshold(h: SampleArray, outlier_factor: float = 10.0, micro_batch: int = 16) -> float:
    """Clean-RMS threshold above which a token counts as an outlier."""
    rms = torch.cat([h.read(a, b).float().pow(2).mean(-1).sqrt().reshape(-1)
                     for a, b in micro_batches(h.shape[0], micro_batch)])
    return float(outlier_factor * rms.median())


class DivergenceMeter:
    """Accumulates clean-vs-quantized MSE over micro-batches (outlier tokens excluded)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.sq_err = self.sq_err_norm = 0.0
        self.kept = self.outliers = self.tokens = 0

    @torch.no_grad()
    def add(self, h: torch.Tensor, hq: torch.Tensor) -> None:
        # h: the stored clean states (host); hq: the quantized stream as written (host or device)
        x = h.to(device=hq.device, dtype=torch.float32).reshape(-1, h.shape[-1])
        xq = hq.float().reshape(-1, hq.shape[-1])
        keep = x.pow(2).mean(-1).sqrt() <= self.threshold
        self.tokens += x.shape[0]
        self.outliers += int((~keep).sum())
        x, xq = x[keep], xq[keep]
        normed = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
        self.sq_err += float((x - xq).pow(2).sum())
        self.sq_err_norm += float((normed(x) - normed(xq)).pow(2).sum())
        self.kept += x.numel()

    def result(self) -> dict:
        return {"mse": self.sq_err / max(self.kept, 1), "mse_normalized": self.sq_err_norm / max(self.kept, 1),
                "outlier_tokens": self.outliers, "tokens": self.tokens}


def stream_divergence(h: SampleArray, hq: SampleArray, *, outlier_factor: float = 10.0, micro_batch: int = 16) -> dict:
    meter = DivergenceMeter(outlier_threshold(h, outlier_factor, micro_batch))
    for a, b in micro_batches(h.shape[0], micro_batch):
        meter.add(h.read(a, b), hq.read(a, b))
    return meter.result()


class PhaseTimes:
    """Wall time per phase of a layer's work (read, clean_forward, quant_forward, stats, target,
    solve, write), for the per-stage cost breakdown. On CUDA each phase ends with a synchronize so
    that asynchronous kernels are charged to the phase that launched them."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = torch.device(device).type == "cuda"

    @contextlib.contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - started

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}
