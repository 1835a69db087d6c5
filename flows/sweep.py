"""``loaq sweep``: variants of one run (methods x bits x alpha x beta) on one store.

Calibration, embeddings and the clean stream are keyed by the model and the calibration only, so
they are computed once and every variant reuses them; a variant's quantized chain is its own. After
the variants the sweep report (perplexity table, alpha x beta heatmap, one drift line per variant)
is written; ``loaq report`` with the same sweep options rebuilds it from the store alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from prefect import flow
from pydantic import ValidationError

from loaq.configs.load import ConfigError, describe
from loaq.configs.schema import RunConfig
from loaq.flows.plan import plan
from loaq.flows.quantize import open_context, quantize_flow
from loaq.stages.keys import config_identity
from loaq.stages.report import sweep_report_stage


@dataclass(frozen=True)
class SweepSpec:
    """The axes of a sweep; an empty axis keeps the config's own value."""

    methods: tuple[str, ...] = ()
    bits: tuple[int, ...] = ()
    alphas: tuple[float, ...] = ()
    betas: tuple[float, ...] = ()

    def is_empty(self) -> bool:
        return not (self.methods or self.bits or self.alphas or self.betas)


def variant_configs(config: RunConfig, spec: SweepSpec) -> list[RunConfig]:
    """Every distinct variant, in axis order; variants that differ only in fields their method
    ignores (alpha/beta for GPTQ, ...) are one variant."""
    q = config.quantize
    seen, out = set(), []
    for method, bits, alpha, beta in itertools.product(spec.methods or (q.method,), spec.bits or (q.bits,),
                                                       spec.alphas or (q.alpha_in,), spec.betas or (q.beta,)):
        data = {**q.model_dump(), "method": method, "bits": bits, "beta": beta}
        if spec.alphas:
            data.update(alpha_in=alpha, alpha_out=alpha)
        try:
            variant = type(q).model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"sweep variant {method} W{bits} alpha={alpha:g} beta={beta:g}: "
                              + describe(e).replace("config field '", "field 'quantize.")) from None
        identity = repr(sorted(config_identity(variant).items()))
        if identity in seen:
            continue
        seen.add(identity)
        alpha_in, alpha_out, b = variant.alphas_beta()
        name = f"{config.name}-{method}-w{bits}" + (f"-a{alpha_in:g}" if any(variant.terms) else "") + \
               (f"-b{b:g}" if variant.terms.soa else "")
        out.append(config.model_copy(update={"quantize": variant, "name": name}))
    return out


def sweep_report(config: RunConfig, variants: list[RunConfig]) -> str:
    """Write the sweep report from the store alone; every variant must be complete."""
    ctx = open_context(config)
    entries, model = [], None
    for variant in variants:
        p = plan(ctx, variant, model)
        model = p.model
        keys = p.weights + [k for e in p.evals.values() for k in e.values()]
        if not all(ctx.store.is_complete(k) for k in keys):
            raise ConfigError(f"the store has no complete run for sweep variant {variant.name!r}; "
                              "run `loaq sweep` with the same options first")
        entries.append({"quantize": variant.quantize, "chain": p.chain, "evals": p.evals})
    return sweep_report_stage.fn(ctx, config, model, entries)


@flow(name="loaq-sweep")
def sweep_flow(config: RunConfig, spec: SweepSpec) -> tuple[list[tuple[RunConfig, dict]], str]:
    """Run every variant (each a full quantize flow, sharing the store), then the sweep report."""
    variants = variant_configs(config, spec)
    results = [(variant, quantize_flow(variant)) for variant in variants]
    report = sweep_report(config, variants)
    return results, report
