"""Stage: choose layer l's strengths among ``quantize.search``'s candidates (``engine.search``).

Its record (kind "search", attributes only) holds the choice per sub-layer, every candidate's score
and which windows each side used. The choice becomes the layer's entry in ``quantize.layers``, so
the layer is then quantized by the ordinary stage under the ordinary key (``stages.keys.layer_key``):
a run configured with the chosen values, or a fixed-pair run that agrees up to there, shares it.
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.schema import SUBLAYERS, LayerSetting, QuantizeConfig, Strengths
from loaq.engine.search import LayerSearch

from .context import StageContext, failpoint
from .model import ModelRef
from .quantize import stored_layer


def choice_setting(choice: dict) -> LayerSetting:
    """A search record's choice ({sub-layer: [alpha, beta]}) as the layer's setting."""
    pairs = {name: tuple(choice[name]) for name in SUBLAYERS}
    first = pairs[SUBLAYERS[0]]
    if all(p == first for p in pairs.values()):
        return LayerSetting(alpha_in=first[0], alpha_out=first[0], beta=first[1])
    return LayerSetting(**{name: Strengths(alpha_in=a, alpha_out=a, beta=b) for name, (a, b) in pairs.items()})


def resolve(store, cfg: QuantizeConfig, index: int, key: str) -> QuantizeConfig:
    """``cfg`` with layer ``index`` set to the choice of the complete search record ``key``."""
    return cfg.with_layer(index, choice_setting(store.open(key).attrs["choice"]))


@task(name="layer-search", cache_policy=NONE)
def search_layer_stage(ctx: StageContext, model: ModelRef, index: int, cfg: QuantizeConfig, key: str,
                       quant_input_key: str, clean_input_key: str, clean_output_key: str) -> str:
    """Search layer ``index``'s strengths; returns ``key`` (its record complete)."""
    started = time.perf_counter()
    failpoint(f"layer-search:{index}:before")
    quantizer, clean, hq_in, _ = stored_layer(ctx, model, index, cfg, quant_input_key, clean_input_key,
                                              clean_output_key)
    result = LayerSearch(quantizer, cfg.search).run(clean, hq_in)
    seqlen = hq_in.shape[1]
    attrs = {"layer": index, "choice": {k: list(v) for k, v in result.choice.items()},
             "scores": {k: [list(s) for s in v] for k, v in result.scores.items()},
             "objective": cfg.search.objective, "windows": result.windows,
             "tokens": {side: (stop - start) * seqlen for side, (start, stop) in result.windows.items()},
             "solver_tokens": result.solver_tokens, "seconds": result.seconds}
    with ctx.store.writer(key, kind="search", attrs=attrs, overwrite=True):
        pass
    failpoint(f"layer-search:{index}:after")
    ctx.store.log_event(ctx.run_id, "layer-search", key, "computed", seconds=time.perf_counter() - started)
    return key
