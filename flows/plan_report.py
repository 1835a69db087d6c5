"""``loaq plan``: the plan as a table, before any work (per stage kind: count, bytes, peaks)."""

from __future__ import annotations

from pathlib import Path

from loaq.configs.schema import RunConfig

from .plan import Plan, plan, shape_plan
from .space import free_bytes, gib


def weights_free_source(source: str) -> Path | None:
    """A local ``config.json`` (or a folder holding one and no weights): plan from shapes alone."""
    path = Path(source).expanduser()
    if path.suffix == ".json" and path.is_file():
        return path
    if path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
        return path / "config.json"
    return None


def plan_table(config: RunConfig) -> tuple[Plan, list[str]]:
    """The plan of ``config`` and its table (lines), with the total against a local store's free space."""
    config_json = weights_free_source(config.model.source)
    if config_json is not None:
        p, free, url = shape_plan(config, config_json), None, config.store.url
    else:
        from .quantize import open_context

        ctx = open_context(config)
        p, free, url = plan(ctx, config), free_bytes(ctx.store), ctx.store.url
    s, w = p.shape, p.workload
    lines = [f"model {config.model.source}: {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, "
             f"{s.heads}/{s.kv_heads} heads, vocab {s.vocab}; weights on disk {gib(s.weights_on_disk())}",
             f"calibration {w.samples} x {w.seqlen} tokens, runtime {w.dtype_bytes * 8}-bit streams, "
             f"micro-batch {w.micro_batch}, {'device' if w.on_device else 'cpu'}; {config.quantize.method} "
             f"{config.quantize.scheme}{' search' if config.quantize.search else ''}; keep_clean_states={config.store.keep_clean_states} "
             f"keep_quant_states={config.store.keep_quant_states}",
             "",
             f"| {'stage':<14} | {'count':>5} | {'complete':>8} | {'written':>11} | {'kept':>11} | {'peak host':>11} "
             f"| {'peak device':>11} |",
             f"| {'-' * 14} | {'-' * 4}: | {'-' * 7}: | {'-' * 10}: | {'-' * 10}: | {'-' * 10}: | {'-' * 10}: |"]
    for row in p.summary():
        complete = "-" if config_json is not None else str(row["complete"])
        lines.append(f"| {row['kind']:<14} | {row['count']:>5} | {complete:>8} | {gib(row['written']):>11} | "
                     f"{gib(row['kept']):>11} | {gib(row['host']):>11} | "
                     f"{(gib(row['device']) if row['device'] else '-'):>11} |")
    host, device = p.peaks()
    lines.append(f"| {'total':<14} | {len(p.stages):>5} | {'':>8} | "
                 f"{gib(sum(st.cost.written for st in p.stages)):>11} | {gib(p.kept_bytes()):>11} | {gib(host):>11} | "
                 f"{(gib(device) if device else '-'):>11} |")
    lines.append("")
    need = p.bytes_to_add()
    if free is None:
        lines.append(f"store {url}: this run still adds {gib(need)} (peak on disk; free space "
                     f"{'not known for an object store' if '://' in url else 'not checked without the model'})")
    else:
        verdict = "fits" if need <= free else f"does NOT fit ({gib(need - free)} short)"
        lines.append(f"store {url}: this run still adds {gib(need)} (peak on disk), {gib(free)} free: {verdict}")
    return p, lines
