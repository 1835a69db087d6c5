"""``loaq report``: rebuild a run's report from the store alone (nothing is computed)."""

from __future__ import annotations

from loaq.configs.schema import RunConfig
from loaq.flows.plan import baseline_chains, plan
from loaq.flows.quantize import open_context
from loaq.stages.report import report_stage


def report_flow(config: RunConfig) -> str:
    ctx = open_context(config)
    p = plan(ctx, config)
    missing = [k for k in p.weights if not ctx.store.is_complete(k)]
    missing += [k for keys in p.evals.values() for k in keys.values() if not ctx.store.is_complete(k)]
    if missing:
        from loaq.configs.load import ConfigError

        raise ConfigError(f"the store has no complete run for config {config.name!r} ({len(missing)} records missing); "
                          "run `loaq run` with the same config first")
    return report_stage.fn(ctx, config, p.model, p.chain, p.evals, p.zero_shot,
                           baseline_chains(p.embedding, config.quantize, p.model.num_layers))
