"""What every stage shares: the store, the run id, the device settings, and the reuse rule.

``cached`` is the one place where a stage decides between reusing a complete record and computing
it: keys are derived from inputs only (``loaq.store.keys``), so a record that is complete under its
key is by construction the right result. Every decision is logged in the store's event log, which
is how ``loaq status`` and the tests know what a run actually executed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loaq.configs.schema import RuntimeConfig
from loaq.store import Store

from . import interrupt


FAILPOINT_ENV = "LOAQ_FAILPOINT"


def failpoint(point: str) -> None:
    """Crash-testing hook: if ``LOAQ_FAILPOINT`` names ``point``, the process SIGKILLs itself here,
    exactly like a machine that loses power (no cleanup, no exception handlers); ``point@term``
    sends SIGTERM instead, as a scheduler that preempts the job does."""
    for entry in os.environ.get(FAILPOINT_ENV, "").split(","):
        name, _, how = entry.partition("@")
        if name == point:
            os.kill(os.getpid(), signal.SIGTERM if how == "term" else signal.SIGKILL)


@dataclass(frozen=True)
class Runtime:
    device: str
    dtype: torch.dtype
    micro_batch: int
    threads: int

    @classmethod
    def resolve(cls, cfg: RuntimeConfig) -> "Runtime":
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.dtype == "auto":
            # Full precision on the CPU (exact, reproducible); bf16 forwards on a GPU, where the
            # statistics and solves still accumulate in float32/float64.
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
        else:
            dtype = getattr(torch, cfg.dtype)
        threads = cfg.threads or torch.get_num_threads()
        return cls(device, dtype, cfg.micro_batch, threads)

    def apply(self) -> None:
        torch.set_num_threads(self.threads)


@dataclass
class StageContext:
    store: Store
    run_id: str
    runtime: Runtime
    model_cache: str

    def reuse(self, stage: str, *keys: str) -> bool:
        """True (and logged) when every record ``keys`` is complete: the stage need not even start."""
        if all(self.store.is_complete(k) for k in keys):
            for k in keys:
                self.store.log_event(self.run_id, stage, k, "reused")
            return True
        return False

    def cached(self, stage: str, key: str, compute: Callable[[], None]) -> str:
        """Return ``key``, computing its record with ``compute`` unless it is already complete."""
        if self.store.is_complete(key):
            self.store.log_event(self.run_id, stage, key, "reused")
            return key
        started = time.perf_counter()
        interrupt.check()
        failpoint(f"{stage}:before")
        compute()
        self.store.log_event(self.run_id, stage, key, "computed", seconds=time.perf_counter() - started)
        return key
