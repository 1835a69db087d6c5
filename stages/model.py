"""Stage: resolve the model and derive its identity from its content (weights and config)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.schema import ModelConfig
from loaq.models.checkpoint import Checkpoint
from loaq.models.sources import resolve_source
from loaq.store.keys import digest, file_digest, stage_key

MODEL_STAGE_VERSION = 1


@dataclass(frozen=True)
class ModelRef:
    path: str
    key: str
    num_layers: int
    family: str
    trust_remote_code: bool = False

    def open(self) -> Checkpoint:
        return Checkpoint(self.path, trust_remote_code=self.trust_remote_code)


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
    config = json.loads((checkpoint.path / "config.json").read_text())
    config.pop("transformers_version", None)
    config.pop("_name_or_path", None)
    key = stage_key("model", MODEL_STAGE_VERSION, weights=digests.files(checkpoint.shard_files()), config=config,
                    tokenizer=digests.files(tokenizer_files(checkpoint)))
    return ModelRef(str(checkpoint.path), key, checkpoint.num_layers, adapter.family, cfg.trust_remote_code)
