"""The keys a run's stages would use, computed without running anything (for status and reports)."""

from __future__ import annotations

from dataclasses import dataclass

from loaq.configs.schema import QuantizeConfig, RunConfig
from loaq.stages.context import StageContext
from loaq.stages.keys import (calibration_key, chain_id, chain_keys, clean_key, embed_key, perplexity_key, weights_key,
                              zero_shot_key)
from loaq.stages.model import ModelRef, prepare_model
from loaq.stages.report import variant_label


@dataclass
class Plan:
    model: ModelRef
    calibration: str
    embedding: str
    clean: list[str]  # clean stream after each layer
    chain: list[str]  # quantized stream after each layer
    weights: list[str]
    variant: str
    evals: dict[str, dict[str, str]]
    zero_shot: dict[str, str]


def plan(ctx: StageContext, config: RunConfig, model: ModelRef | None = None) -> Plan:
    model = model or prepare_model.fn(config.model, ctx.model_cache)
    calibration = calibration_key(model, config.calibration, config.data_dir)
    embedding = embed_key(ctx, model, calibration)
    clean = []
    prev = embedding
    for index in range(model.num_layers):
        prev = clean_key(ctx, model, index, prev)
        clean.append(prev)
    chain = chain_keys(embedding, config.quantize, model.num_layers)
    evals = {d: {"fp": perplexity_key(ctx, model, None, d, config.evaluation, config.data_dir),
                 "quantized": perplexity_key(ctx, model, chain, d, config.evaluation, config.data_dir)}
             for d in config.evaluation.datasets}
    zero_shot = ({which: zero_shot_key(ctx, model, q, config.evaluation, config.data_dir)
                  for which, q in (("fp", None), ("quantized", chain))} if config.evaluation.zero_shot_tasks else {})
    return Plan(model, calibration, embedding, clean, chain, [weights_key(k) for k in chain],
                chain_id(embedding, config.quantize), evals, zero_shot)


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
