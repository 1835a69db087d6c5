"""``loaq sweep``: alpha/beta variants of one run; calibration, embeddings and the clean stream are
computed once (their keys do not depend on alpha/beta) and every variant reuses them."""

from __future__ import annotations

from prefect import flow

from loaq.configs.schema import RunConfig
from loaq.flows.quantize import open_context, quantize_flow


def variant_config(config: RunConfig, alpha: float, beta: float) -> RunConfig:
    q = config.quantize.model_copy(update={"alpha_in": alpha, "alpha_out": alpha, "beta": beta})
    return config.model_copy(update={"quantize": q, "name": f"{config.name}-a{alpha:g}-b{beta:g}"})


@flow(name="loaq-sweep")
def sweep_flow(config: RunConfig, variants: list[tuple[float, float]]) -> list[tuple[tuple[float, float], dict]]:
    results = []
    for alpha, beta in variants:
        cfg = variant_config(config, alpha, beta)
        result = quantize_flow(cfg)
        store = open_context(cfg).store
        results.append(((alpha, beta), {d: store.open(k["quantized"]).attrs["ppl"] for d, k in result["evals"].items()}))
    return results
