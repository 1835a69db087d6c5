"""Stage: resolve the model and derive its identity from its content (weights and config).

A rotated model (``model.rotation``) is another model: its rotation enters the model key, so
calibration embeddings, the clean stream and every quantized chain are keyed apart from the
unrotated model's, and ``ModelRef.open`` hands every stage the rotated weights."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.load import ConfigError
from loaq.configs.schema import ModelConfig, RotationConfig
from loaq.engine.rotation import RotatedWeights
from loaq.models.checkpoint import Checkpoint
from loaq.models.sources import resolve_source
from loaq.quant.hadamard import HadamardSizeError
from loaq.store.keys import digest, file_digest

from .keys import model_key


@dataclass(frozen=True)
class ModelRef:
    path: str
    key: str
    num_layers: int
    family: str
    trust_remote_code: bool = False
    rotation: RotationConfig = RotationConfig()

    def open(self) -> Checkpoint | RotatedWeights:
        """The model every stage works on: the checkpoint, or the checkpoint rotated."""
        checkpoint = Checkpoint(self.path, trust_remote_code=self.trust_remote_code)
        return with_rotation(checkpoint, self.rotation)

    @property
    def rotated(self) -> bool:
        return self.rotation.kind != "none"


def with_rotation(checkpoint: Checkpoint, rotation: RotationConfig) -> Checkpoint | RotatedWeights:
    if rotation.kind == "none":
        return checkpoint
    try:
        return RotatedWeights(checkpoint, seed=rotation.seed)
    except HadamardSizeError as e:
        raise ConfigError(f"model.rotation.kind={rotation.kind} cannot rotate this model: {e}; "
                          f"set model.rotation.kind=none") from None


class DigestCache:
    """Content digests of files, remembered by (path, size, mtime) like git's index: a 140 GB
    checkpoint is hashed once, not at every run. The identity is still the content's sha256."""

    def __init__(self, cache_dir: str):
        self.path = Path(cache_dir) / "digests.json"
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if stamp not in self.entries:
            self.entries[stamp] = file_digest(path)
            self._save()
        return self.entries[stamp]

    def files(self, paths) -> str:
        return digest([{"name": p.name, "sha256": self.file(p)} for p in sorted(paths)])

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache that cannot be written only costs time


def tokenizer_files(checkpoint: Checkpoint) -> list[Path]:
    return [p for p in checkpoint.path.iterdir()
            if p.name.startswith(("tokenizer", "special_tokens")) or p.suffix == ".model"]


@task(name="model", cache_policy=NONE)
def prepare_model(cfg: ModelConfig, model_cache: str) -> ModelRef:
    digests = DigestCache(model_cache)
    path = resolve_source(cfg.source, model_cache, revision=cfg.revision, file_digest=lambda p: digests.file(Path(p)))
    checkpoint = Checkpoint(path, trust_remote_code=cfg.trust_remote_code)
    adapter = checkpoint.adapter  # fails early, one line, for an unsupported architecture
    with_rotation(checkpoint, cfg.rotation)  # and for a size the rotation cannot build
    config = json.loads((checkpoint.path / "config.json").read_text())
    config.pop("transformers_version", None)
    config.pop("_name_or_path", None)
    key = model_key(digests.files(checkpoint.shard_files()), config, digests.files(tokenizer_files(checkpoint)),
                    cfg.rotation)
    return ModelRef(str(checkpoint.path), key, checkpoint.num_layers, adapter.family, cfg.trust_remote_code,
                    cfg.rotation)
