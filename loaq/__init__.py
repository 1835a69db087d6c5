"""loaq: Layer-wise Output Approximation Quantization as a resumable, cached pipeline.

Python API::

    import loaq
    result = loaq.quantize("embedded:smollm2", method="loaq", bits=4, group_size=32)
    result.perplexity, result.report, result.exports
    config = loaq.load_config("default", quantize={"bits": 3}); loaq.run(config)

Layout (each folder is imported as ``loaq.<folder>``):

    loaq/        the Python API (``loaq.api``), the command line (``loaq``) and the package root
    flows/       Prefect flows: the pipeline, read top to bottom like Algorithm 1
    stages/      Prefect tasks: one stage each, keyed by their inputs, reading/writing the store
    store/       the content-addressed Zarr store: keys, records, completion marks, locks
    configs/     pydantic config models and the YAML presets
    engine/      the two-stream, one-layer-at-a-time quantization engine
    models/      model adapters (as data) and layer-by-layer checkpoint streaming
    quant/       the pure math: quantizer, RTN, GPTQ, streaming statistics, LoaQ targets
    data/        calibration sampling and evaluation text (local files or the hub)
    evaluation/  perplexity and zero-shot accuracy

Imports flow one way: loaq (CLI) -> flows -> stages -> engine/evaluation -> models/quant/store.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Result", "export", "load_config", "quantize", "run"]

if TYPE_CHECKING:
    from loaq.api import Result, export, load_config, quantize, run


def __getattr__(name: str):
    # The Python API (loaq/api.py), imported on first use so that ``import loaq.store`` stays light.
    if name in __all__:
        from loaq import api

        return getattr(api, name)
    raise AttributeError(f"module 'loaq' has no attribute {name!r}")
