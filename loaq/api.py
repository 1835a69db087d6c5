"""The Python entry point: ``loaq.quantize``, ``loaq.load_config``, ``loaq.run``, ``loaq.export``.

The same flows as the ``loaq`` command, on the same store: a run from Python and ``loaq run`` on
the same config share every record, so whichever comes second computes nothing. A mistake in the
config or the data raises an exception whose message is the one line the command prints for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loaq.configs.load import ConfigError, apply_override, describe, preset_path, read_yaml
from loaq.configs.schema import QuantizeConfig, RunConfig
from loaq.termination import (RESUME_HINT, TERMINATED_STATUS, Terminated, ignore_sigterm_while_exiting,
                              sigterm_unwinds)

#: Sections of a run config that ``quantize``/``load_config`` accept as keyword arguments.
SECTIONS = ("name", "model", "data_dir", "calibration", "quantize", "evaluation", "runtime", "store", "export",
            "report_dir")


@dataclass(frozen=True)
class Result:
    """What a run produced.

    Attributes:
        config: the validated run config.
        run_id: this run's id in the store's event log.
        store: the store's URL; ``weights`` are the record keys of the quantized layers in it.
        perplexity: ``{dataset: {"fp": ppl, "quantized": ppl}}``.
        protocol: ``{dataset: {"label": ..., "windows": n, "seqlen": tokens}}``, how each was measured.
        zero_shot: ``{"fp" | "quantized": {task: accuracy}}`` when tasks are configured.
        report: the folder holding ``report.md`` and ``report.json``.
        exports: ``{format: folder}`` of the exports written (``export.formats``).
    """

    config: RunConfig
    run_id: str
    store: str
    weights: list[str]
    perplexity: dict[str, dict[str, float]]
    report: Path
    exports: dict[str, Path] = field(default_factory=dict)
    zero_shot: dict[str, dict[str, float]] = field(default_factory=dict)
    protocol: dict[str, dict[str, Any]] = field(default_factory=dict)


def _merge(base: dict, updates: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_config(config: str | os.PathLike | Mapping | RunConfig | None = None, overrides: Sequence[str] = (),
                **sections: Any) -> RunConfig:
    """A validated run config.

    Args:
        config: a YAML file, a preset name (``"default"``, ``"paper"``), a mapping, or a ``RunConfig``;
            ``None`` is the ``default`` preset.
        overrides: ``"a.b=value"`` strings, as ``loaq run --set`` takes them.
        **sections: sections to merge in, e.g. ``quantize={"bits": 4}``, ``store={"url": "s3://b/x"}``.

    Raises:
        ConfigError: one line naming the field, the value and what is allowed.
    """
    from pydantic import ValidationError

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"load_config: {', '.join(unknown)} is not a config section (sections: {', '.join(SECTIONS)})")
    if isinstance(config, RunConfig):
        data = config.model_dump()
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        data = read_yaml(preset_path(None if config is None else os.fspath(config)))
    data = _merge(data, sections)
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e)) from None


def _result(config: RunConfig, out: dict) -> Result:
    from loaq.flows.quantize import open_context

    store = open_context(config, out["run_id"]).store
    ppl = {d: {which: float(store.open(k).attrs["ppl"]) for which, k in keys.items()} for d, keys in out["evals"].items()}
    protocol = {}
    for d, keys in out["evals"].items():
        attrs = store.open(keys["fp"]).attrs
        protocol[d] = {"label": attrs["label"], "windows": int(attrs["windows"]), "seqlen": int(attrs["seqlen"])}
    zero_shot = {}
    for which, key in out.get("zero_shot", {}).items():
        res = store.open(key).attrs["zero_shot"]
        zero_shot[which] = {t: float(r["acc"]) for t, r in res.items() if t != "skipped"}
    return Result(config, out["run_id"], config.store.url, list(out["weights"]), ppl, Path(out["report"]),
                  {fmt: Path(p) for fmt, p in out.get("exports", {}).items()}, zero_shot, protocol)


@contextmanager
def _ends_on_sigterm() -> Iterator[None]:
    """Where the caller left SIGTERM's default in place, a SIGTERM unwinds the run (records being
    written stay incomplete, the Prefect server this process started is stopped at exit) and then
    ends the process with the status the default would give; a caller's own handler is left alone."""
    terminated = False
    with sigterm_unwinds(only_over_default=True) as active:
        try:
            yield
        except Terminated:
            if not active:
                raise
            terminated = True
    if terminated:  # the caller's handler is back now; the exit itself ignores further SIGTERMs
        print(f"loaq: terminated; {RESUME_HINT}", file=sys.stderr)
        ignore_sigterm_while_exiting()
        raise SystemExit(TERMINATED_STATUS)


def run(config: str | os.PathLike | Mapping | RunConfig | None = None, **sections: Any) -> Result:
    """Quantize, evaluate, report (and export, if ``export.formats`` is set): ``loaq run`` from Python.

    ``config`` and ``sections`` are as in :func:`load_config`. Finished stages are reused from the
    store and a killed run resumes, exactly as from the command line. A SIGTERM, where the caller has
    no handler of its own, ends the process with status 143 once the run has unwound.
    """
    from loaq.flows.quantize import quantize_flow
    from loaq.prefect_startup import ensure_prefect_api

    config = load_config(config, **sections)
    with _ends_on_sigterm():
        ensure_prefect_api()  # a server that cannot start is one error naming the fix, not Prefect's traceback
        return _result(config, quantize_flow(config))


def quantize(model: str, method: str = "loaq", bits: int = 4, *, config: str | os.PathLike | Mapping | RunConfig
             | None = None, **options: Any) -> Result:
    """Quantize ``model`` with ``method`` at ``bits`` and evaluate it.

    Args:
        model: ``embedded:smollm2``, a Hugging Face checkpoint folder, a ``.gguf`` file or a hub id.
        method: ``rtn``, ``gptq``, ``gptaq``, ``qronos``, ``lloa``, ``lloa_soa`` or ``loaq``.
        bits: weight bits (2-8).
        config: the base config (preset, file, mapping); default: the ``default`` preset.
        **options: ``quantize`` fields (``group_size=32``, ``symmetric=True``, ``alpha_in=0.3``, ...)
            or whole sections (``calibration={"n_samples": 128}``, ``export={"formats": ["gguf"]}``).

    Returns:
        the :class:`Result` of the run.
    """
    fields = set(QuantizeConfig.model_fields)
    quant = {k: options.pop(k) for k in list(options) if k in fields}
    unknown = sorted(set(options) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"quantize: {', '.join(unknown)} is neither a quantize field nor a config section "
                          f"(quantize fields: {', '.join(sorted(fields))})")
    base = load_config(config)
    name = options.pop("name", None) or f"{base.name}-{method}-w{bits}"
    return run(base, name=name, model=_merge(options.pop("model", {}), {"source": model}),
               quantize={**quant, "method": method, "bits": bits}, **options)


def export(config: str | os.PathLike | Mapping | RunConfig | None = None, formats: Sequence[str] = (),
           **sections: Any) -> dict[str, Path]:
    """Export an already-quantized run (``loaq export``): ``{format: folder}``; computes nothing else."""
    from loaq.flows.export import export_flow
    from loaq.prefect_startup import ensure_prefect_api

    config = load_config(config, **sections)
    with _ends_on_sigterm():
        ensure_prefect_api()
        return {fmt: Path(p) for fmt, p in export_flow(config, tuple(formats))["exports"].items()}
