"""The quantization pipeline as one Prefect flow, reading top to bottom like Algorithm 1.

    model -> calibration sample -> embeddings (h = h_hat)
    for each decoder layer l:  clean stream (h) ; quantize W_in, W_out and advance h_hat
    evaluate (FP and quantized) -> report -> export (the formats configured, if any)

Every stage is a Prefect task that receives store keys and returns store keys (never tensors, so
Prefect pickles nothing large). Caching is the store's: a task whose record is complete under its
input-derived key returns at once (Prefect's own cache policy is off, since its default includes the
run id and would defeat reuse across runs). Resuming is the same mechanism: a killed run leaves its
finished records complete and its unfinished one unmarked, so running the flow again reuses the
former and recomputes from the first layer that is not complete.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable

from prefect import flow, get_run_logger

from loaq.configs.schema import RunConfig
from loaq.flows.export import check_formats, export_models
from loaq.flows.plan import Plan, baseline_chains, plan
from loaq.flows.space import check_space, out_of_space
from loaq.stages.context import Runtime, StageContext
from loaq.stages.evaluate import perplexity_stage, zero_shot_stage
from loaq.stages.keys import holdout_state_key, layer_key, search_key, weights_key
from loaq.stages.model import prepare_model
from loaq.stages.progress import LayerProgress
from loaq.stages.quantize import quantize_layer_stage
from loaq.stages.report import report_stage
from loaq.stages.retention import retain
from loaq.stages.search import holdout_layer_stage, resolve, search_layer_stage
from loaq.stages.streams import calibration_stage, clean_layer_stage, embed_stage, holdout_stage
from loaq.store import CorruptRecord, Store
from loaq.store.errors import StoreError


def open_store(url: str) -> Store:
    """The store at ``url``, checked to be writable before any work starts."""
    if "://" not in url:
        try:
            os.makedirs(url, exist_ok=True)
            probe = os.path.join(url, f".write-probe-{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise StoreError(f"store.url {url!r} is not a writable directory ({e.strerror or e}); "
                             "choose another store.url") from None
    return Store(url)


def open_context(config: RunConfig, run_id: str | None = None) -> StageContext:
    store = open_store(config.store.url)
    runtime = Runtime.resolve(config.runtime)
    runtime.apply()
    model_cache = os.path.join(os.path.dirname(os.path.abspath(config.store.url)) if "://" not in config.store.url
                               else ".loaq", "models")
    return StageContext(store, run_id or uuid.uuid4().hex[:12], runtime, model_cache)


def reuse_or_run(ctx: StageContext, stage: str, key: str, run: Callable[[], object]) -> str:
    """Reuse the complete record ``key`` (logged; the stage's task is not even started) or run it."""
    if not ctx.reuse(stage, key):
        run()
    return key


def resume_point(ctx: StageContext, chain: list[str]) -> int:
    """First layer to compute: after the last layer whose stream state and all weights so far are complete."""
    weights_ok = 0
    while weights_ok < len(chain) and ctx.store.is_complete(weights_key(chain[weights_ok])):
        weights_ok += 1
    if weights_ok == len(chain):
        return len(chain)
    for index in range(weights_ok - 1, -1, -1):
        if ctx.store.is_complete(chain[index]):
            return index + 1
    return 0


MAX_CORRUPTION_REPAIRS = 8


@flow(name="loaq-quantize", log_prints=True)
def quantize_flow(config: RunConfig, run_id: str | None = None, take_lock: bool = True) -> dict:
    """Quantize, evaluate and report; a corrupt record met on the way is unmarked and recomputed.

    ``take_lock=False`` is for a caller that holds the store's run lock for this run (the zoo).
    """
    log = get_run_logger()
    ctx = open_context(config, run_id)
    with ctx.store.lock("run", timeout=0.0) if take_lock else contextlib.nullcontext():
        for attempt in range(MAX_CORRUPTION_REPAIRS + 1):
            model = prepare_model(config.model, ctx.model_cache)
            p = plan(ctx, config, model)
            if attempt == 0:
                check_space(ctx.store, config, p)  # before any work: refuse what the disk cannot hold
            try:
                return _pipeline(ctx, config, p)
            except CorruptRecord as e:
                if attempt == MAX_CORRUPTION_REPAIRS:
                    raise
                log.warning("%s; recomputing it", e)
                ctx.store.invalidate(e.key, str(e))
            except Exception as e:
                full = out_of_space(e, ctx.store, config, p)
                if full is None:
                    raise
                raise full from None


def _clean_input(ctx: StageContext, config: RunConfig, model, clean: list[str], index: int) -> None:
    """Make the clean input of layer ``index`` complete: recomputed from the last complete clean
    state before it when retention (this config's or another variant's) dropped it."""
    first = index
    while first > 0 and not ctx.store.is_complete(clean[first]):
        first -= 1
    for j in range(first, index):
        clean_layer_stage(ctx, model, j, clean[j])
        retain(ctx, config.store, None, clean[j] if j > 0 else None)


class _HeldOut:
    """The search's held-out windows through the layers: their clean stream (the calibration's
    stages on the held-out draw) and their quantized stream through each finished layer."""

    def __init__(self, ctx: StageContext, config: RunConfig, model, p: Plan):
        self.ctx, self.config, self.model, self.embedding = ctx, config, model, p.held_embedding
        self.clean = [p.held_embedding, *p.held_clean]

    def state(self, index: int, chain: list[str]) -> str:
        """The held-out quantized stream after layer ``index`` (the embedding before layer 0)."""
        return self.embedding if index < 0 else holdout_state_key(chain[index], self.embedding)

    def input(self, index: int, chain: list[str]) -> str:
        """Both held-out streams complete in front of layer ``index`` (each recomputed from the last
        complete state before it where retention or a crash left it out); the quantized one's key."""
        ctx, store = self.ctx, self.ctx.store
        _clean_input(ctx, self.config, self.model, self.clean, index)
        reuse_or_run(ctx, "clean-layer", self.clean[index + 1],
                     lambda: clean_layer_stage(ctx, self.model, index, self.clean[index]))
        first = index - 1
        while first >= 0 and not store.is_complete(self.state(first, chain)):
            first -= 1
        for j in range(first + 1, index):
            holdout_layer_stage(ctx, self.model, j, chain, self.state(j - 1, chain), self.state(j, chain))
        return self.state(index - 1, chain)

    def advance(self, index: int, chain: list[str]) -> None:
        """The held-out quantized stream through the finished layer ``index``; the states before it
        go as the calibration streams' do."""
        holdout_layer_stage(self.ctx, self.model, index, chain, self.state(index - 1, chain), self.state(index, chain))
        if index > 0:
            retain(self.ctx, self.config.store, self.state(index - 1, chain), self.clean[index])


def _holdout(ctx: StageContext, config: RunConfig, model, p: Plan) -> _HeldOut:
    n = config.quantize.search.held_windows(config.calibration.n_samples)
    reuse_or_run(ctx, "holdout", p.holdout, lambda: holdout_stage(ctx, model, config.calibration, n, config.data_dir))
    reuse_or_run(ctx, "embed", p.held_embedding, lambda: embed_stage(ctx, model, p.holdout))
    return _HeldOut(ctx, config, model, p)


def _pipeline(ctx: StageContext, config: RunConfig, p: Plan) -> dict:
    log = get_run_logger()
    model = p.model
    log.info("model %s: %s, %d layers%s (key %s)", config.model.source, model.family, model.num_layers,
             f", hadamard-rotated (seed {model.rotation.seed})" if model.rotated else "", model.key[:12])
    check_formats(config, model, config.export.formats)  # an unexportable scheme fails before any work
    # A stage whose records are complete is not started at all (no task run): reruns stay cheap.
    reuse_or_run(ctx, "calibration", p.calibration,
                 lambda: calibration_stage(ctx, model, config.calibration, config.data_dir))
    reuse_or_run(ctx, "embed", p.embedding, lambda: embed_stage(ctx, model, p.calibration))

    chain, clean, q = list(p.chain), [p.embedding, *p.clean], p.quantize
    held = _holdout(ctx, config, model, p) if q.search is not None else None
    start = resume_point(ctx, chain)
    if 0 < start < model.num_layers:
        log.info("resuming at layer %d of %d", start, model.num_layers)
        _clean_input(ctx, config, model, clean, start)
    label = f"{q.method} {q.scheme}" + (" search" if q.search else "")
    with LayerProgress(model.num_layers, label) as progress:
        for index in range(model.num_layers):
            if index < start:
                ctx.store.log_event(ctx.run_id, "quantize-layer", chain[index], "reused")
                progress.skip(index)
                continue
            reuse_or_run(ctx, "clean-layer", clean[index + 1],
                         lambda: clean_layer_stage(ctx, model, index, clean[index]))
            quant_input = p.embedding if index == 0 else chain[index - 1]
            if q.search is not None and index >= q.search.first_searched(model.num_layers):
                # The layer's strengths are chosen first; its key follows from them.
                key = search_key(quant_input, q, index)
                if not ctx.reuse("layer-search", key):
                    search_layer_stage(ctx, model, index, q, key, p.variant, quant_input, clean[index],
                                       clean[index + 1], held.input(index, chain), held.clean[index],
                                       held.clean[index + 1])
                q = resolve(ctx.store, q, index, key)
                chain[index] = layer_key(quant_input, q, index)
            quantize_layer_stage(ctx, model, index, q, p.variant, chain[index], quant_input,
                                 clean[index], clean[index + 1])
            if held is not None:
                held.advance(index, chain)
            stored = ctx.store.size(chain[index]) + ctx.store.size(weights_key(chain[index])) \
                + ctx.store.size(clean[index + 1])
            retain(ctx, config.store, chain[index - 1] if index > 0 else None, clean[index] if index > 0 else None)
            progress.done(index, ctx.store.open(weights_key(chain[index])).attrs, stored=stored)

    if q.search is not None:
        p = plan(ctx, config, model)  # every search is done: the chain's keys, and the evaluations', are known
        chain = p.chain
    for dataset, keys in p.evals.items():
        for which, quantized in (("fp", None), ("quantized", chain)):
            reuse_or_run(ctx, "perplexity", keys[which],
                         lambda: perplexity_stage(ctx, model, quantized, dataset, config.evaluation, config.data_dir))
    for which, quantized in (("fp", None), ("quantized", chain)):
        if which in p.zero_shot:
            reuse_or_run(ctx, "zero-shot", p.zero_shot[which],
                         lambda: zero_shot_stage(ctx, model, quantized, config.evaluation, config.data_dir))
    report = report_stage(ctx, config, model, chain, p.evals, p.zero_shot,
                          baseline_chains(p.embedding, config.quantize, model.num_layers))
    exports = export_models(ctx, config, model, chain, config.export.formats)
    return {"run_id": ctx.run_id, "chain": chain[-1], "weights": p.weights, "evals": p.evals,
            "zero_shot": p.zero_shot, "report": report, "exports": exports}
