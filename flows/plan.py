"""A run's plan: every stage it consists of, its key, whether the store holds it, and its cost.

The plan is the one place that derives a run's stage graph. ``quantize_flow`` executes it;
``loaq plan``, ``status``, ``report``, ``export`` and ``gc`` read it. Costs come from the model's
shapes (``flows.costs``), so a model can be planned from its ``config.json`` alone
(:func:`shape_plan`: no weights, hence no keys and nothing known to be complete).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from loaq.configs.load import ConfigError
from loaq.configs.schema import QuantizeConfig, RunConfig
from loaq.stages.context import Runtime, StageContext
from loaq.stages.keys import (calibration_key, chain_id, chain_keys, clean_key, embed_key, holdout_key,
                              holdout_state_key, layer_key, pending_layer_key, perplexity_key, search_key, weights_key,
                              zero_shot_key)
from loaq.stages.model import ModelRef, prepare_model
from loaq.stages.report import variant_label
from loaq.stages.search import resolve

from .costs import (EVENT_BYTES, Cost, Shape, Workload, calibration_cost, clean_layer_cost, embed_cost, eval_windows,
                    hidden_record, perplexity_cost, quantize_layer_cost, search_layer_cost, weights_record,
                    zero_shot_cost)


@dataclass(frozen=True)
class Stage:
    """One stage of the run. ``keys``: the records it writes (empty in a shape-only plan);
    ``kept``: the bytes of them that retention keeps once the run is over."""

    kind: str
    layer: int | None
    keys: tuple[str, ...]
    cost: Cost
    kept: int
    complete: bool | None  # None: not known (no store, or no keys)


@dataclass
class Plan:
    model: ModelRef | None
    shape: Shape
    workload: Workload
    calibration: str | None = None
    embedding: str | None = None
    clean: list[str] = field(default_factory=list)  # clean stream after each layer
    chain: list[str] = field(default_factory=list)  # quantized stream after each layer
    searches: list[str | None] = field(default_factory=list)  # a search run's layer searches (None: not known yet)
    holdout: str | None = None  # a search run's held-out windows
    held_embedding: str | None = None
    held_clean: list[str] = field(default_factory=list)  # their clean stream after each layer
    quantize: QuantizeConfig | None = None  # the run's quantization with the searches done so far resolved
    weights: list[str] = field(default_factory=list)
    variant: str | None = None
    evals: dict[str, dict[str, str]] = field(default_factory=dict)
    zero_shot: dict[str, str] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    # Records that exist only while the run goes on (deleted by retention): one layer's worth.
    transient: int = 0

    def pending(self) -> list[Stage]:
        return [s for s in self.stages if not s.complete]

    def kept_bytes(self) -> int:
        """The store's size for this run once it is over (records kept by retention, event log)."""
        return sum(s.kept for s in self.stages) + EVENT_BYTES * len(self.stages)

    def bytes_to_add(self) -> int:
        """Disk the run still needs: what its unfinished stages keep, and its transient records."""
        pending = self.pending()
        if not pending:
            return 0
        return sum(s.kept for s in pending) + EVENT_BYTES * len(self.stages) + self.transient

    def peaks(self) -> tuple[int, int]:
        """(host, device) peak bytes over the stages still to run (over all stages if none)."""
        stages = self.pending() or self.stages
        return max(s.cost.host for s in stages), max(s.cost.device for s in stages)

    def summary(self) -> list[dict]:
        """One row per stage kind: count, complete, bytes written and kept, peaks."""
        rows: dict[str, dict] = {}
        for s in self.stages:
            row = rows.setdefault(s.kind, {"kind": s.kind, "count": 0, "complete": 0, "written": 0, "kept": 0,
                                           "host": 0, "device": 0})
            row["count"] += 1
            row["complete"] += bool(s.complete)
            row["written"] += s.cost.written
            row["kept"] += s.kept
            row["host"] = max(row["host"], s.cost.host)
            row["device"] = max(row["device"], s.cost.device)
        return list(rows.values())


def workload(config: RunConfig, runtime: Runtime) -> Workload:
    q = config.quantize
    return Workload(samples=config.calibration.n_samples, seqlen=config.calibration.seqlen,
                    dtype_bytes=runtime.dtype.itemsize, micro_batch=runtime.micro_batch,
                    on_device=runtime.device != "cpu", bits=q.bits, group_size=q.group_size, method=q.method)


def model_shape(path: str | os.PathLike) -> Shape:
    """The shapes of the model whose ``config.json`` is ``path`` (or is in folder ``path``)."""
    path = Path(path)
    return Shape.from_config(json.loads((path if path.suffix == ".json" else path / "config.json").read_text()))


def _stages(config: RunConfig, shape: Shape, w: Workload, keys: dict | None,
            is_complete) -> tuple[list[Stage], int]:
    """The stage list and the transient bytes, with keys from ``keys`` (None: a shape-only plan)."""
    keys = keys or {}
    store = config.store
    L = shape.layers
    clean_rec, state_rec, weights_rec = hidden_record(shape, w, 3), hidden_record(shape, w, 1), weights_record(shape, w)

    def stage(kind, layer, ks, cost, kept, needed=None):
        """``needed``: the records whose completeness makes the stage done (default: all it writes);
        a record retention drops once its layer is done is not needed then."""
        ks = tuple(k for k in ks if k)
        if not ks or is_complete is None:
            return Stage(kind, layer, ks, cost, kept, None)
        return Stage(kind, layer, ks, cost, kept, all(is_complete(k) for k in (ks if needed is None else needed)))

    out = [stage("calibration", None, [keys.get("calibration")], calibration_cost(w), calibration_cost(w).written),
           stage("embed", None, [keys.get("embedding")], embed_cost(shape, w), embed_cost(shape, w).written)]
    clean, chain = keys.get("clean", [None] * L), keys.get("chain", [None] * L)
    weights = [k and weights_key(k) for k in chain]
    out += _clean_stages("clean-layer", clean, weights, clean_layer_cost(shape, w), clean_rec, store, stage,
                         is_complete)
    transient = 0
    if config.quantize.search is not None:
        searches = keys.get("searches", [None] * L)
        for index in range(config.quantize.search.first_searched(L), L):
            cost = search_layer_cost(shape, w, config.quantize.search, L - index)
            out.append(stage("layer-search", index, [searches[index]], cost, cost.written))
        out_held, transient = _held_out_stages(config, shape, w, keys, weights, stage, is_complete)
        out += out_held
    for index in range(L):
        keep_state = store.keep_quant_states == "all" or index == L - 1
        out.append(stage("quantize-layer", index, [chain[index], weights[index]], quantize_layer_cost(shape, w),
                         weights_rec + state_rec * keep_state, None if keep_state else [weights[index]]))
    for dataset in config.evaluation.datasets:
        windows = eval_windows(dataset, config.evaluation.seqlen, config.evaluation.max_windows)
        cost = perplexity_cost(shape, w, windows, config.evaluation.seqlen)
        for which in ("fp", "quantized"):
            out.append(stage("perplexity", None, [keys.get("evals", {}).get(dataset, {}).get(which)], cost,
                             cost.written))
    if config.evaluation.zero_shot_tasks:
        for which in ("fp", "quantized"):
            cost = zero_shot_cost(shape, w)
            out.append(stage("zero-shot", None, [keys.get("zero_shot", {}).get(which)], cost, cost.written))
    return out, transient + _transient(store, clean_rec, state_rec)


def _clean_stages(kind: str, clean: list, weights: list, cost: Cost, record: int, store, stage,
                  is_complete) -> list[Stage]:
    """One clean-stream stage per layer, kept as ``store.keep_clean_states`` says."""
    out = []
    for index in range(len(clean)):
        keep = store.keep_clean_states == "all" or index == len(clean) - 1
        # A clean state that retention drops is done with once its layer is quantized.
        needed = None if keep or not weights[index] or not is_complete(weights[index]) else ()
        out.append(stage(kind, index, [clean[index]], cost, record * keep, needed))
    return out


def _transient(store, clean_record: int, state_record: int) -> int:
    """The records that exist only while a layer runs, under the retention settings."""
    return (clean_record if store.keep_clean_states == "last" else 0) + \
        (state_record if store.keep_quant_states == "last" else 0)


def _held_out_stages(config: RunConfig, shape: Shape, w: Workload, keys: dict, weights: list, stage,
                     is_complete) -> tuple[list[Stage], int]:
    """A search's held-out windows: their tokens and embedding, and per layer their clean stream and
    their quantized stream, kept as the calibration's streams are; and the transient bytes of those."""
    store, L = config.store, shape.layers
    hw = dataclasses.replace(w, samples=config.quantize.search.held_windows(w.samples))
    clean_rec, state_rec = hidden_record(shape, hw, 3), hidden_record(shape, hw, 1)
    clean, chain = keys.get("held_clean", [None] * L), keys.get("chain", [None] * L)
    embedding = keys.get("held_embedding")
    out = [stage("holdout", None, [keys.get("holdout")], calibration_cost(hw), calibration_cost(hw).written),
           stage("holdout-embed", None, [embedding], embed_cost(shape, hw), embed_cost(shape, hw).written)]
    out += _clean_stages("holdout-clean", clean, weights, clean_layer_cost(shape, hw), clean_rec, store, stage,
                         is_complete)
    for index in range(L):
        keep = store.keep_quant_states == "all" or index == L - 1
        state = chain[index] and embedding and holdout_state_key(chain[index], embedding)
        out.append(stage("holdout-layer", index, [state], clean_layer_cost(shape, hw).with_written(state_rec),
                         state_rec * keep, None if keep else [weights[index]]))
    return out, _transient(store, clean_rec, state_rec)


def plan(ctx: StageContext, config: RunConfig, model: ModelRef | None = None) -> Plan:
    """The plan of ``config`` on ``ctx``'s store: keys, what is complete, and costs."""
    model = model or prepare_model.fn(config.model, ctx.model_cache)
    check_layers(config, model.num_layers)
    calibration = calibration_key(model, config.calibration, config.data_dir)
    embedding = embed_key(ctx, model, calibration)
    clean = _clean_keys(ctx, model, embedding)
    quantize, chain, searches = resolved_chain(ctx.store, embedding, config.quantize, model.num_layers)
    evals = {d: {"fp": perplexity_key(ctx, model, None, d, config.evaluation, config.data_dir),
                 "quantized": perplexity_key(ctx, model, chain, d, config.evaluation, config.data_dir)}
             for d in config.evaluation.datasets}
    zero_shot = ({which: zero_shot_key(ctx, model, q, config.evaluation, config.data_dir)
                  for which, q in (("fp", None), ("quantized", chain))} if config.evaluation.zero_shot_tasks else {})
    shape = model_shape(model.path)
    w = workload(config, ctx.runtime)
    keys = {"calibration": calibration, "embedding": embedding, "clean": clean, "chain": chain, "evals": evals,
            "zero_shot": zero_shot, "searches": searches}
    if config.quantize.search is not None:
        keys["holdout"] = holdout_key(calibration, config.quantize.search.held_windows(config.calibration.n_samples))
        keys["held_embedding"] = embed_key(ctx, model, keys["holdout"])
        keys["held_clean"] = _clean_keys(ctx, model, keys["held_embedding"])
    stages, transient = _stages(config, shape, w, keys, ctx.store.is_complete)
    return Plan(model, shape, w, calibration, embedding, clean, chain, searches, keys.get("holdout"),
                keys.get("held_embedding"), keys.get("held_clean", []), quantize, [weights_key(k) for k in chain],
                chain_id(embedding, config.quantize), evals, zero_shot, stages, transient)


def _clean_keys(ctx: StageContext, model: ModelRef, embedding: str) -> list[str]:
    """The clean stream's keys after each layer, from the embedding of a draw of windows."""
    keys = []
    for index in range(model.num_layers):
        keys.append(clean_key(ctx, model, index, keys[-1] if keys else embedding))
    return keys


def check_layers(config: RunConfig, num_layers: int) -> None:
    """Per-layer settings name layers the model has."""
    q = config.quantize
    beyond = [i for i in q.layers if i >= num_layers]
    if beyond:
        raise ConfigError(f"quantize.layers sets layer {beyond[0]}, but the model has {num_layers} layers "
                          f"(0-{num_layers - 1}); remove or renumber that entry")


def resolved_chain(store, embedding: str, q: QuantizeConfig, num_layers: int
                   ) -> tuple[QuantizeConfig, list[str], list[str | None]]:
    """(config, chain keys, search keys). Without a search, the config's own chain. With one, the
    layers before the first searched one keep the config's own keys (no search: None); each complete
    layer search sets its layer's strengths (``stages.search.resolve``) and so the keys from there on;
    from the first search not done, the layers' keys are pending ones (no record has them) and so are
    the later searches' (None)."""
    if q.search is None:
        return q, chain_keys(embedding, q, num_layers), []
    chain, searches, prev, known = [], [], embedding, True
    first = q.search.first_searched(num_layers)
    for index in range(num_layers):
        if index < first:  # quantized with the run's own strengths, as a run without the search
            prev = layer_key(prev, q, index)
            chain.append(prev)
            searches.append(None)
            continue
        key = search_key(prev, q, index) if known else None
        searches.append(key)
        known = key is not None and store.is_complete(key)
        if known:
            q = resolve(store, q, index, key)
        prev = layer_key(prev, q, index) if known else pending_layer_key(prev, q, index)
        chain.append(prev)
    return q, chain, searches


def shape_plan(config: RunConfig, config_json: str | os.PathLike) -> Plan:
    """The costs of ``config`` for the model described by ``config_json`` alone (no weights, no keys)."""
    shape = model_shape(config_json)
    check_layers(config, shape.layers)
    w = workload(config, Runtime.resolve(config.runtime))
    stages, transient = _stages(config, shape, w, None, None)
    return Plan(None, shape, w, quantize=config.quantize, stages=stages, transient=transient)


BASELINE_METHODS = ("rtn", "gptq")


def baseline_chains(embedding: str, q: QuantizeConfig, num_layers: int) -> dict[str, list[str]]:
    """Chains of the RTN and GPTQ baselines with the same bits and grid as ``q`` (for reports:
    drawn beside the run when the store holds them; never computed for that purpose)."""
    out = {}
    for method in BASELINE_METHODS:
        if method != q.method:
            other = q.model_copy(update={"method": method})
            out[variant_label(other)] = chain_keys(embedding, other, num_layers)
    return out
