"""Every stage's key: what a record is made of, in one place (the scheme itself is ``store.keys``).

A key is ``stage_key(stage, VERSION, **inputs)``: upstream keys and the configuration the stage
reads, never a run id, a path or a time. The records and their keys, from the model down::

    model           model(weights digest, config.json, tokenizer digest[, rotation])
    calibration     calibration(model, spec, data)
    embedding       embed(model, calibration, dtype)
    clean layer l   clean_layer(model, layer=l, prev=clean_{l-1} or embedding, dtype)
    quant layer l   quant_layer(prev=quant_{l-1} or embedding, layer=l, config_identity(layer l))
    layer search l  layer_search(prev=quant_{l-1} or embedding, layer=l, config without strengths, search)
    held-out draw   holdout(calibration, n) -> its embedding and clean layers as the calibration's
    held-out quant  holdout_quant(chain=quant_l, holdout=held-out embedding)
    layer weights   layer_weights(chain=quant_l)
    evaluation      perplexity / zero_shot(model, quantized=quant_last or None, settings, data, dtype)
    export          export(quantized=quant_last, format, dtype[, packer version])

Bump a version when its stage's code changes its output: exactly the records keyed on it (and
everything downstream) are recomputed.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Protocol

from loaq.configs.schema import SUBLAYERS, CalibrationConfig, EvaluationConfig, QuantizeConfig, RotationConfig
from loaq.data.sources import CalibrationSource, content_digest
from loaq.store.keys import stage_key

from .context import StageContext

MODEL_STAGE_VERSION = 1
STREAM_VERSION = 1  # calibration and embedding
# Version 2 of the clean layer records adds each sub-layer's output (``attn_out``, ``mlp_out``).
CLEAN_VERSION = 2
# Everything that determines a quantized layer's result (quant/ math and the engine): bump it when
# a change alters quantized weights, and exactly the quantized chain is recomputed while
# calibration, embeddings and the clean stream are reused.
ALGORITHM_VERSION = 2
EVAL_VERSION = 1
# Version 2: the candidates are scored on a separate held-out draw carried through every layer.
SEARCH_VERSION = 2
EXPORT_VERSION = 1


class Model(Protocol):
    """What a key reads of a model (``stages.model.ModelRef``): its content key."""

    key: str


def model_key(weights: str, config: dict, tokenizer: str, rotation: RotationConfig) -> str:
    """The model's identity from its content: weight and tokenizer digests and its config.json.
    The rotation enters the key only when there is one: unrotated models keep the keys they had."""
    extra = {"rotation": rotation} if rotation.kind != "none" else {}
    return stage_key("model", MODEL_STAGE_VERSION, weights=weights, config=config, tokenizer=tokenizer, **extra)


def data_identity(data_dir: str | None) -> str:
    """Local files are identified by their verified checksums (paths are not identity)."""
    return "hub" if data_dir is None else "local-sha256-verified"


def calibration_key(model: Model, cfg: CalibrationConfig, data_dir: str | None) -> str:
    # The sampling spec without where the data lies: a local source enters through its content's
    # digest, so moving it keeps the key and editing it changes it. c4 keeps the fields it always had.
    spec = cfg.model_dump(exclude={"source"})
    if cfg.source is not None:
        spec["source"] = cfg.source.model_dump(exclude={"path"})
    if cfg.dataset == "local":
        source = CalibrationSource(dataset=cfg.dataset, **cfg.source.model_dump())
        data = "sha256:" + content_digest(source)
    else:
        data = data_identity(data_dir)
    return stage_key("calibration", STREAM_VERSION, model=model.key, spec=spec, data=data)


def embed_key(ctx: StageContext, model: Model, calibration_key: str) -> str:
    return hidden_key(ctx, "embed", model=model.key, calibration=calibration_key)


def clean_key(ctx: StageContext, model: Model, index: int, input_key: str) -> str:
    return hidden_key(ctx, "clean_layer", model=model.key, layer=index, prev=input_key, version=CLEAN_VERSION)


def hidden_key(ctx: StageContext, stage: str, version: int = STREAM_VERSION, **inputs) -> str:
    # The dtype of the stored stream is part of its identity (bf16 on a GPU, fp32 on the CPU).
    return stage_key(stage, version, dtype=str(ctx.runtime.dtype), **inputs)


def config_identity(cfg: QuantizeConfig, layer: int | None = None) -> dict:
    """The fields that determine a layer's result: alpha/beta are dropped where the method ignores them,
    gptaq_alpha except for GPTAQ, clean_stream_reset unless the stream is actually reset, and grid_init
    and act_bits at their defaults (so adding these fields left the keys of the other methods and runs as
    they were).

    With ``layer``, the strengths are that layer's (``quantize.layers``): equal ones on both sub-layers
    are written as the config-wide fields are, so a layer set to the run's own values keeps its key;
    differing ones as ``sublayers``. Without it, the config-wide values."""
    identity = cfg.model_dump(exclude={"layers", "search"})
    strengths = cfg.layer_strengths(layer) if layer is not None else {name: cfg.alphas_beta() for name in SUBLAYERS}
    first, *rest = strengths.values()
    if all(s == first for s in rest):
        identity.update(zip(("alpha_in", "alpha_out", "beta"), first))
    else:
        for field in ("alpha_in", "alpha_out", "beta"):
            identity.pop(field)
        identity["sublayers"] = {name: list(s) for name, s in strengths.items()}
    if not (cfg.act_order and cfg.group_size):
        identity.pop("static_groups")
    if cfg.method != "gptaq":
        identity.pop("gptaq_alpha")
    identity.pop("clean_stream_reset")
    if cfg.grid_init == "minmax":
        identity.pop("grid_init")
    if cfg.act_bits is None:
        identity.pop("act_bits")
    if cfg.resets_clean_stream():
        identity["clean_stream_reset"] = True
    return identity


def chain_keys(root_key: str, cfg: QuantizeConfig, num_layers: int) -> list[str]:
    """Keys of the quantized stream after each layer: key_l = hash(key_{l-1}, config_l, version), rooted
    at the embedding. Two variants that agree on the configs of layers 0..k share exactly those keys."""
    keys, prev = [], root_key
    for index in range(num_layers):
        prev = layer_key(prev, cfg, index)
        keys.append(prev)
    return keys


def layer_key(prev: str, cfg: QuantizeConfig, index: int) -> str:
    """The quantized stream after layer ``index``: its input's key and the layer's own config."""
    return stage_key("quant_layer", ALGORITHM_VERSION, prev=prev, layer=index, config=config_identity(cfg, index))


def pending_layer_key(prev: str, cfg: QuantizeConfig, index: int) -> str:
    """Stands for the quantized stream after a layer whose search has not run (its strengths, hence
    its key, are not known yet): a key no record is ever written under."""
    return stage_key("quant_layer_pending", ALGORITHM_VERSION, prev=prev, layer=index,
                     config=config_identity(cfg), search=cfg.search.model_dump())


def chain_id(root_key: str, cfg: QuantizeConfig) -> str:
    """One id for all layers of a variant (used by retention, never for reuse)."""
    extra = {}
    if cfg.layers:
        extra["layers"] = {str(i): s.model_dump(exclude_none=True) for i, s in cfg.layers.items()}
    if cfg.search:
        extra["search"] = cfg.search.model_dump()
    return stage_key("chain", ALGORITHM_VERSION, root=root_key, config=config_identity(cfg), **extra)


#: Settings that decide which layers are searched, not what a layer's search computes.
_NOT_IN_SEARCH_KEY = {"last"}


def search_key(prev: str, cfg: QuantizeConfig, index: int) -> str:
    """A layer's search (the choice among ``quantize.search``'s candidates): its quantized input, the
    layer's config apart from the strengths searched, and the search's settings."""
    base = {k: v for k, v in config_identity(cfg).items() if k not in ("alpha_in", "alpha_out", "beta")}
    return stage_key("layer_search", SEARCH_VERSION, prev=prev, layer=index, config=base,
                     search=cfg.search.model_dump(exclude=_NOT_IN_SEARCH_KEY, exclude_none=True))


def holdout_key(calibration_key: str, n_windows: int) -> str:
    """The search's held-out windows: the next ``n_windows`` of the calibration's own draw."""
    return stage_key("holdout", STREAM_VERSION, calibration=calibration_key, n=n_windows)


def holdout_state_key(chain_key: str, holdout_embedding_key: str) -> str:
    """The quantized stream on the held-out windows after the layer whose chain key is ``chain_key``."""
    return stage_key("holdout_quant", SEARCH_VERSION, chain=chain_key, holdout=holdout_embedding_key)


def weights_key(chain_key: str) -> str:
    return stage_key("layer_weights", ALGORITHM_VERSION, chain=chain_key)


def perplexity_key(ctx: StageContext, model: Model, chain: list[str] | None, dataset: str,
                   cfg: EvaluationConfig, data_dir: str | None) -> str:
    return stage_key("perplexity", EVAL_VERSION, model=model.key, quantized=chain[-1] if chain else None,
                     dataset=dataset, seqlen=cfg.seqlen, max_windows=cfg.max_windows, data=data_identity(data_dir),
                     dtype=str(ctx.runtime.dtype))


def zero_shot_key(ctx: StageContext, model: Model, chain: list[str] | None, cfg: EvaluationConfig,
                  data_dir: str | None) -> str:
    return stage_key("zero_shot", EVAL_VERSION, model=model.key, quantized=chain[-1] if chain else None,
                     tasks=sorted(cfg.zero_shot_tasks), limit=cfg.zero_shot_limit, data=data_identity(data_dir),
                     dtype=str(ctx.runtime.dtype))


def export_key(quantized: str, fmt: str, dtype: str) -> str:
    inputs = {"quantized": quantized, "format": fmt, "dtype": dtype}
    if fmt == "compressed_tensors":  # the packed layout is the library's: its version is part of the output
        inputs["packer"] = version("compressed-tensors")
    if fmt == "gguf":  # the file layout and metadata are the gguf package's
        inputs["packer"] = version("gguf")
    return stage_key("export", EXPORT_VERSION, **inputs)
