"""loaq: Layer-wise Output Approximation Quantization as a resumable, cached pipeline.

Layout (each folder is imported as ``loaq.<folder>``):

    loaq/        the command line (``loaq``) and the package root
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

__version__ = "0.1.0"
