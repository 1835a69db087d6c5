"""Stages of the clean stream: calibration sample -> embeddings -> clean hidden states per layer.

All three are shared by every variant (method, bits, alpha, beta) of one model and calibration:
their keys depend on the model and calibration only.
"""

from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.schema import CalibrationConfig
from loaq.data.calibration import CalibrationSpec, sample_calibration
from loaq.data.sources import CalibrationSource, content_digest
from loaq.engine.forward import clean_layer_forward, embed
from loaq.models.layers import ContextFactory
from loaq.store.keys import stage_key

from .arrays import RecordArray, WriterArray
from .context import StageContext
from .model import ModelRef

STREAM_VERSION = 1
# Version 2 of the clean layer records adds each sub-layer's output (``attn_out``, ``mlp_out``).
CLEAN_VERSION = 2
HIDDEN = "hidden"


def sublayer_output(name: str) -> str:
    """Array name of a sub-layer's output Y in a clean layer record."""
    return f"{name}_out"


def data_identity(data_dir: str | None) -> str:
    """Local files are identified by their verified checksums (paths are not identity)."""
    return "hub" if data_dir is None else "local-sha256-verified"


def calibration_spec(cfg: CalibrationConfig) -> CalibrationSpec:
    source = CalibrationSource(dataset=cfg.dataset, **(cfg.source.model_dump() if cfg.source else {}))
    return CalibrationSpec(source=source, n_samples=cfg.n_samples, seqlen=cfg.seqlen, seed=cfg.seed)


@task(name="calibration", cache_policy=NONE)
def calibration_stage(ctx: StageContext, model: ModelRef, cfg: CalibrationConfig, data_dir: str | None) -> str:
    key = calibration_key(model, cfg, data_dir)

    def compute():
        tokens = sample_calibration(model.open().tokenizer(), calibration_spec(cfg), data_dir)
        with ctx.store.writer(key, kind="calibration", attrs={"spec": cfg.model_dump()}) as w:
            w.put("tokens", tokens.to(torch.int64))

    return ctx.cached("calibration", key, compute)


def calibration_key(model: ModelRef, cfg: CalibrationConfig, data_dir: str | None) -> str:
    # The sampling spec without where the data lies: a local source enters through its content's
    # digest, so moving it keeps the key and editing it changes it. c4 keeps the fields it always had.
    spec = cfg.model_dump(exclude={"source"})
    if cfg.source is not None:
        spec["source"] = cfg.source.model_dump(exclude={"path"})
    if cfg.dataset == "local":
        data = "sha256:" + content_digest(calibration_spec(cfg).source)
    else:
        data = data_identity(data_dir)
    return stage_key("calibration", STREAM_VERSION, model=model.key, spec=spec, data=data)


def embed_key(ctx: StageContext, model: ModelRef, calibration_key: str) -> str:
    return hidden_key(ctx, "embed", model=model.key, calibration=calibration_key)


def clean_key(ctx: StageContext, model: ModelRef, index: int, input_key: str) -> str:
    return hidden_key(ctx, "clean_layer", model=model.key, layer=index, prev=input_key, version=CLEAN_VERSION)


def hidden_key(ctx: StageContext, stage: str, version: int = STREAM_VERSION, **inputs) -> str:
    # The dtype of the stored stream is part of its identity (bf16 on a GPU, fp32 on the CPU).
    return stage_key(stage, version, dtype=str(ctx.runtime.dtype), **inputs)


@task(name="embed", cache_policy=NONE)
def embed_stage(ctx: StageContext, model: ModelRef, calibration_key: str) -> str:
    key = embed_key(ctx, model, calibration_key)

    def compute():
        tokens = ctx.store.open(calibration_key).read("tokens")
        h = embed(model.open(), tokens, ctx.runtime.dtype)
        with ctx.store.writer(key, kind="embedding") as w:
            out = WriterArray(w, HIDDEN, tuple(h.shape), h.dtype, ctx.runtime.micro_batch)
            out.write(0, h)

    return ctx.cached("embed", key, compute)


@task(name="clean-layer", cache_policy=NONE)
def clean_layer_stage(ctx: StageContext, model: ModelRef, index: int, input_key: str) -> str:
    """Clean hidden states after decoder layer ``index`` (full-precision weights)."""
    key = clean_key(ctx, model, index, input_key)

    def compute():
        rt = ctx.runtime
        checkpoint = model.open()
        h_in = RecordArray(ctx.store.open(input_key), HIDDEN)
        contexts = ContextFactory(checkpoint.adapter, checkpoint.config, rt.device)
        with ctx.store.writer(key, kind="clean_state", attrs={"layer": index}) as w:
            h_out = WriterArray(w, HIDDEN, h_in.shape, rt.dtype, rt.micro_batch, point=f"clean-layer:{index}:mid")
            sub_out = {sub.name: WriterArray(w, sublayer_output(sub.name), h_in.shape, rt.dtype, rt.micro_batch)
                       for sub in checkpoint.adapter.sublayers}
            clean_layer_forward(checkpoint, index, h_in, h_out, sub_out, contexts, device=rt.device, dtype=rt.dtype,
                                micro_batch=rt.micro_batch)

    return ctx.cached("clean-layer", key, compute)
