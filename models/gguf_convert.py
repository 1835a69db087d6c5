"""One-time conversion of a GGUF checkpoint into a per-layer safetensors directory.

GGUF stores (possibly block-quantized) tensors under llama.cpp names. We dequantize one tensor at a
time with the ``gguf`` package, map names and undo llama.cpp's q/k permutation with transformers' own
GGUF tables, and write one safetensors shard per decoder layer plus an index, ``config.json`` and
the tokenizer. The result is an ordinary Hugging Face checkpoint that ``Checkpoint`` streams from.
The directory is written under a temporary name and renamed when complete, so a crash mid-way
never leaves a half-converted model behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, CheckpointError

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def _read_gguf(gguf_path: Path):
    import gguf

    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as e:  # gguf raises ValueError/IndexError/OSError on truncated files
        raise CheckpointError(f"cannot read GGUF file {gguf_path}: {type(e).__name__}: {e} (truncated or not a GGUF file?)") from None


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Convert ``gguf_path`` into a safetensors checkpoint at ``out_dir`` (no-op if already there)."""
    from gguf import dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if (out_dir / INDEX_FILE).is_file():
        return out_dir
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file {str(gguf_path)!r} does not exist")
    reader = _read_gguf(gguf_path)
    folder, name = gguf_path.parent, gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise CheckpointError(f"cannot read the config/tokenizer of GGUF file {gguf_path}: {e}") from None

    # The name map needs a model skeleton; build it on the meta device (no memory).
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    arch = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    del skeleton

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Group tensors by decoder layer so each shard is written from one layer's tensors only.
    groups: dict[str, list] = {}
    for t in reader.tensors:
        m = _LAYER_RE.match(t.name)
        groups.setdefault(f"layer-{int(m.group(1)):05d}" if m else "base", []).append(t)
    weight_map: dict[str, str] = {}
    for group, tensors in groups.items():
        shard: dict[str, torch.Tensor] = {}
        for t in tensors:
            weights = dequantize(t.data, t.tensor_type)
            result = processor.process(weights=weights, name=t.name, tensor_key_mapping=name_map, parsed_parameters={"tensors": {}})
            if result.name not in name_map:
                continue
            hf_name = name_map[result.name]
            shard[hf_name] = torch.from_numpy(np.array(result.weights, copy=True)).to(dtype)
        file = f"{group}.safetensors"
        save_file(shard, tmp / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"source": name}, "weight_map": weight_map}, indent=1))
    config.dtype = dtype
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
