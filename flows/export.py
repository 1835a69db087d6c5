"""Export: the quantized model as Hugging Face checkpoints, after ``loaq run`` or with ``loaq export``.

``export_models`` is the step the pipeline runs after its report when ``export.formats`` is set;
``export_flow`` runs it alone for a run that is already quantized (nothing else is computed).
Each checkpoint lives in ``export.dir`` (default: ``exports/`` next to the store), named by its
export key; ``runs/<name>/export-<format>`` points at it.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from loaq.configs.load import ConfigError
from loaq.configs.schema import RunConfig
from loaq.stages.context import StageContext
from loaq.models.sources import source_gguf
from loaq.stages.export import (DEFAULT_FORMATS, check_exportable, export_dtype, export_path, export_stage,
                                is_exported)
from loaq.stages.keys import export_key
from loaq.stages.model import ModelRef


def export_root(config: RunConfig) -> str:
    if config.export.dir is not None:
        return config.export.dir
    url = config.store.url
    return os.path.join(os.path.dirname(os.path.abspath(url)) if "://" not in url else ".loaq", "exports")


def check_formats(config: RunConfig, model: ModelRef, formats) -> None:
    model_config = model.open().config if formats else None
    for fmt in formats:
        check_exportable(fmt, config.quantize, model_config, rotated=model.rotated)


def link(config: RunConfig, fmt: str, path: Path) -> None:
    """``runs/<name>/export-<format>``: a symbolic link to the checkpoint (a text file where links fail)."""
    out_dir = Path(config.report_dir) / config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    pointer = out_dir / f"export-{fmt}"
    if pointer.is_symlink() or pointer.is_file():
        pointer.unlink()
    try:
        pointer.symlink_to(path, target_is_directory=True)
    except OSError:
        pointer.write_text(f"{path}\n")


def export_models(ctx: StageContext, config: RunConfig, model: ModelRef, chain: list[str], formats) -> dict[str, str]:
    """Export the quantized model ``chain`` in each of ``formats``; returns {format: checkpoint folder}."""
    root = export_root(config)
    out = {}
    for fmt in formats:
        dtype = export_dtype(model, config.export.dtype)
        key = export_key(chain[-1], fmt, dtype)
        path = export_path(root, fmt, key)
        if is_exported(ctx, key, path):
            ctx.store.log_event(ctx.run_id, "export", key, "reused")
        else:
            export_stage(ctx, model, chain, fmt, dtype, root, source_gguf=source_gguf(config.model.source))
        link(config, fmt, path)
        out[fmt] = str(path)
    return out


@flow(name="loaq-export", log_prints=True)
def export_flow(config: RunConfig, formats=None, run_id: str | None = None) -> dict:
    """Export an already-quantized run from the store; fails in one line if it is not quantized yet."""
    from loaq.flows.plan import plan
    from loaq.flows.quantize import open_context

    formats = tuple(dict.fromkeys(formats or config.export.formats or DEFAULT_FORMATS))
    ctx = open_context(config, run_id)
    p = plan(ctx, config)
    check_formats(config, p.model, formats)
    missing = [k for k in p.weights if not ctx.store.is_complete(k)]
    if missing:
        raise ConfigError(f"the store has no quantized model for config {config.name!r} ({len(missing)} of "
                          f"{len(p.weights)} layers missing); run `loaq run` with the same config first")
    with ctx.store.lock("run", timeout=0.0):
        exports = export_models(ctx, config, p.model, p.chain, formats)
    return {"run_id": ctx.run_id, "exports": exports,
            "attrs": {fmt: ctx.store.open(export_key(p.chain[-1], fmt, export_dtype(p.model, config.export.dtype))).attrs
                      for fmt in formats}}
