"""Dense bit packing of integer codes: ``bits`` bits per code, no padding between codes.

Codes of a 2-4 bit grid held as uint8 take 2-4x their information; packed, a layer's codes take
``ceil(n * bits / 8)`` bytes. Little-endian bit order inside each byte, codes in row-major order.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Codes packed per step: bounds the temporary bit-plane array (8 bytes per code) to 32 MiB.
_STEP = 1 << 22


def packed_nbytes(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(any shape) uint8 codes < 2**bits -> 1-D uint8 tensor of ``packed_nbytes(codes.numel(), bits)``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1-8, not {bits}")
    flat = codes.reshape(-1).to(torch.uint8).cpu().numpy()
    out = np.empty(packed_nbytes(flat.size, bits), dtype=np.uint8)
    # Each step holds a multiple of 8 codes, so it fills whole bytes and steps never share one.
    for start in range(0, flat.size, _STEP):
        part = flat[start:start + _STEP]
        planes = np.unpackbits(part[:, None], axis=1, bitorder="little")[:, :bits]
        packed = np.packbits(planes.reshape(-1), bitorder="little")
        first = start * bits // 8
        out[first:first + packed.size] = packed
    return torch.from_numpy(out)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of ``shape``."""
    n = math.prod(shape)
    data = packed.reshape(-1).cpu().numpy()
    if data.size != packed_nbytes(n, bits):
        raise ValueError(f"{data.size} packed bytes do not hold {n} codes of {bits} bits")
    out = np.empty(n, dtype=np.uint8)
    for start in range(0, n, _STEP):
        count = min(_STEP, n - start)
        first = start * bits // 8
        planes = np.unpackbits(data[first:first + packed_nbytes(count, bits)], count=count * bits,
                               bitorder="little").reshape(count, bits)
        out[start:start + count] = np.packbits(planes, axis=1, bitorder="little")[:, 0]
    return torch.from_numpy(out).reshape(shape)
