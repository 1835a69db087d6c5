"""Hidden states of a stream, addressed by sample along axis 0.

The engine reads and writes hidden states in micro-batches of samples so that device memory
depends on the micro-batch, not on the calibration set. ``SampleArray`` is the one interface the
engine needs; ``MemoryArray`` keeps states in host memory, and the store provides a Zarr-backed
implementation with the same two methods.
"""

from __future__ import annotations

from typing import Protocol

import torch


class SampleArray(Protocol):
    shape: tuple[int, ...]  # (samples, seqlen, width)

    def read(self, start: int, stop: int) -> torch.Tensor: ...

    def write(self, start: int, values: torch.Tensor) -> None: ...


class MemoryArray:
    """A host-memory ``SampleArray`` (allocated lazily to the shape/dtype of the first write)."""

    def __init__(self, tensor: torch.Tensor | None = None, *, shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype | None = None):
        if tensor is None and shape is not None:
            tensor = torch.empty(shape, dtype=dtype or torch.float32)
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]

    def write(self, start: int, values: torch.Tensor) -> None:
        self.tensor[start:start + values.shape[0]] = values.to(device=self.tensor.device, dtype=self.tensor.dtype)


class Rows:
    """Samples [start, stop) of another ``SampleArray``, addressed from 0 (no copy)."""

    def __init__(self, array: SampleArray, start: int, stop: int):
        self.array, self.start = array, start
        self.shape = (stop - start, *array.shape[1:])

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.array.read(self.start + start, self.start + stop)

    def write(self, start: int, values: torch.Tensor) -> None:
        self.array.write(self.start + start, values)


def micro_batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)
