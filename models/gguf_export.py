"""Writing a quantized model as a GGUF file that llama.cpp (and Ollama) load, one layer at a time.

A loaq grid maps onto a llama.cpp block type exactly when its blocks of 32 input columns share one
scale (and, for Q4_1, one zero point), i.e. groups of a multiple of 32 or per channel:

    W4 asymmetric  ->  Q4_1   x = d*q + m,     q in 0..15,     d = scale,  m = -scale*zero
    W4 symmetric   ->  Q4_0   x = d*(q - 8),   q in 0..15,     d = scale   (loaq's zero is 8)
    W8 symmetric   ->  Q8_0   x = d*q,         q in -128..127, d = scale   (loaq's zero is 128)

The codes are kept; ``d`` and ``m`` are stored in fp16 by the format, which is the only change to
the weights. Other widths have no exact block type (the k-quants hold 6-bit sub-block scales
relative to a super-block scale, which a free fp scale per group does not round to).

Names, metadata and the q/k row order are llama.cpp's (its ``convert_hf_to_gguf`` conventions,
through the ``gguf`` package's tensor map); the tokenizer is copied from a GGUF source, or written
from ``tokenizer.json`` for BPE tokenizers. Norms are F32, as llama.cpp keeps them; embeddings and
head in the export dtype. The file is written under ``<name>.partial`` and renamed when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK = 32


class UnmappableScheme(ValueError):
    """A quantized weight, model or tokenizer that GGUF cannot hold as it is."""


@dataclass(frozen=True)
class BlockType:
    name: str  # Q4_1, Q4_0, Q8_0
    bits: int
    symmetric: bool
    file_type: int  # general.file_type (llama.cpp's LlamaFileType)

    @property
    def qtype(self):
        import gguf

        return gguf.GGMLQuantizationType[self.name]

    @property
    def block_bytes(self) -> int:
        import gguf

        return gguf.GGML_QUANT_SIZES[self.qtype][1]


BLOCK_TYPES = (BlockType("Q4_1", 4, False, 3), BlockType("Q4_0", 4, True, 2), BlockType("Q8_0", 8, True, 7))
MAPPABLE = "W4 asymmetric -> Q4_1, W4 symmetric -> Q4_0, W8 symmetric -> Q8_0, in groups of a multiple of 32 or per channel"


def block_type(bits: int, symmetric: bool, group_size: int | None) -> BlockType:
    """The llama.cpp block type of a grid, or ``UnmappableScheme`` naming the ones that map."""
    for t in BLOCK_TYPES:
        if (t.bits, t.symmetric) == (bits, symmetric):
            if group_size is not None and group_size % BLOCK:
                raise UnmappableScheme(f"group_size {group_size} is not a multiple of {BLOCK}; GGUF maps only {MAPPABLE}")
            return t
    raise UnmappableScheme(f"W{bits} {'symmetric' if symmetric else 'asymmetric'} has no exact llama.cpp block type; "
                           f"GGUF maps only {MAPPABLE}")


def _nibbles(q: np.ndarray) -> np.ndarray:
    # ggml's 4-bit order: byte j holds element j (low nibble) and element j + 16 (high nibble).
    return q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << np.uint8(4))


def pack_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None,
                t: BlockType) -> np.ndarray:
    """(out, in/32 * block_bytes) uint8 rows of ``t`` blocks holding loaq's ``codes`` exactly.

    ``scales``/``zeros`` are (out, groups) with contiguous groups of ``group_size`` columns (or one
    per row); each 32-column block takes its group's scale (and zero point).
    """
    n_out, n_in = codes.shape
    if n_in % BLOCK:
        raise UnmappableScheme(f"{n_in} input columns are not a multiple of the {BLOCK}-column block")
    per_group = (group_size or n_in) // BLOCK
    s = scales.double().repeat_interleave(per_group, dim=1)  # (out, blocks)
    z = zeros.double().repeat_interleave(per_group, dim=1)
    c = codes.numpy().astype(np.uint8).reshape(n_out, n_in // BLOCK, BLOCK)
    d = s.numpy().astype(np.float16)[..., None].view(np.uint8)
    if t.name == "Q4_1":
        m = (-s * z).numpy().astype(np.float16)[..., None].view(np.uint8)
        blocks = np.concatenate([d, m, _nibbles(c)], axis=-1)
    else:
        half = 1 << (t.bits - 1)
        if not torch.all(zeros == half):
            raise UnmappableScheme(f"a symmetric {t.name} grid needs zero point {half}")
        blocks = np.concatenate([d, _nibbles(c) if t.bits == 4 else (c.astype(np.int16) - half).astype(np.int8).view(np.uint8)],
                                axis=-1)
    return np.ascontiguousarray(blocks.reshape(n_out, -1))


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for the llama architecture (``convert_hf_to_gguf``'s ``permute``):
    within each head, the two rotary halves interleaved. Rows only, so codes and scales permute alike."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- metadata --------------------------------------------------------------------------------------

ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def gguf_arch(config) -> str:
    arch = ARCHES.get(config.model_type)
    if arch is None:
        raise UnmappableScheme(f"model type {config.model_type!r} has no GGUF writer here (have: {', '.join(ARCHES)})")
    rope = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind != "default":
        raise UnmappableScheme(f"rope scaling {kind!r} is not written to GGUF here")
    return arch


def name_map(arch: str, n_layers: int):
    """HF tensor name -> llama.cpp tensor name (the ``gguf`` package's table), None where it has none."""
    from gguf.constants import MODEL_ARCH_NAMES
    from gguf.tensor_mapping import get_tensor_name_map

    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, n_layers)
    return lambda hf: names.get_name(hf, try_suffixes=(".weight", ".bias"))


def hparams(config, arch: str) -> dict:
    """``{arch}.*`` keys (key -> (value, gguf value type name)) as llama.cpp reads them."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope_theta = getattr(config, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    out = {
        "context_length": (int(config.max_position_embeddings), "UINT32"),
        "embedding_length": (int(config.hidden_size), "UINT32"),
        "block_count": (int(config.num_hidden_layers), "UINT32"),
        "feed_forward_length": (int(config.intermediate_size), "UINT32"),
        "attention.head_count": (heads, "UINT32"),
        "attention.head_count_kv": (int(getattr(config, "num_key_value_heads", None) or heads), "UINT32"),
        "rope.freq_base": (float(rope_theta), "FLOAT32"),
        "attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), "FLOAT32"),
        "vocab_size": (int(config.vocab_size), "UINT32"),
        "rope.dimension_count": (head_dim, "UINT32"),
    }
    if head_dim * heads != int(config.hidden_size):
        out["attention.key_length"] = (head_dim, "UINT32")
        out["attention.value_length"] = (head_dim, "UINT32")
    return {f"{arch}.{k}": v for k, v in out.items()}


def gguf_tokenizer_fields(gguf_path: Path) -> list[tuple[str, object, object]]:
    """The ``tokenizer.*`` fields of a GGUF file, as (key, value, GGUFValueType) to write verbatim."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    out = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            out.append((key, field.contents(), vtype, sub))
    return out


def hf_tokenizer_fields(folder: Path) -> list[tuple[str, object, object, object]]:
    """``tokenizer.*`` fields for a BPE ``tokenizer.json`` (llama.cpp's ``gpt2`` vocabulary type)."""
    import gguf

    V = gguf.GGUFValueType
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise UnmappableScheme(f"{folder} has no tokenizer.json to write into GGUF")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnmappableScheme(f"tokenizer type {model.get('type')!r} is not written to GGUF here (byte-level BPE is)")
    vocab = dict(model["vocab"])
    types = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, i in vocab.items():
        tokens[i] = token
    token_types = [int(types.get(i, gguf.TokenType.NORMAL if tokens[i] != f"[PAD{i}]" else gguf.TokenType.UNUSED))
                   for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", "default", V.STRING, None),
           ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
           ("tokenizer.ggml.token_type", token_types, V.ARRAY, V.INT32),
           ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING)]
    config = {}
    if (Path(folder) / "tokenizer_config.json").is_file():
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    for role in ("bos", "eos", "unk", "pad"):
        token = config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            key = "unknown" if role == "unk" else ("padding" if role == "pad" else role)
            out.append((f"tokenizer.ggml.{key}_token_id", vocab[token], V.UINT32, None))
    template = config.get("chat_template")
    if template is None and (Path(folder) / "chat_template.jinja").is_file():
        template = (Path(folder) / "chat_template.jinja").read_text()
    if isinstance(template, str):
        out.append(("tokenizer.chat_template", template, V.STRING, None))
    return out


# -- the file --------------------------------------------------------------------------------------

class GGUFFile:
    """A GGUF file written in two passes: every tensor's info first (``add``), then the data in the
    same order (``write``), so only one layer's tensors are ever in memory."""

    def __init__(self, path: str | os.PathLike, arch: str):
        import gguf

        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.writer = gguf.GGUFWriter(self.tmp, arch)
        self.order: list[str] = []
        self.nbytes = 0

    def kv(self, key: str, value, vtype, sub=None) -> None:
        import gguf

        if isinstance(vtype, str):
            vtype = gguf.GGUFValueType[vtype]
        self.writer.add_key_value(key, value, vtype, sub_type=sub)

    def add(self, name: str, shape: tuple[int, ...], qtype=None, block_bytes: int = 0,
            dtype: torch.dtype = torch.float32) -> None:
        """Announce a tensor: a float tensor of ``shape`` in ``dtype``, or quantized rows of ``qtype``."""
        import gguf

        if qtype is not None:
            rows, cols = shape
            byte_shape = (rows, cols // BLOCK * block_bytes)
            nbytes = rows * byte_shape[1]
            self.writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        else:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            raw = gguf.GGMLQuantizationType.BF16 if dtype == torch.bfloat16 else None
            self.writer.add_tensor_info(name, shape, float_array(torch.zeros(1), dtype).dtype, nbytes, raw_dtype=raw)
        self.order.append(name)
        self.nbytes += nbytes

    def open(self) -> None:
        self.tmp.unlink(missing_ok=True)
        self.writer.write_header_to_file(self.tmp)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()
        self.written = 0

    def write(self, name: str, data: np.ndarray) -> None:
        if self.order[self.written] != name:
            raise RuntimeError(f"GGUF tensor {name} written out of order (expected {self.order[self.written]})")
        self.writer.write_tensor_data(np.ascontiguousarray(data))
        self.written += 1

    def finish(self) -> Path:
        if self.written != len(self.order):
            raise RuntimeError(f"{self.written} of {len(self.order)} GGUF tensors written")
        self.writer.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def float_array(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A float tensor as the numpy array GGUF stores for ``dtype`` (F32, F16; BF16 as its raw 16 bits)."""
    if dtype == torch.bfloat16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(dtype).numpy()
