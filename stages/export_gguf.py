"""The GGUF body of the export stage: the quantized model as one llama.cpp file, streamed by layer.

The folder ``<root>/gguf-<key>`` holds ``model.gguf`` and the export mark; like the checkpoint
formats it is written under ``.partial`` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from loaq.configs.load import ConfigError
from loaq.models.export import EXPORT_MARK
from loaq.models.gguf_export import (GGUFFile, UnmappableScheme, block_type, float_array, gguf_arch,
                                     gguf_tokenizer_fields, hf_tokenizer_fields, hparams, name_map, pack_blocks,
                                     permute_rows)

GGUF_FILE = "model.gguf"


def _contiguous(q) -> bool:
    n_in = q.codes.shape[1]
    return torch.equal(q.g_idx.to(torch.int64), torch.arange(n_in) // (q.group_size or n_in))


def _shapes(checkpoint, names) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(checkpoint.weight_map[name], []).append(name)
    for file, file_names in by_file.items():
        with safe_open(checkpoint.path / file, framework="pt") as f:
            for name in file_names:
                out[name] = tuple(f.get_slice(name).get_shape())
    return out


def write_gguf(checkpoint, records, path: Path, torch_dtype: torch.dtype, key: str, mark: dict,
               read_weights, source_gguf: str | None) -> dict:
    """Write ``path/model.gguf`` from the source ``checkpoint`` and the quantized layer ``records``;
    returns the sizes (bytes of the quantized linears, their fp16 bytes, the file)."""
    config, adapter = checkpoint.config, checkpoint.adapter
    try:
        arch = gguf_arch(config)
        bits, group_size, symmetric = (records[0].attrs[a] for a in ("bits", "group_size", "symmetric"))
        t = block_type(bits, symmetric, group_size)
    except UnmappableScheme as e:
        raise ConfigError(f"export.formats: gguf cannot hold this model: {e}") from None
    names = name_map(arch, len(records))

    def gguf_name(hf: str) -> str:
        mapped = names(hf)
        if mapped is None:
            raise ConfigError(f"export.formats: gguf has no name for tensor {hf}")
        return mapped

    tie = bool(getattr(config, "tie_word_embeddings", False)) or not checkpoint.has(adapter.lm_head)
    base = [adapter.embed, adapter.final_norm] + ([] if tie else [adapter.lm_head])  # llama.cpp's order
    layer_names = [[n for n in checkpoint.tensor_names() if n.startswith(adapter.layer_prefix.format(index=i))]
                   for i in range(len(records))]
    shapes = _shapes(checkpoint, base + [n for names_i in layer_names for n in names_i])
    heads, kv_heads = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None)
                                                             or config.num_attention_heads)
    permute = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads} if arch == "llama" else {}
    float_dtype = torch_dtype

    def is_norm(name: str) -> bool:
        return name.endswith("norm.weight") or "layernorm" in name or name.endswith(".bias")

    folder_tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(folder_tmp, ignore_errors=True)
    folder_tmp.mkdir(parents=True)
    out = GGUFFile(folder_tmp / GGUF_FILE, arch)
    try:
        out.kv("general.name", str(mark.get("name", "loaq")), "STRING")
        out.kv("general.file_type", t.file_type, "UINT32")
        out.kv("general.quantization_version", 2, "UINT32")
        for k, (v, vt) in hparams(config, arch).items():
            out.kv(k, v, vt)
        try:
            fields = gguf_tokenizer_fields(Path(source_gguf)) if source_gguf else hf_tokenizer_fields(checkpoint.path)
        except UnmappableScheme as e:
            raise ConfigError(f"export.formats: gguf cannot hold this model's tokenizer: {e}") from None
        for k, v, vt, sub in fields:
            out.kv(k, v, vt, sub)
        quantized = set()
        for i, record in enumerate(records):
            linears = record.attrs["linears"]
            if set(linears) != set(adapter.linear_names()):
                raise ConfigError(f"layer {i} quantized {sorted(linears)}, not every linear; gguf writes one block "
                                  f"type for all decoder linears")
            quantized |= {adapter.layer_prefix.format(index=i) + f"{n}.weight" for n in linears}
        for name in base:
            out.add(gguf_name(name), shapes[name], dtype=torch.float32 if is_norm(name) else float_dtype)
        for names_i in layer_names:
            for name in names_i:
                if name in quantized:
                    out.add(gguf_name(name), shapes[name], t.qtype, t.block_bytes)
                else:
                    out.add(gguf_name(name), shapes[name], dtype=torch.float32 if is_norm(name) else float_dtype)
        out.open()
        for name in base:
            tensor = checkpoint.tensor(name)
            out.write(gguf_name(name), float_array(tensor, torch.float32 if is_norm(name) else float_dtype))
        sizes = {"linear_bytes": 0, "linear_fp16_bytes": 0}
        for i, record in enumerate(records):
            prefix = adapter.layer_prefix.format(index=i)
            state = checkpoint.layer_state(i)
            weights = read_weights(record, record.attrs["linears"])
            for name in layer_names[i]:
                local = name[len(prefix):]
                linear = local.removesuffix(".weight")
                if name in quantized:
                    q = weights[linear]
                    if not _contiguous(q):
                        raise ConfigError(f"layer {i} {linear}: columns are not in contiguous groups (act_order with "
                                          f"dynamic groups); gguf blocks need them: set quantize.static_groups=true")
                    codes, scales, zeros = q.codes, q.scales, q.zeros
                    if linear in permute:
                        codes, scales, zeros = (permute_rows(x, permute[linear]) for x in (codes, scales, zeros))
                    try:
                        data = pack_blocks(codes, scales, zeros, q.group_size, t)
                    except UnmappableScheme as e:
                        raise ConfigError(f"export.formats: gguf: layer {i} {linear}: {e}") from None
                    sizes["linear_bytes"] += data.nbytes
                    sizes["linear_fp16_bytes"] += 2 * codes.numel()
                else:
                    tensor = state[local]
                    if linear in permute:  # a bias of a permuted projection (none in llama) would follow its rows
                        tensor = permute_rows(tensor, permute[linear])
                    data = float_array(tensor, torch.float32 if is_norm(name) else float_dtype)
                out.write(gguf_name(name), data)
        out.finish()
    except BaseException:
        out.abort()
        shutil.rmtree(folder_tmp, ignore_errors=True)
        raise
    sizes["total_bytes"] = (folder_tmp / GGUF_FILE).stat().st_size
    sizes["block_type"] = t.name
    os.chmod(folder_tmp / GGUF_FILE, 0o644)
    (folder_tmp / EXPORT_MARK).write_text(json.dumps({"key": key, **mark, **sizes}, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(folder_tmp, path)
    return sizes
