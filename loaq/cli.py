"""The ``loaq`` command: run, sweep, status, gc, report, export.

    loaq run [CONFIG] [--set a.b=value ...]   quantize + evaluate + report (resumes / reuses)
    loaq sweep CONFIG [--methods gptq loaq] [--bits 3 4] [--alpha 0.3 0.5] [--beta 0.1 0.25]
                                              variants sharing every upstream stage, sweep report
    loaq plan [CONFIG]                        stages, bytes written and kept, memory peaks, before any work
    loaq status [CONFIG]                      per-stage, per-layer state of a run, with sizes
    loaq gc [CONFIG]                          apply the retention policy to the store
    loaq report [CONFIG] [sweep options]      rebuild report.md/json/plots from the store alone
    loaq export [CONFIG] [--format F ...]     write the quantized run as checkpoints (HF, or GGUF)
    loaq zoo [ZOO] [--deployment NAME]        models x settings as one Prefect flow, then the zoo report

CONFIG is a YAML file or a preset name from the package's configs/ (default, paper); ZOO a zoo
config file or zoo preset (zoo).
"""

from __future__ import annotations

import argparse
import logging
import sys

from loaq.termination import (RESUME_HINT, TERMINATED_STATUS, Terminated, ignore_sigterm_while_exiting,
                              sigterm_unwinds)


class _NoFailureTracebacks(logging.Filter):
    """Prefect logs every failed run with its traceback, and every run a signal stopped as crashed;
    the CLI reports a failure itself (one line for a user mistake, the traceback for a bug) and a
    stop in one line, so those records would only repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.levelno >= logging.ERROR and (record.exc_info or "Traceback" in message
                                                         or "Finished in state Failed" in message
                                                         or "aborted by an interrupt signal" in message
                                                         or "aborted by a termination signal" in message))


def _quiet_prefect() -> None:
    # Prefect runs in its local ephemeral mode unless PREFECT_API_URL points at a server.
    from loaq.prefect_startup import configure_environment

    configure_environment()
    import prefect  # noqa: F401 - configures Prefect's loggers, which the filter then attaches to

    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logging.getLogger(name).addFilter(_NoFailureTracebacks())


#: Commands that run Prefect flows (status, gc and report read the store only).
_RUNS_FLOWS = ("run", "sweep", "export", "zoo")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loaq", description="LoaQ quantization as a resumable, cached pipeline.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name, help_):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", nargs="?", default=None, help="YAML file or preset name (default: default)")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a config field, e.g. --set quantize.bits=4 (repeatable)")
        return s

    with_config("run", "quantize, evaluate and report (idempotent: resumes or reuses)")
    def sweep_axes(s):
        s.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="quantize.method values")
        s.add_argument("--bits", type=int, nargs="+", default=None, help="quantize.bits values")
        s.add_argument("--alpha", type=float, nargs="+", default=None, help="values for alpha_in and alpha_out")
        s.add_argument("--beta", type=float, nargs="+", default=None, help="values for beta")

    sweep_axes(with_config("sweep", "run variants (methods x bits x alpha x beta) that share every upstream "
                                    "stage, then write the sweep report"))
    with_config("plan", "print the run's stages with their bytes and memory peaks before any work")
    with_config("status", "show per-stage, per-layer state of a run, with sizes")
    gc = with_config("gc", "apply the retention policy to the store")
    gc.add_argument("--drop-stats", action="store_true", help="also drop Hessian/statistics records")
    sweep_axes(with_config("report", "rebuild the run's report (or, given sweep options, the sweep's) from the "
                                     "store alone"))
    export = with_config("export", "write an already-quantized run as Hugging Face checkpoints")
    export.add_argument("--format", dest="formats", action="append", default=[],
                        choices=["fake_quant", "compressed_tensors", "gguf"],
                        help="checkpoint format (repeatable; default: export.formats of the config, else "
                             "fake_quant and compressed_tensors)")
    zoo = sub.add_parser("zoo", help="quantize a zoo of models x settings on one store as one Prefect flow, "
                                     "then write the zoo report")
    zoo.add_argument("config", nargs="?", default=None, help="zoo YAML file or zoo preset (default: zoo)")
    zoo.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a zoo config field, e.g. --set concurrency=1 (repeatable)")
    zoo.add_argument("--deployment", default=None, metavar="FLOW/DEPLOYMENT",
                     help="run each model's members as a flow run of this deployment (e.g. loaq-zoo-model/zoo-model) "
                          "on its work pool, instead of in this process")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with sigterm_unwinds():
        status = _command(args)
    if status == TERMINATED_STATUS:
        ignore_sigterm_while_exiting()
    return status


def _command(args: argparse.Namespace) -> int:
    _quiet_prefect()
    from loaq.errors import describe

    try:
        from loaq.configs.load import load_config
        from loaq.configs.zoo import load_zoo

        # Checked here, before any flow starts, so a bad field is one line and nothing runs.
        config = (load_zoo if args.command == "zoo" else load_config)(args.config, args.overrides)
        from loaq import commands
        from loaq.prefect_startup import ensure_prefect_api

        if args.command in _RUNS_FLOWS:
            ensure_prefect_api()  # before any flow, so a server that cannot start is one line
        return int(getattr(commands, args.command)(config, args) or 0)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"loaq: {'terminated' if terminated else 'interrupted'}; {RESUME_HINT}", file=sys.stderr)
        return TERMINATED_STATUS if terminated else 130
    except Exception as e:  # noqa: BLE001 - user mistakes become one line, bugs keep their traceback
        line = describe(e)
        if line is None:
            raise
        print(f"loaq: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
