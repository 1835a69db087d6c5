"""Stages of the per-layer search: choose layer l's strengths among ``quantize.search``'s candidates
(``engine.search``), and carry the held-out windows' quantized stream through the chosen layer.

The search quantizes the layer with its choice exactly as the ordinary stage would, and writes the
ordinary records under the ordinary key (``stages.keys.layer_key`` of the config with the choice in
``quantize.layers``): a run configured with the chosen values, or a fixed-pair run that agrees up to
there, shares them. Its own record (kind "search", attributes only, written last) holds the choice per
sub-layer and every candidate's score.
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.schema import SUBLAYERS, LayerSetting, QuantizeConfig, Strengths
from loaq.engine.arrays import MemoryArray, micro_batches
from loaq.engine.forward import forward_layer
from loaq.engine.search import LayerSearch
from loaq.engine.tail import FullPrecisionTail
from loaq.models.layers import ContextFactory

from . import interrupt
from .arrays import RecordArray, WriterArray
from .context import StageContext, failpoint
from .evaluate import StoredQuantizedWeights
from .keys import layer_key
from .model import ModelRef
from .quantize import store_layer, stored_clean_stream, stored_layer
from .streams import HIDDEN


def choice_setting(choice: dict) -> LayerSetting:
    """A search record's choice ({sub-layer: [alpha_in, alpha_out, beta]}) as the layer's setting."""
    strengths = {name: tuple(choice[name]) for name in SUBLAYERS}
    first = strengths[SUBLAYERS[0]]
    if all(s == first for s in strengths.values()):
        return LayerSetting(alpha_in=first[0], alpha_out=first[1], beta=first[2])
    return LayerSetting(**{name: Strengths(alpha_in=a, alpha_out=o, beta=b) for name, (a, o, b) in strengths.items()})


def resolve(store, cfg: QuantizeConfig, index: int, key: str) -> QuantizeConfig:
    """``cfg`` with layer ``index`` set to the choice of the complete search record ``key``."""
    return cfg.with_layer(index, choice_setting(store.open(key).attrs["choice"]))


@task(name="layer-search", cache_policy=NONE)
def search_layer_stage(ctx: StageContext, model: ModelRef, index: int, cfg: QuantizeConfig, key: str, chain_id: str,
                       quant_input_key: str, clean_input_key: str, clean_output_key: str,
                       held_input_key: str, held_clean_input_key: str, held_clean_output_key: str) -> str:
    """Search layer ``index``'s strengths and quantize it with the choice; returns ``key`` (the search
    record complete, and the chosen layer's records)."""
    started = time.perf_counter()
    interrupt.check()
    failpoint(f"layer-search:{index}:before")
    quantizer, clean, hq_in, clean_out = stored_layer(ctx, model, index, cfg, quant_input_key, clean_input_key,
                                                      clean_output_key)
    held_clean = stored_clean_stream(ctx, quantizer.adapter, held_clean_input_key, held_clean_output_key)
    held_in = RecordArray(ctx.store.open(held_input_key), HIDDEN)
    hq_out = MemoryArray(shape=hq_in.shape, dtype=ctx.runtime.dtype)
    tail = None
    if cfg.search.objective == "kl":
        tail = FullPrecisionTail(model.open(), index, quantizer.contexts, device=ctx.runtime.device,
                                 dtype=ctx.runtime.dtype)
    result = LayerSearch(quantizer, cfg.search, tail).run(clean, hq_in, hq_out, held_clean, held_in)
    del tail
    strengths = result.choice  # the run's alpha_in with the chosen alpha_out and beta
    resolved = cfg.with_layer(index, choice_setting(strengths))
    chain_key = layer_key(quant_input_key, resolved, index)

    def copy(out):
        for start, stop in micro_batches(hq_out.shape[0], ctx.runtime.micro_batch):
            out.write(start, hq_out.read(start, stop))
        return result.layer

    store_layer(ctx, index, resolved, chain_id, chain_key, hq_in.shape, clean_out, copy)
    seqlen = hq_in.shape[1]
    attrs = {"layer": index, "choice": {k: list(v) for k, v in strengths.items()},
             "scores": {k: [list(s) for s in v] for k, v in result.scores.items()},
             "objective": cfg.search.objective,
             "tokens": {"solve": hq_in.shape[0] * seqlen, "held_out": held_in.shape[0] * seqlen},
             "solver_tokens": {part: info["tokens"] for part, info in result.layer.solver.items()},
             "seconds": result.seconds}
    with ctx.store.writer(key, kind="search", attrs=attrs, overwrite=True):
        pass
    failpoint(f"layer-search:{index}:after")
    ctx.store.log_event(ctx.run_id, "layer-search", key, "computed", seconds=time.perf_counter() - started)
    return key


@task(name="holdout-layer", cache_policy=NONE)
def holdout_layer_stage(ctx: StageContext, model: ModelRef, index: int, chain: list[str], input_key: str,
                        key: str) -> str:
    """The held-out windows' quantized stream through layer ``index`` of ``chain`` (its stored weights)."""

    def compute():
        rt = ctx.runtime
        source = StoredQuantizedWeights(model.open(), ctx.store, chain)
        contexts = ContextFactory(source.adapter, source.config, rt.device)
        h_in = RecordArray(ctx.store.open(input_key), HIDDEN)
        with ctx.store.writer(key, kind="holdout_state", attrs={"layer": index}) as w:
            out = WriterArray(w, HIDDEN, h_in.shape, rt.dtype, rt.micro_batch)
            forward_layer(source, index, h_in, out, contexts, device=rt.device, dtype=rt.dtype,
                          micro_batch=rt.micro_batch)

    return ctx.cached("holdout-layer", key, compute)
