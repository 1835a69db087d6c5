"""Stages of the clean stream: calibration sample -> embeddings -> clean hidden states per layer.

All three are shared by every variant (method, bits, alpha, beta) of one model and calibration:
their keys depend on the model and calibration only.
"""

from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.schema import CalibrationConfig
from loaq.data.calibration import CalibrationSpec, sample_calibration, sample_holdout
from loaq.data.sources import CalibrationSource
from loaq.engine.forward import clean_layer_forward, embed
from loaq.models.layers import ContextFactory

from .arrays import RecordArray, WriterArray
from .context import StageContext
from .keys import calibration_key, clean_key, embed_key, holdout_key
from .model import ModelRef

HIDDEN = "hidden"


def sublayer_output(name: str) -> str:
    """Array name of a sub-layer's output Y in a clean layer record."""
    return f"{name}_out"


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


@task(name="holdout", cache_policy=NONE)
def holdout_stage(ctx: StageContext, model: ModelRef, cfg: CalibrationConfig, n_windows: int,
                  data_dir: str | None) -> str:
    """The per-layer search's held-out windows: drawn after the calibration's, overlapping none of them.
    A calibration-like record: the embedding and clean-layer stages run on it unchanged."""
    key = holdout_key(calibration_key(model, cfg, data_dir), n_windows)

    def compute():
        tokens = sample_holdout(model.open().tokenizer(), calibration_spec(cfg), n_windows, data_dir)
        with ctx.store.writer(key, kind="calibration", attrs={"spec": cfg.model_dump(), "holdout": n_windows}) as w:
            w.put("tokens", tokens.to(torch.int64))

    return ctx.cached("holdout", key, compute)


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
