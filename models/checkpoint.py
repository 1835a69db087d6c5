"""Layer-by-layer access to a checkpoint, so memory depends on one layer, never on depth.

A checkpoint is a directory in Hugging Face layout: ``config.json``, tokenizer files and
safetensors weights (one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``).
Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped), so asking for
layer 57 of 80 touches only layer 57's bytes. Weights are only ever read with safetensors.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from .adapters import Adapter, adapter_for

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given (missing, truncated, inconsistent)."""


class Checkpoint:
    def __init__(self, path: str | os.PathLike, *, trust_remote_code: bool = False):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"model path {str(self.path)!r} has no config.json (expected a Hugging Face model directory)")
        self.trust_remote_code = trust_remote_code
        self.weight_map = self._read_weight_map()

    # -- metadata ---------------------------------------------------------------------------
    @cached_property
    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)

    @cached_property
    def adapter(self) -> Adapter:
        return adapter_for(self.config)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)

    def shard_files(self) -> list[Path]:
        return sorted({self.path / f for f in self.weight_map.values()})

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"model path {str(self.path)!r} has no {SINGLE_FILE} or {INDEX_FILE}")
        try:
            with safe_open(single, framework="pt") as f:
                return {k: SINGLE_FILE for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {single}: {e} (truncated or not a safetensors file?)") from None

    # -- tensors ------------------------------------------------------------------------------
    # Files are opened per request and closed again: a handle kept open would keep every page it
    # ever touched mapped, and the process's resident memory would grow with depth.
    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name!r} not found in {self.path}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(self.path / file, framework="pt") as f:
                    for name in file_names:
                        out[name] = f.get_tensor(name).clone()
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"cannot read {self.path / file}: {e} (truncated or not a safetensors file?)") from None
        return out

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def tensor(self, name: str) -> torch.Tensor:
        return self._read([name])[name]

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        """State dict of decoder layer ``index`` with names relative to the layer."""
        prefix = self.adapter.layer_prefix.format(index=index)
        names = [n for n in self.weight_map if n.startswith(prefix)]
        if not names:
            raise CheckpointError(f"no tensors for decoder layer {index} (prefix {prefix!r}) in {self.path}")
        return {n[len(prefix):]: t for n, t in self._read(names).items()}

    def embed_weight(self) -> torch.Tensor:
        return self.tensor(self.adapter.embed)

    def final_norm_weight(self) -> torch.Tensor:
        return self.tensor(self.adapter.final_norm)

    def lm_head_weight(self) -> torch.Tensor:
        """The output projection; tied checkpoints store only the embedding."""
        if self.has(self.adapter.lm_head):
            return self.tensor(self.adapter.lm_head)
        return self.embed_weight()

    def input_transforms(self, index: int) -> dict:
        """A checkpoint's linears read their inputs as they are (no online transforms)."""
        return {}

    def fold_input_transforms(self, index: int, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as a linear reading its untransformed input: here, with no transforms, itself."""
        return weight
