"""``loaq status``: which records of a run exist, per stage and per layer, with their sizes."""

from __future__ import annotations

from loaq.configs.schema import QuantizeConfig, RunConfig
from loaq.flows.plan import plan
from loaq.flows.quantize import open_context


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def layer_strengths(q: QuantizeConfig, index: int) -> str:
    """``a/b/c`` for both sub-layers, or ``attn a/b/c  mlp a/b/c`` where they differ."""
    fmt = lambda s: "/".join(f"{v:g}" for v in s)
    strengths = q.layer_strengths(index)
    if len(set(strengths.values())) == 1:
        return fmt(next(iter(strengths.values())))
    return "  ".join(f"{name} {fmt(s)}" for name, s in strengths.items())


def run_status(config: RunConfig) -> list[str]:
    ctx = open_context(config)
    p = plan(ctx, config)
    store = ctx.store

    def state(key: str) -> str:
        if store.is_complete(key):
            return f"complete {_mib(store.size(key))}"
        return "missing"

    q = config.quantize
    per_layer = bool(q.layers or q.search)
    rotation = f", hadamard-rotated seed {p.model.rotation.seed}" if p.model.rotated else ""
    lines = [f"store {config.store.url}   model {config.model.source} ({p.model.family}, {p.model.num_layers} layers"
             f"{rotation})",
             f"variant {q.method} {q.scheme}" + (f" g{q.group_size}" if q.group_size else "") +
             (" neuqi" if q.grid_init == "neuqi" else "") +
             ("" if q.search and q.search.last is None else f" alpha_in={q.alpha_in} alpha_out={q.alpha_out} beta={q.beta}") +
             (f" gptaq_alpha={q.gptaq_alpha}" if q.method == "gptaq" else "") +
             (" clean_stream_reset" if q.resets_clean_stream() else "") +
             (f" search alpha {list(q.search.alpha)} beta {list(q.search.beta)} holdout {q.search.holdout:g}"
              f" objective {q.search.objective}" + (f" last {q.search.last}" if q.search.last else "")
              if q.search else "") + (f" per-layer settings on layers {sorted(q.layers)}" if q.layers else ""),
             f"{'calibration':<14} {state(p.calibration)}", f"{'embedding':<14} {state(p.embedding)}",
             f"{'layer':>5}  {'clean stream':<22} {'quantized stream':<22} {'weights':<22}" +
             ("  strengths (alpha_in/alpha_out/beta)" if per_layer else "")]
    done = 0
    total = 0
    for index in range(p.model.num_layers):
        row = [state(p.clean[index]), state(p.chain[index]), state(p.weights[index])]
        done += store.is_complete(p.weights[index])
        total += sum(store.size(k) for k in (p.clean[index], p.chain[index], p.weights[index]) if store.is_complete(k))
        if per_layer:
            known = (not q.search or index < q.search.first_searched(p.model.num_layers)
                     or (p.searches[index] and store.is_complete(p.searches[index])))
            row.append(layer_strengths(p.quantize, index) if known else "search not run")
        lines.append(f"{index:5d}  " + " ".join(f"{c:<22}" for c in row).rstrip())
    for dataset, keys in p.evals.items():
        for which, key in keys.items():
            ppl = f"ppl {store.open(key).attrs['ppl']:.3f}" if store.is_complete(key) else "missing"
            lines.append(f"{'eval':<6} {dataset:<10} {which:<10} {ppl}")
    lines.append(f"{done}/{p.model.num_layers} layers quantized; per-layer records {total / 2**20:.1f} MiB")
    return lines
