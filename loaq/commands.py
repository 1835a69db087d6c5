"""What each ``loaq`` sub-command does, on top of the flows."""

from __future__ import annotations

from loaq.configs.schema import RunConfig


def _print_result(config: RunConfig, result) -> None:
    for dataset, ppl in result.perplexity.items():
        how = result.protocol[dataset]
        print(f"{how['label']} perplexity ({how['windows']} x {how['seqlen']} tokens): FP {ppl['fp']:.3f}   "
              f"{config.quantize.method} {config.quantize.scheme}{' search' if config.quantize.search else ''} "
              f"{ppl['quantized']:.3f}")
    for which, accuracies in result.zero_shot.items():
        print(f"zero-shot {which}: " + ", ".join(f"{t} {acc:.4f}" for t, acc in accuracies.items()))
    print(f"report: {result.report}/report.md")
    for fmt, path in result.exports.items():
        print(f"export {fmt}: {path}")
    print(f"run id: {result.run_id}")


def run(config: RunConfig, args) -> int:
    from loaq.api import run as api_run

    _print_result(config, api_run(config))
    return 0


def _sweep_spec(args):
    from loaq.flows.sweep import SweepSpec

    return SweepSpec(methods=tuple(args.methods or ()), bits=tuple(args.bits or ()), alphas=tuple(args.alpha or ()),
                     betas=tuple(args.beta or ()))


def sweep(config: RunConfig, args) -> int:
    from loaq.flows.sweep import sweep_flow

    results, report_dir = sweep_flow(config, _sweep_spec(args))
    datasets = config.evaluation.datasets
    width = max(len(v.name) for v, _ in results)
    from loaq.flows.quantize import open_context

    store = open_context(config).store
    print(f"{'variant':<{width}}  " + "  ".join(f"{d:>10}" for d in datasets))
    for variant, result in results:
        ppl = {d: store.open(k["quantized"]).attrs["ppl"] for d, k in result["evals"].items()}
        print(f"{variant.name:<{width}}  " + "  ".join(f"{ppl[d]:10.3f}" for d in datasets))
    print(f"report: {report_dir}/report.md")
    return 0


def plan(config: RunConfig, args) -> int:
    from loaq.flows.plan_report import plan_table

    for line in plan_table(config)[1]:
        print(line)
    return 0


def status(config: RunConfig, args) -> int:
    from loaq.flows.status import run_status

    for line in run_status(config):
        print(line)
    return 0


def gc(config: RunConfig, args) -> int:
    from loaq.flows.gc import gc_flow

    print(f"freed {gc_flow(config, drop_stats=args.drop_stats) / 2**20:.1f} MiB")
    return 0


def report(config: RunConfig, args) -> int:
    spec = _sweep_spec(args)
    if not spec.is_empty():
        from loaq.flows.sweep import sweep_report, variant_configs

        print(f"report: {sweep_report(config, variant_configs(config, spec))}/report.md")
        return 0
    from loaq.flows.report import report_flow

    print(f"report: {report_flow(config)}/report.md")
    return 0


def export(config: RunConfig, args) -> int:
    from loaq.flows.export import export_flow

    result = export_flow(config, args.formats)
    for fmt, path in result["exports"].items():
        a = result["attrs"][fmt]
        print(f"export {fmt} ({a['dtype']}, W{a['bits']}): {path}   quantized linears "
              f"{a['linear_bytes'] / 2**20:.1f} MiB = {a['linear_ratio_fp16']:.4f} x their fp16 bytes")
    print(f"run id: {result['run_id']}")
    return 0


def zoo(config, args) -> int:
    """The zoo flow in this process; the table, then (exit 1) one line per failed member."""
    import sys

    from loaq.flows.zoo import ZooFailed, zoo_flow

    try:
        result = zoo_flow(args.config or "zoo", args.overrides, args.deployment)
        report, failures = result["report"], []
    except ZooFailed as e:
        report, failures = e.report, e.failures
    with open(f"{report}/report.md") as f:
        print("\n".join(line for line in f.read().splitlines() if line.startswith("|")))
    print(f"report: {report}/report.md")
    if failures:
        print(f"loaq: zoo: {len(failures)} member(s) failed:", file=sys.stderr)
        for name, reason in failures:
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    return 0


__all__ = ["run", "sweep", "plan", "status", "gc", "report", "export", "zoo"]
