"""``loaq status``: which records of a run exist, per stage and per layer, with their sizes."""

from __future__ import annotations

from loaq.configs.schema import RunConfig
from loaq.flows.plan import plan
from loaq.flows.quantize import open_context


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def run_status(config: RunConfig) -> list[str]:
    ctx = open_context(config)
    p = plan(ctx, config)
    store = ctx.store

    def state(key: str) -> str:
        if store.is_complete(key):
            return f"complete {_mib(store.size(key))}"
        return "missing"

    q = config.quantize
    rotation = f", hadamard-rotated seed {p.model.rotation.seed}" if p.model.rotated else ""
    lines = [f"store {config.store.url}   model {config.model.source} ({p.model.family}, {p.model.num_layers} layers"
             f"{rotation})",
             f"variant {q.method} {q.scheme}" + (f" g{q.group_size}" if q.group_size else "") +
             (" neuqi" if q.grid_init == "neuqi" else "") +
             f" alpha_in={q.alpha_in} alpha_out={q.alpha_out} beta={q.beta}" +
             (f" gptaq_alpha={q.gptaq_alpha}" if q.method == "gptaq" else "") +
             (" clean_stream_reset" if q.resets_clean_stream() else ""),
             f"{'calibration':<14} {state(p.calibration)}", f"{'embedding':<14} {state(p.embedding)}",
             f"{'layer':>5}  {'clean stream':<22} {'quantized stream':<22} {'weights':<22}"]
    done = 0
    total = 0
    for index in range(p.model.num_layers):
        row = [state(p.clean[index]), state(p.chain[index]), state(p.weights[index])]
        done += store.is_complete(p.weights[index])
        total += sum(store.size(k) for k in (p.clean[index], p.chain[index], p.weights[index]) if store.is_complete(k))
        lines.append(f"{index:5d}  " + " ".join(f"{c:<22}" for c in row))
    for dataset, keys in p.evals.items():
        for which, key in keys.items():
            ppl = f"ppl {store.open(key).attrs['ppl']:.3f}" if store.is_complete(key) else "missing"
            lines.append(f"{'eval':<6} {dataset:<10} {which:<10} {ppl}")
    lines.append(f"{done}/{p.model.num_layers} layers quantized; per-layer records {total / 2**20:.1f} MiB")
    return lines
