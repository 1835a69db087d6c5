"""Shared fixtures: tiny random models of every supported family, saved as real checkpoints."""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile

import pytest
import torch

from loaq.prefect_startup import DEFAULT_WINDOW, STARTUP_SETTING

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Each test process has a Prefect home of its own (database, profiles): no test touches the user's
# Prefect, and parallel test processes never share one SQLite database.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="loaq-test-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)  # after Prefect's server stops
os.environ.pop("PREFECT_PROFILES_PATH", None)
# Flows called in this process start Prefect's ephemeral server without the CLI's start-up step
# (loaq.prefect_startup); they get its window, which a first start on a fresh home needs under load.
os.environ.setdefault(STARTUP_SETTING, str(DEFAULT_WINDOW))

torch.set_num_threads(1)

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def tiny_config(family: str, layers: int = 2, hidden: int = 64, vocab: int = 512, **extra):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5, **extra)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw)).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The embedded SmolLM2: its GGUF file and our per-layer safetensors conversion of it (made once)."""
    from loaq.models.checkpoint import Checkpoint
    from loaq.models.gguf_convert import convert_gguf
    from loaq.models.sources import embedded_gguf

    gguf = embedded_gguf("embedded:smollm2")
    converted = convert_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "converted")
    return gguf, Checkpoint(converted)


@pytest.fixture(scope="session")
def shared_data() -> str:
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def correlated_inputs(tokens: int, n_in: int, dtype=torch.float64) -> torch.Tensor:
    """X = Z M with a random mixing M: strongly correlated columns of uneven scale."""
    Z = torch.randn(tokens, n_in, dtype=dtype)
    M = torch.randn(n_in, n_in, dtype=dtype) / math.sqrt(n_in)
    M += torch.diag(torch.rand(n_in, dtype=dtype) * 2)
    return Z @ M


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port) for the whole session; stopped at its end."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from s3kit import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["local", "memory", "s3"])
def store_url(request, tmp_path) -> str:
    """A fresh store's URL on each backend: a local directory, ``memory://``, and S3 on loopback."""
    import uuid

    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://loaq-test-{uuid.uuid4().hex}/store"
    return request.getfixturevalue("s3_server").new_bucket() + "/store"

