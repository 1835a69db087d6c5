"""Stage: resolve the model and derive its identity from its content (weights and config)."""

from __future__ import annotations

import json
from dataclasses import dataclass

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


def tokenizer_digest(checkpoint: Checkpoint) -> str:
    files = sorted(p for p in checkpoint.path.iterdir() if p.name.startswith(("tokenizer", "special_tokens")) or p.suffix == ".model")
    return digest([file_digest(p) for p in files])


@task(name="model", cache_policy=NONE)
def prepare_model(cfg: ModelConfig, model_cache: str) -> ModelRef:
    path = resolve_source(cfg.source, model_cache, revision=cfg.revision, file_digest=file_digest)
    checkpoint = Checkpoint(path, trust_remote_code=cfg.trust_remote_code)
    adapter = checkpoint.adapter  # fails early, one line, for an unsupported architecture
    config = json.loads((checkpoint.path / "config.json").read_text())
    config.pop("transformers_version", None)
    config.pop("_name_or_path", None)
    key = stage_key("model", MODEL_STAGE_VERSION, weights=file_digest(checkpoint.path), config=config,
                    tokenizer=tokenizer_digest(checkpoint))
    return ModelRef(str(checkpoint.path), key, checkpoint.num_layers, adapter.family, cfg.trust_remote_code)
