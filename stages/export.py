"""Stage: export the quantized model as a Hugging Face checkpoint, cached by the model it exports.

The quantized model is identified by its last chain key (which determines every layer's weights
and, through the chain's root, the source model), so an export is keyed by that key, the format
and the dtype: exporting the same quantized model again computes nothing. The checkpoint is a
folder ``<root>/<format>-<key>`` outside the store's records (it must be a plain directory that
transformers and vLLM open); the store holds a small ``export`` record that names it, with its
sizes. The folder is written under a temporary name and renamed when complete, and the record is
written after the rename: a complete record whose folder is missing (deleted) is recomputed.

Export streams like evaluation does: the non-layer tensors (embeddings, final norm, head) from the
source checkpoint one tensor per shard, then one shard per decoder layer (the source layer's
tensors with its quantized linears replaced by the stored ones), so memory depends on one layer.

A rotated model (``model.rotation``) is exported rotated: its norms fused, its residual stream
rotated, its head untied. Its online Hadamard on down_proj's input is not something a plain
checkpoint can hold, so ``fake_quant`` folds it back into the dequantized down_proj (W H_d^T, exact
in floating point; that weight is then no longer on the quantization grid), and ``compressed_tensors``
refuses it: compressed-tensors describes online transforms, but transformers does not load them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.load import ConfigError
from loaq.configs.schema import QuantizeConfig
from loaq.models.export import (DTYPES, CheckpointWriter, UnpackableScheme, cast, checkpoint_dtype, is_complete,
                                pack_linear, packed_nbytes, packed_quantization_config, packed_scheme)

from .context import StageContext, failpoint
from .keys import export_key, weights_key
from .model import ModelRef
from .quantize import read_weights

FAKE_QUANT, PACKED, GGUF = "fake_quant", "compressed_tensors", "gguf"
FORMATS = (FAKE_QUANT, PACKED, GGUF)
#: The formats ``loaq export`` writes when neither the command nor the config names any.
DEFAULT_FORMATS = (FAKE_QUANT, PACKED)


def export_dtype(model: ModelRef, requested: str) -> str:
    """The dtype name an export is written in: ``requested``, or the source checkpoint's for ``auto``."""
    if requested != "auto":
        return requested
    return checkpoint_dtype(json.loads((Path(model.path) / "config.json").read_text()))


def export_path(root: str | Path, fmt: str, key: str) -> Path:
    return Path(root).expanduser().resolve() / f"{fmt}-{key}"


def is_exported(ctx: StageContext, key: str, path: Path) -> bool:
    return ctx.store.is_complete(key) and is_complete(path, key)


def check_exportable(fmt: str, cfg: QuantizeConfig, model_config=None, rotated: bool = False) -> None:
    """Fail early, in one line naming the field and the fix, for a scheme ``fmt`` cannot hold."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not known; choose from {', '.join(FORMATS)}")
    if cfg.act_bits is not None:
        # fake_quant would silently drop the activation quantizer (a W{b}A16 model), and loaq does not
        # write compressed-tensors' dynamic token-wise input_activations: no serving kernel runs integer
        # W4A4 (vLLM's compressed-tensors W4A4 is NVFP4), so nothing could check such a checkpoint.
        raise ConfigError(f"quantize.act_bits={cfg.act_bits} quantizes activations at run time, which no export format "
                          f"of loaq holds ({FAKE_QUANT} keeps weights only, {PACKED} integer activations are not "
                          f"written); evaluate it in loaq, or export a run with quantize.act_bits=null")
    if fmt == GGUF:
        return check_gguf(cfg, model_config, rotated)
    if fmt != PACKED:
        return
    if rotated:
        raise ConfigError(f"export.formats: {PACKED} cannot hold a rotated model's online Hadamard on down_proj's "
                          f"input (model.rotation.kind=hadamard); export it as {FAKE_QUANT}")
    if cfg.bits == 16:
        raise ConfigError("quantize.bits=16 leaves the weights unquantized, so there is nothing to pack in "
                          f"{PACKED}; export it as {FAKE_QUANT}, or choose quantize.bits between 2 and 8")
    if cfg.grid_init == "neuqi" and not cfg.symmetric:
        raise ConfigError(f"quantize.grid_init=neuqi fits real-valued zero points, which {PACKED} (integer zero "
                          f"points) cannot hold; export as {FAKE_QUANT}, or quantize with quantize.grid_init=minmax "
                          f"or quantize.symmetric=true")
    if cfg.act_order and cfg.group_size and not cfg.static_groups:
        raise ConfigError(f"quantize.act_order with quantize.static_groups=false gives every column its own "
                          f"group order (g_idx), which {PACKED} no longer expresses; set quantize.static_groups=true, "
                          f"or export as {FAKE_QUANT}")
    if cfg.group_size and model_config is not None:
        heads = int(model_config.num_attention_heads)
        head_dim = getattr(model_config, "head_dim", None) or int(model_config.hidden_size) // heads
        widths = {int(model_config.hidden_size), int(model_config.intermediate_size), heads * int(head_dim)}
        bad = sorted(w for w in widths if w % cfg.group_size)
        if bad:
            raise ConfigError(f"quantize.group_size={cfg.group_size} does not divide the linear input width(s) "
                              f"{', '.join(map(str, bad))}; {PACKED} needs whole groups: choose a divisor or "
                              f"export as {FAKE_QUANT}")


def check_gguf(cfg: QuantizeConfig, model_config=None, rotated: bool = False) -> None:
    """Fail early for a run GGUF cannot hold exactly: the grid must be one of llama.cpp's block types."""
    from loaq.models.gguf_export import BLOCK, MAPPABLE, UnmappableScheme, block_type, gguf_arch

    if rotated:
        raise ConfigError(f"export.formats: {GGUF} cannot hold a rotated model's online Hadamard on down_proj's input "
                          f"(model.rotation.kind=hadamard); export it as {FAKE_QUANT}")
    if cfg.bits == 16:
        raise ConfigError(f"quantize.bits=16 leaves the weights unquantized; {GGUF} maps only {MAPPABLE}")
    try:
        block_type(cfg.bits, cfg.symmetric, cfg.group_size)
        if model_config is not None:
            gguf_arch(model_config)
    except UnmappableScheme as e:
        raise ConfigError(f"export.formats: {GGUF}: {e}; export this run as {FAKE_QUANT}") from None
    if cfg.grid_init == "neuqi" and cfg.symmetric:
        pass  # a symmetric NeUQI grid keeps the fixed zero point of Q4_0 / Q8_0
    if cfg.act_order and cfg.group_size and not cfg.static_groups:
        raise ConfigError(f"quantize.act_order with quantize.static_groups=false gives every column its own group, "
                          f"which {GGUF} blocks cannot hold; set quantize.static_groups=true, or export as {FAKE_QUANT}")
    if model_config is not None:
        heads = int(model_config.num_attention_heads)
        head_dim = getattr(model_config, "head_dim", None) or int(model_config.hidden_size) // heads
        widths = {int(model_config.hidden_size), int(model_config.intermediate_size), heads * int(head_dim)}
        step = cfg.group_size or BLOCK
        bad = sorted(w for w in widths if w % step or w % BLOCK)
        if bad:
            raise ConfigError(f"quantize.group_size={cfg.group_size}: the linear input width(s) {', '.join(map(str, bad))} "
                              f"are not whole {GGUF} blocks of {BLOCK} in whole groups; export as {FAKE_QUANT}")


def _layer_pattern(layer_prefix: str) -> re.Pattern:
    head, tail = layer_prefix.split("{index}")
    return re.compile(re.escape(head) + r"\d+" + re.escape(tail))


@task(name="export", cache_policy=NONE)
def export_stage(ctx: StageContext, model: ModelRef, chain: list[str], fmt: str, dtype: str, root: str,
                 source_gguf: str | None = None) -> str:
    """Write the ``fmt`` checkpoint of the quantized model ``chain`` under ``root``; returns its key.

    ``source_gguf``: the GGUF file the model came from, whose tokenizer fields a GGUF export copies."""
    key = export_key(chain[-1], fmt, dtype)
    path = export_path(root, fmt, key)
    if is_exported(ctx, key, path):
        ctx.store.log_event(ctx.run_id, "export", key, "reused")
        return key
    started = time.perf_counter()
    failpoint("export:before")
    torch_dtype = DTYPES[dtype]
    checkpoint = model.open()
    if fmt == GGUF:
        return _export_gguf(ctx, model, chain, dtype, key, path, checkpoint, source_gguf, started)
    adapter = checkpoint.adapter
    layer_names = _layer_pattern(adapter.layer_prefix)
    others = [n for n in checkpoint.tensor_names() if not layer_names.match(n)]
    records = [ctx.store.open(weights_key(k)) for k in chain]
    bits, group_size, symmetric = (records[0].attrs[a] for a in ("bits", "group_size", "symmetric"))
    if any((r.attrs["bits"], r.attrs["group_size"], r.attrs["symmetric"]) != (bits, group_size, symmetric)
           for r in records):
        raise ConfigError("the layers of this quantized model use different grids; it cannot be exported as one scheme")
    scheme = packed_scheme(bits, group_size, symmetric) if fmt == PACKED else None
    sizes = {"linear_bytes": 0, "linear_fp16_bytes": 0}

    with CheckpointWriter(path, len(others) + len(chain)) as writer:
        for name in others:  # one tensor per shard: a 128k-vocabulary embedding alone is gigabytes
            writer.shard(cast({name: checkpoint.tensor(name)}, torch_dtype))
        for index, record in enumerate(records):
            prefix = adapter.layer_prefix.format(index=index)
            state = checkpoint.layer_state(index)
            linears = record.attrs["linears"]
            online = checkpoint.input_transforms(index)
            if fmt == PACKED and online:
                raise ConfigError(f"layer {index}: {sorted(online)} transform their inputs online, which {PACKED} "
                                  f"cannot hold; export as {FAKE_QUANT}")
            if fmt == PACKED and set(linears) != set(adapter.linear_names()):
                raise ConfigError(f"layer {index} quantized {sorted(linears)}, not every linear; "
                                  f"{PACKED} describes all decoder linears with one scheme")
            for name, q in read_weights(record, linears).items():
                out_features, in_features = q.weight.shape
                sizes["linear_fp16_bytes"] += 2 * out_features * in_features
                del state[f"{name}.weight"]
                if fmt == PACKED:
                    try:
                        packed = pack_linear(q, symmetric, torch_dtype, scheme)
                    except UnpackableScheme as e:
                        raise ConfigError(f"layer {index} {name}: {e}; {PACKED} cannot hold it, "
                                          f"export as {FAKE_QUANT}") from None
                    state.update({f"{name}.{k}": v for k, v in packed.items()})
                    sizes["linear_bytes"] += packed_nbytes(packed)
                else:
                    state[f"{name}.weight"] = q.weight
                    sizes["linear_bytes"] += out_features * in_features * torch_dtype.itemsize
            for name in online:  # fake_quant: a plain linear reading the untransformed input
                state[f"{name}.weight"] = checkpoint.fold_input_transforms(index, name, state[f"{name}.weight"])
            writer.shard(cast({prefix + k: v for k, v in state.items()}, torch_dtype))
            failpoint(f"export:{index}:after")
        config_json = json.loads((checkpoint.path / "config.json").read_text())
        config_json.pop("_name_or_path", None)
        config_json["dtype"] = dtype
        config_json["tie_word_embeddings"] = bool(getattr(checkpoint.config, "tie_word_embeddings", False))
        if "torch_dtype" in config_json:
            config_json["torch_dtype"] = dtype
        attrs = {"format": fmt, "dtype": dtype, "quantized": chain[-1], "model": model.key, "layers": len(chain),
                 "rotation": model.rotation.model_dump(),
                 "bits": bits, "group_size": group_size, "symmetric": symmetric, **sizes,
                 "linear_ratio_fp16": sizes["linear_bytes"] / max(sizes["linear_fp16_bytes"], 1),
                 "total_bytes": sum(writer.shard_bytes), "shards": writer.n_shards}
        writer.finish(checkpoint.path, config_json, {"key": key, **attrs},
                      packed_quantization_config(bits, group_size, symmetric) if fmt == PACKED else None)

    with ctx.store.writer(key, kind="export", attrs={**attrs, "path": str(path)}, overwrite=True) as w:
        w.put("shard_bytes", torch.tensor(writer.shard_bytes, dtype=torch.int64))
    ctx.store.log_event(ctx.run_id, "export", key, "computed", seconds=time.perf_counter() - started,
                        nbytes=attrs["total_bytes"])
    return key


def _export_gguf(ctx: StageContext, model: ModelRef, chain: list[str], dtype: str, key: str, path: Path, checkpoint,
                 source_gguf: str | None, started: float) -> str:
    from .export_gguf import write_gguf

    records = [ctx.store.open(weights_key(k)) for k in chain]
    grids = {(r.attrs["bits"], r.attrs["group_size"], r.attrs["symmetric"]) for r in records}
    if len(grids) != 1:
        raise ConfigError("the layers of this quantized model use different grids; it cannot be exported as one scheme")
    bits, group_size, symmetric = grids.pop()
    attrs = {"format": GGUF, "dtype": dtype, "quantized": chain[-1], "model": model.key, "layers": len(chain),
             "rotation": model.rotation.model_dump(), "bits": bits, "group_size": group_size, "symmetric": symmetric}
    sizes = write_gguf(checkpoint, records, path, DTYPES[dtype], key, attrs, read_weights, source_gguf)
    attrs.update(sizes, linear_ratio_fp16=sizes["linear_bytes"] / max(sizes["linear_fp16_bytes"], 1), shards=1)
    with ctx.store.writer(key, kind="export", attrs={**attrs, "path": str(path)}, overwrite=True) as w:
        w.put("shard_bytes", torch.tensor([sizes["total_bytes"]], dtype=torch.int64))
    ctx.store.log_event(ctx.run_id, "export", key, "computed", seconds=time.perf_counter() - started,
                        nbytes=attrs["total_bytes"])
    return key
