"""Per-layer (alpha, beta) search against every fixed pair of its candidate grid, on SmolLM2-135M.

For each width: GPTQ (which also computes the clean stream and the FP evaluation every row
shares), then LoaQ with each fixed pair of the grid, then LoaQ with ``quantize.search`` over the
grid, all on one fresh store and in this one process. Every quantized layer is computed here (a
searched layer by its search, which writes the layer's records; a row that reused a layer is marked
and left out of the cost), and ``quantize s`` is the seconds of the layer-search and quantize-layer
stages, with the search's as a multiple of the median fixed pair's. The rows run one after another,
so a change in the machine's load between them moves that ratio: ``bench/search_cost.py``
interleaves the two on a few layers for the cost alone.
Writes ``bench/results/search.{json,md}`` and ``search_w<bits>.png`` (the chosen alpha and beta per
layer beside the drift of the search and of the best fixed pair).

    .venv/bin/python bench/search.py                         # W3 and W4, alpha 0.25/0.5/0.75 x beta 0/0.25/0.5
    .venv/bin/python bench/search.py --bits 3 --set calibration.n_samples=16
    .venv/bin/python bench/search.py --bits 3 --search "objective: kl, last: 4"

The search row runs on a store of its own (``<store>-search``), so that it computes every layer even
where it quantizes some with the run's own pair (``last``), as the fixed row of that pair does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402

from loaq.configs.load import load_config  # noqa: E402
from loaq.flows.quantize import open_context, quantize_flow  # noqa: E402
from loaq.stages.plots import plot_strengths  # noqa: E402
from loaq.stages.report import weights_rows  # noqa: E402

RESULTS = Path(__file__).parent / "results"
QUANTIZE_STAGES = ("layer-search", "quantize-layer")


def run(config_name: str, overrides: list[str]) -> dict:
    config = load_config(config_name, overrides)
    started = time.perf_counter()
    result = quantize_flow(config)
    wall = time.perf_counter() - started
    ctx = open_context(config)
    events = [e for e in ctx.store.events(result["run_id"]) if e["stage"] in QUANTIZE_STAGES]
    seconds = sum(e.get("seconds") or 0.0 for e in events if e["action"] == "computed")
    # A searched layer is computed by its search (its ordinary stage then reuses the records).
    all_computed = sum(e["action"] == "computed" for e in events) == len(result["weights"])
    ppl = {d: ctx.store.open(k["quantized"]).attrs["ppl"] for d, k in result["evals"].items()}
    fp = {d: ctx.store.open(k["fp"]).attrs["ppl"] for d, k in result["evals"].items()}
    layers = weights_rows(ctx, result["weights"])
    return {"ppl": ppl, "fp": fp, "quantize_seconds": round(seconds, 1), "wall_seconds": round(wall, 1),
            "all_computed": all_computed, "layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    ap.add_argument("--config", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--store", default=None, help="store URL (default: a fresh one under .loaq/)")
    ap.add_argument("--out", default=str(RESULTS / "search"))
    ap.add_argument("--search", default="", help="more quantize.search settings, e.g. \"objective: kl, last: 4\"")
    args = ap.parse_args()
    store = args.store or f".loaq/bench-search-{time.strftime('%Y%m%d-%H%M%S')}"
    base = ["evaluation.datasets=[wikitext2]", *args.overrides, f"store.url={store}", "store.keep_quant_states=last"]
    grid = search_grid(args)
    out = Path(args.out)
    rows: list[dict] = []
    header = None
    for bits in args.bits:
        variants = [("gptq", None, [f"quantize.method=gptq", f"quantize.bits={bits}"])]
        variants += [(f"loaq a={a:g} b={b:g}", (a, b), ["quantize.method=loaq", f"quantize.bits={bits}",
                                                        f"quantize.alpha_in={a}", f"quantize.alpha_out={a}",
                                                        f"quantize.beta={b}"])
                     for a in args.alpha for b in args.beta]
        variants.append(("loaq search", None, ["quantize.method=loaq", f"quantize.bits={bits}", f"quantize.search={grid}",
                                               f"store.url={store}-search"]))
        for label, pair, overrides in variants:
            name = "bench-search-w{}-{}".format(bits, label.replace(" ", "-").replace("=", ""))
            r = run(args.config, [*base, *overrides, f"name={name}"])
            row = {"bits": bits, "label": label, "pair": pair, **{k: v for k, v in r.items() if k != "layers"}}
            row["layers"] = r["layers"]
            rows.append(row)
            print(f"W{bits} {label}: wikitext2 ppl {r['ppl']['wikitext2']:.3f}, quantize {r['quantize_seconds']} s",
                  flush=True)
            header = header or _header(args, store)
            _write(out, header, rows)
    print(_table(header, rows))


def _header(args, store) -> dict:
    config = load_config(args.config, args.overrides)
    c = config.calibration
    return {"model": config.model.source, "calibration": f"{c.n_samples}x{c.seqlen} {c.dataset} (seed {c.seed})",
            "evaluation": f"WikiText-2 test {config.evaluation.max_windows}x{config.evaluation.seqlen}",
            "alpha": args.alpha, "beta": args.beta, "search": config_search(args), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "store": store}


def search_grid(args) -> str:
    """The search row's ``quantize.search``: the candidate grid and any ``--search`` settings."""
    return f"{{alpha: {list(args.alpha)}, beta: {list(args.beta)}{', ' + args.search if args.search else ''}}}"


def config_search(args) -> str:
    """The search's settings as the table states them (the config's defaults filled in)."""
    search = load_config(args.config, [*args.overrides, f"quantize.search={search_grid(args)}"]).quantize.search
    return f"objective {search.objective}, holdout {search.holdout:g}" + (f", last {search.last}" if search.last else "")


def summary(rows: list[dict]) -> list[dict]:
    """Per width: the search, the best fixed pair, GPTQ, and the search's cost over the fixed pairs'."""
    out = []
    for bits in sorted({r["bits"] for r in rows}):
        mine = [r for r in rows if r["bits"] == bits]
        search = next((r for r in mine if r["label"] == "loaq search"), None)
        fixed = [r for r in mine if r["pair"] is not None and r["all_computed"]]
        gptq = next((r for r in mine if r["label"] == "gptq"), None)
        if not (search and fixed):
            continue
        best = min(fixed, key=lambda r: r["ppl"]["wikitext2"])
        median = statistics.median(r["quantize_seconds"] for r in fixed)
        out.append({"bits": bits, "search_ppl": search["ppl"]["wikitext2"], "best_fixed": best["label"],
                    "best_fixed_ppl": best["ppl"]["wikitext2"], "gptq_ppl": gptq and gptq["ppl"]["wikitext2"],
                    "search_vs_best": search["ppl"]["wikitext2"] / best["ppl"]["wikitext2"],
                    "cost_ratio": search["quantize_seconds"] / median if median else None,
                    "fixed_pairs": len(fixed)})
    return out


def _table(header: dict, rows: list[dict]) -> str:
    lines = [f"_{header['model']}, calibration {header['calibration']}, evaluation {header['evaluation']} (GPTQ "
             f"protocol, token perplexity); search grid alpha {header['alpha']} x beta {header['beta']}, "
             f"{header.get('search', 'objective noa, holdout 0.25')}; CPU, {header['threads']} threads, torch {header['torch']}, {header['date']}; every row "
             f"computed in one process on fresh stores_", "",
             "| width | variant | WikiText-2 ppl | quantize s |", "| --- | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| W{r['bits']} | {r['label']} | {r['ppl']['wikitext2']:.3f} | {r['quantize_seconds']} |")
    lines += ["", "| width | search ppl | best fixed pair | its ppl | search / best | GPTQ ppl | search cost / median "
              "fixed pair |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for s in summary(rows):
        lines.append(f"| W{s['bits']} | {s['search_ppl']:.3f} | {s['best_fixed']} | {s['best_fixed_ppl']:.3f} | "
                     f"{s['search_vs_best']:.3f} | {s['gptq_ppl']:.3f} | {s['cost_ratio']:.2f}x |")
    return "\n".join(lines)


def _write(out: Path, header: dict, rows: list[dict]) -> None:
    """After every row, so a run stopped early keeps what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows, "summary": summary(rows)},
                                                   indent=1))
    out.with_suffix(".md").write_text(_table(header, rows) + "\n")
    for bits in sorted({r["bits"] for r in rows}):
        mine = [r for r in rows if r["bits"] == bits]
        search = next((r for r in mine if r["label"] == "loaq search"), None)
        fixed = [r for r in mine if r["pair"] is not None]
        if search and fixed:
            best = min(fixed, key=lambda r: r["ppl"]["wikitext2"])
            plot_strengths(search["layers"], str(out.parent / f"{out.name}_w{bits}.png"), title=f"SmolLM2 W{bits} search",
                           drift={"search": search["layers"], f"best fixed ({best['label']})": best["layers"]})


if __name__ == "__main__":
    main()
