"""Writing a quantized model as a Hugging Face checkpoint, one shard at a time.

Two layouts of the same quantized weights:

* **fake-quant**: every quantized linear holds its dequantized weight ``scale * (code - zero)`` in
  the model's dtype; anything that loads a plain checkpoint loads it.
* **compressed-tensors** ``pack-quantized``: every quantized linear holds ``weight_packed`` (int32
  words of densely packed signed codes), ``weight_scale``, ``weight_zero_point`` (packed, asymmetric
  grids only) and ``weight_shape``, described by ``quantization_config`` in ``config.json``: the
  format transformers and vLLM load for weight-only integer quantization. Packing and the config
  come from the ``compressed-tensors`` library itself.

A checkpoint is written into ``<folder>.partial`` and renamed to ``<folder>`` when its last file is
in place, so a folder under its final name is always complete (``EXPORT_MARK`` inside names what it
holds). Nothing here reads the store; the export stage feeds one layer at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE

#: Written last into an export folder: what it holds (format, dtype, the quantized model's key).
EXPORT_MARK = "loaq-export.json"
#: Non-weight files copied from the source checkpoint: config, generation config, tokenizer.
METADATA_PATTERNS = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")
PACKED_FORMAT = "pack-quantized"
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_dtype(config_json: dict) -> str:
    """The dtype a checkpoint's ``config.json`` declares (``float32`` when it declares none)."""
    name = config_json.get("dtype") or config_json.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in ``dtype``, others (integer codes, shapes) unchanged; all contiguous."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


class CheckpointWriter:
    """Shards written one at a time; ``finish`` adds index, config, tokenizer and renames.

    Use as ``with CheckpointWriter(folder, n_shards) as w: w.shard(...); ...; w.finish(...)``.
    Leaving without ``finish`` (an exception) removes the partial folder.
    """

    def __init__(self, folder: str | os.PathLike, n_shards: int):
        self.folder = Path(folder)
        self.tmp = self.folder.with_name(self.folder.name + ".partial")
        self.n_shards, self.written = n_shards, 0
        self.weight_map: dict[str, str] = {}
        self.shard_bytes: list[int] = []
        self.finished = False

    def __enter__(self) -> "CheckpointWriter":
        shutil.rmtree(self.tmp, ignore_errors=True)  # left by a killed export of the same key
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.finished:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def shard(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the next shard (its tensors are not kept)."""
        if self.written == self.n_shards:
            raise ValueError(f"all {self.n_shards} shards are already written")
        self.written += 1
        file = shard_name(self.written, self.n_shards)
        save_file(tensors, self.tmp / file, metadata={"format": "pt"})
        os.chmod(self.tmp / file, 0o644)  # safetensors creates it private; a checkpoint is read by servers
        self.weight_map.update({name: file for name in tensors})
        self.shard_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))

    def finish(self, source: str | os.PathLike, config_json: dict, mark: dict, quantization_config=None) -> Path:
        """Index, ``config.json`` (``config_json`` plus, for a packed checkpoint, the library's
        ``quantization_config``), tokenizer and other metadata files of ``source``, the mark; rename."""
        if self.written != self.n_shards:
            raise ValueError(f"{self.written} of {self.n_shards} shards written")
        index = {"metadata": {"total_size": sum(self.shard_bytes)}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
        for path in sorted({p for pattern in METADATA_PATTERNS for p in Path(source).glob(pattern)}):
            if path.is_file() and path.name not in (INDEX_FILE, "config.json", EXPORT_MARK):
                shutil.copyfile(path, self.tmp / path.name)
        (self.tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
        if quantization_config is not None:
            write_quantization_config(self.tmp, quantization_config)
        (self.tmp / EXPORT_MARK).write_text(json.dumps(mark, indent=1))
        if self.folder.exists():  # an export whose store record was never written: replaced
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)
        self.finished = True
        return self.folder


def is_complete(folder: str | os.PathLike, key: str) -> bool:
    """Whether ``folder`` is a finished export of ``key``."""
    try:
        return json.loads((Path(folder) / EXPORT_MARK).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


# -- compressed-tensors pack-quantized ----------------------------------------------------------

class UnpackableScheme(ValueError):
    """A quantized weight that the packed format cannot represent."""


def packed_scheme(bits: int, group_size: int | None, symmetric: bool):
    """The compressed-tensors scheme of loaq's grid: integer weights, per channel or per group."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                               strategy="group" if group_size else "channel", group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=weights, format=PACKED_FORMAT)


def packed_quantization_config(bits: int, group_size: int | None, symmetric: bool):
    """``quantization_config``: every Linear of the decoder layers is quantized, the head is not."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(config_groups={"group_0": packed_scheme(bits, group_size, symmetric)},
                              ignore=["lm_head"], format=PACKED_FORMAT, quantization_status="compressed")


def write_quantization_config(folder: Path, quantization_config) -> None:
    """Add ``quantization_config`` to ``folder/config.json`` the way the library itself saves it."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=quantization_config).update_config(str(folder))


def pack_linear(q, symmetric: bool, scale_dtype: torch.dtype, scheme=None) -> dict[str, torch.Tensor]:
    """The packed tensors of one quantized linear (names relative to the module).

    ``q`` is laid out like ``loaq.quant.QuantizedWeight``: (out, in) uint8 ``codes``, (out, groups)
    ``scales`` and integer-valued ``zeros``, (in,) ``g_idx``, ``bits``, ``group_size``, and the
    dequantized ``weight``.

    loaq's codes are unsigned (``0..2^b-1`` with zero point ``z``); compressed-tensors stores signed
    codes ``c - 2^(b-1)`` with zero point ``z - 2^(b-1)`` (absent for a symmetric grid, where loaq's
    ``z`` is ``2^(b-1)``), which dequantize to the same ``scale * (c - z)``. The library packs from
    the dequantized weight; the codes it packs are checked against loaq's.
    """
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if q.codes is None:
        raise UnpackableScheme("16-bit weights are not quantized")
    n_out, n_in = q.codes.shape
    if q.group_size and n_in % q.group_size:
        raise UnpackableScheme(f"{n_in} input columns are not a multiple of group_size {q.group_size}")
    contiguous = torch.arange(n_in, dtype=torch.int32) // (q.group_size or n_in)
    if not torch.equal(q.g_idx.to(torch.int32), contiguous):
        raise UnpackableScheme("columns are not in contiguous groups (act_order with dynamic groups)")
    half = 1 << (q.bits - 1)
    state = {"weight": q.weight.float(), "weight_scale": q.scales.float()}
    if symmetric:
        if not torch.all(q.zeros == half):
            raise UnpackableScheme(f"a symmetric grid must have zero point {half}")
    elif not torch.equal(q.zeros, q.zeros.round()):
        raise UnpackableScheme("zero points are not integers (a NeUQI grid)")
    else:
        state["weight_zero_point"] = (q.zeros - half).to(torch.int8)
    packed = PackedQuantizationCompressor.compress(state, scheme or packed_scheme(q.bits, q.group_size, symmetric))
    signed = unpack_from_int32(packed["weight_packed"], q.bits, packed["weight_shape"])
    if not torch.equal(signed.to(torch.int16) + half, q.codes.to(torch.int16)):
        raise RuntimeError("compressed-tensors packed other codes than the stored ones")
    packed["weight_scale"] = packed["weight_scale"].to(scale_dtype)
    return {k: packed[k].contiguous() for k in PACKED_SUFFIXES if k in packed}


def packed_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(PACKED_SUFFIXES))


def packed_checkpoint_bytes(folder: str | Path) -> tuple[int, int]:
    """(bytes of the packed linears' tensors, fp16 bytes of those linears' weights), read from the
    files of an exported ``compressed_tensors`` checkpoint."""
    from safetensors import safe_open

    packed = fp16 = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith(PACKED_SUFFIXES):
                    t = f.get_tensor(name)
                    packed += t.numel() * t.element_size()
                if name.endswith("weight_shape"):
                    fp16 += 2 * int(torch.prod(f.get_tensor(name)))
    return packed, fp16
