"""Logical dtypes of stored arrays and how each is represented in Zarr.

Zarr (and numpy) have no bfloat16 and no float8. Such tensors are stored *losslessly as their
raw bits*: bfloat16 as uint16, float8 variants as uint8, with the logical dtype written in the
array's attributes (``loaq_dtype``) and in the record manifest. Reading gives back a tensor of
the logical dtype, bit for bit. The alternative, widening bf16 to float32 on disk, would double
the size of the largest records (hidden states) for nothing; the price of raw bits is that a
non-loaq Zarr reader sees uint16 and must reinterpret them (the attribute says how).

Every other dtype numpy and torch share (bool, signed/unsigned ints, float16/32/64,
complex64/128) is stored natively.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: Logical dtype name -> the unsigned integer dtype whose bits store it.
RAW_BITS_STORAGE: dict[str, str] = {
    name: bits
    for name, bits in {
        "bfloat16": "uint16",
        "float8_e4m3fn": "uint8",
        "float8_e5m2": "uint8",
        "float8_e4m3fnuz": "uint8",
        "float8_e5m2fnuz": "uint8",
    }.items()
    if hasattr(torch, name)  # only the ones this torch build knows
}

#: Dtypes stored as themselves.
NATIVE_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)

# Signed twin of each raw-bits storage dtype: torch has views to int16/int8 on every version.
_SIGNED_VIEW = {"uint16": (torch.int16, np.int16), "uint8": (torch.int8, np.int8)}


def logical_dtype_name(dtype: Any) -> str:
    """Normalize a torch dtype, numpy dtype/type or name (``"bf16"`` too) to a logical name."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                "float": "float32", "double": "float64"}.get(dtype, dtype)
        name = name.removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError as e:
            raise TypeError(f"not a dtype: {dtype!r}") from e
    if name not in NATIVE_DTYPES and name not in RAW_BITS_STORAGE:
        raise TypeError(f"dtype {name!r} cannot be stored (supported: "
                        f"{', '.join(NATIVE_DTYPES + tuple(RAW_BITS_STORAGE))})")
    return name


def stored_numpy_dtype(logical: str) -> np.dtype:
    """The numpy dtype Zarr stores for logical dtype ``logical``."""
    return np.dtype(RAW_BITS_STORAGE.get(logical, logical))


def torch_dtype(logical: str) -> torch.dtype:
    return getattr(torch, logical)


def to_stored_array(data: Any) -> tuple[np.ndarray, str]:
    """``(array to hand to Zarr, logical dtype name)`` for a torch tensor or numpy array.

    Tensors are detached and moved to the CPU; the result shares memory with the input where
    it can (no copy for contiguous CPU data).
    """
    if isinstance(data, torch.Tensor):
        tensor = data.detach().cpu().contiguous()
        logical = logical_dtype_name(tensor.dtype)
        bits = RAW_BITS_STORAGE.get(logical)
        if bits is None:
            return tensor.numpy(), logical
        signed_torch, _ = _SIGNED_VIEW[bits]
        return tensor.view(signed_torch).numpy().view(np.dtype(bits)), logical
    if isinstance(data, np.ndarray) or np.isscalar(data):
        array = np.ascontiguousarray(data)
        return array, logical_dtype_name(array.dtype)
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(data).__name__}")


def from_stored_array(array: np.ndarray, logical: str) -> torch.Tensor:
    """The torch tensor of logical dtype ``logical`` whose stored form is ``array``."""
    array = np.asarray(array)
    if not (array.flags.c_contiguous and array.flags.writeable):
        array = np.array(array, order="C")  # torch.from_numpy needs writable, contiguous memory
    bits = RAW_BITS_STORAGE.get(logical)
    if bits is None:
        return torch.from_numpy(array)
    _, signed_numpy = _SIGNED_VIEW[bits]
    return torch.from_numpy(array.view(signed_numpy)).view(torch_dtype(logical))
