"""The engine's ``SampleArray`` over store records: hidden states stream through Zarr by micro-batch."""

from __future__ import annotations

import torch

from loaq.store import Record
from loaq.store.writer import RecordWriter

from . import interrupt
from .context import failpoint


class RecordArray:
    """Read-only view of array ``name`` of a complete record."""

    def __init__(self, record: Record, name: str):
        self.record, self.name = record, name
        self.shape = tuple(record.shape(name))

    def read(self, start: int, stop: int) -> torch.Tensor:
        interrupt.check()
        return self.record.read(self.name, start, stop)

    def write(self, start: int, values: torch.Tensor) -> None:
        raise TypeError(f"record {self.record.key} is complete and read-only")


class WriterArray:
    """Write-only array ``name`` of a record being written (created with the given shape/dtype)."""

    def __init__(self, writer: RecordWriter, name: str, shape: tuple[int, ...], dtype: torch.dtype, chunk: int,
                 point: str | None = None):
        writer.create(name, shape, dtype, chunk_tokens=chunk)
        self.writer, self.name, self.shape, self.dtype = writer, name, tuple(shape), dtype
        self.point = point  # failpoint name fired after the first slice is written (crash tests)

    def read(self, start: int, stop: int) -> torch.Tensor:
        raise TypeError("array is being written")

    def write(self, start: int, values: torch.Tensor) -> None:
        interrupt.check()
        self.writer.write(self.name, start, values.detach().to(device="cpu", dtype=self.dtype).contiguous())
        if self.point is not None:
            failpoint(self.point)
            self.point = None
