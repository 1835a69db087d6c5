"""What each stage of a run costs, from the model's shapes alone: bytes written, host and device peaks.

Pure arithmetic over a :class:`Shape` (read from a ``config.json``; no weights needed), the
calibration size, the runtime dtype and the quantization settings. The plan (``flows.plan``)
attaches these figures to its stages. Bytes are the records' apparent sizes: raw array bytes (an
upper bound where the store compresses: bf16 hidden states shrink to about 78% with zstd-1) plus
the Zarr metadata of each array and slice. Memory is the largest set of tensors a stage holds at
once, plus the process's own footprint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loaq.configs.schema import SearchConfig
from loaq.quant.packing import packed_nbytes

# Metadata of one record (group zarr.json with its manifest and completion mark), one array
# (its zarr.json and manifest entry), and one written slice (manifest entry and chunk checksum).
RECORD_META = 450
ARRAY_META = 760
SLICE_META = 95
# Stored/raw bytes of packed codes under the store's zstd-1 (GPTQ W4 codes of Gaussian weights
# measured 0.79-0.82: the grid's middle levels are the common ones).
CODES_STORED = 0.8
# One event-log line per stage decision.
EVENT_BYTES = 330
# The Python process with torch, transformers, Prefect and Zarr imported, before any tensor.
PROCESS_BASE = 600 * 2**20
# Tokens of each evaluation set when all windows are used (GPTQ protocol; C4 takes 256 windows).
DATASET_TOKENS = {"wikitext2": 300_000, "c4": 256 * 2048}
# Host bytes a layer may use to cache W_out's inputs (``engine.layer.LayerQuantizer.cache_bytes``).
CACHE_BYTES = 8 << 30

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """A decoder-only LLaMA-family model as the planner needs it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    checkpoint_bytes: int  # bytes per weight in the checkpoint (its torch_dtype)

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(hidden=hidden, intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
                   heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   checkpoint_bytes=DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), 4))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear of one decoder layer."""
        d, f, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}

    def layer_params(self) -> int:
        return sum(o * i for o, i in self.linears().values()) + 2 * self.hidden

    def weights_on_disk(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return (self.layers * self.layer_params() + embed + self.hidden) * self.checkpoint_bytes


@dataclass(frozen=True)
class Cost:
    written: int = 0  # bytes the stage writes to the store
    host: int = 0  # peak host bytes while it runs (process footprint included)
    device: int = 0  # peak accelerator bytes (0 on a CPU run, where the host holds everything)

    def with_written(self, written: int) -> "Cost":
        return Cost(written, self.host, self.device)


@dataclass(frozen=True)
class Workload:
    """The sizes a run's stages depend on, besides the model."""

    samples: int
    seqlen: int
    dtype_bytes: int  # runtime dtype of forwards and stored streams
    micro_batch: int
    on_device: bool  # a GPU run: layer work on the device, the host holds streams and the process
    bits: int
    group_size: int | None
    method: str

    @property
    def tokens(self) -> int:
        return self.samples * self.seqlen


def array_bytes(shape: tuple[int, ...], itemsize: int, slices: int = 1) -> int:
    return math.prod(shape) * itemsize + ARRAY_META + slices * SLICE_META


def hidden_record(shape: Shape, w: Workload, arrays: int) -> int:
    """A stream record: ``arrays`` arrays of (samples, seqlen, hidden), written per micro-batch, in
    chunks of ``micro_batch`` samples (the last chunk is stored whole, however few samples it holds)."""
    slices = math.ceil(w.samples / w.micro_batch)
    return RECORD_META + 200 + arrays * array_bytes((slices * w.micro_batch, w.seqlen, shape.hidden), w.dtype_bytes,
                                                    slices)


def weights_record(shape: Shape, w: Workload) -> int:
    """Packed codes, float32 scales and zeros per row (and group), int32 g_idx per input column."""
    total = RECORD_META + 1500  # attrs: config, solver, divergence, shapes
    for out_f, in_f in shape.linears().values():
        if w.bits >= 16:
            total += array_bytes((out_f, in_f), 4)
            continue
        groups = math.ceil(in_f / w.group_size) if w.group_size else 1
        codes = int(packed_nbytes(out_f * in_f, w.bits) * CODES_STORED)
        total += (array_bytes((codes,), 1) + 2 * array_bytes((out_f, groups), 4)
                  + array_bytes((in_f,), 4))
    return total


def _split(host: int, device: int, w: Workload) -> Cost:
    """Layer work on the device when there is one; on a CPU the host holds both."""
    if w.on_device:
        return Cost(0, PROCESS_BASE + host, device)
    return Cost(0, PROCESS_BASE + host + device, 0)


def _activations(shape: Shape, w: Workload, seqlen: int) -> int:
    """One micro-batch through one decoder layer: residual, MLP intermediates, attention scores."""
    t = w.micro_batch * seqlen
    per_token = 6 * shape.hidden + 3 * shape.intermediate + 2 * shape.heads * shape.head_dim
    return (t * per_token + w.micro_batch * shape.heads * seqlen * seqlen) * w.dtype_bytes


def _checkpoint_layer(shape: Shape) -> int:
    """One layer's tensors as read from the checkpoint (host)."""
    return shape.layer_params() * shape.checkpoint_bytes


def _layer_modules(shape: Shape, w: Workload, copies: int) -> int:
    """``copies`` modules of one layer built in the runtime dtype (device)."""
    return shape.layer_params() * copies * w.dtype_bytes


def calibration_cost(w: Workload) -> Cost:
    return _split(w.tokens * 8 * 2, 0, w).with_written(RECORD_META + 300 + array_bytes((w.samples, w.seqlen), 8))


def embed_cost(shape: Shape, w: Workload) -> Cost:
    stream = w.tokens * shape.hidden * w.dtype_bytes
    table = shape.vocab * shape.hidden * (shape.checkpoint_bytes + w.dtype_bytes)
    return _split(2 * stream + table, 0, w).with_written(hidden_record(shape, w, 1))


def clean_layer_cost(shape: Shape, w: Workload) -> Cost:
    return _split(_checkpoint_layer(shape), _layer_modules(shape, w, 1) + _activations(shape, w, w.seqlen),
                  w).with_written(
        hidden_record(shape, w, 3))


def quantize_layer_cost(shape: Shape, w: Workload) -> Cost:
    """The largest part of a layer's solve: its statistics, the solver's work arrays, the cached
    inputs of W_out, and the layer itself (twice for GPTAQ/Qronos, which rerun the clean layer)."""
    lin = shape.linears()
    d, f = shape.hidden, shape.intermediate
    parts = {  # (n_in, rows of W, n_out of W_out for the projected statistics)
        "attn.w_in": (d, lin["q_proj"][0] + 2 * lin["k_proj"][0], 0),
        "attn.w_out": (lin["o_proj"][1], d, d),
        "mlp.w_in": (d, 2 * f, 0),
        "mlp.w_out": (f, d, d),
    }
    projected = w.method in ("lloa", "lloa_soa", "loaq")  # W_out: H and R = X^T D (out); W_in: H and C
    mismatch = projected or w.method in ("gptaq", "qronos")  # H and C = X^T (X - X_hat)
    needs = []  # (statistics and solver arrays, cached W_out inputs on the host) of each part
    for n_in, rows, n_out in parts.values():
        if n_out and projected:
            stats = n_in * n_in * 8 + n_in * n_out * 8
        else:
            stats = n_in * n_in * 8 * (2 if mismatch else 1)
        # Measured for GPTQ on a 5632-column W: about three float64 (n, n) work arrays besides H itself.
        solve = n_in * n_in * 24 + rows * n_in * (4 * 3 + 1)  # H^-1 and its factor, W / target / Q, codes
        needs.append((stats + solve, min(w.tokens * n_in * w.dtype_bytes, CACHE_BYTES) if n_out else 0))
    if w.on_device:
        device_peak, cache_peak = max(a for a, _ in needs), max(c for _, c in needs)
    else:
        device_peak, cache_peak = max(a + c for a, c in needs), 0
    copies = 2 if w.method in ("gptaq", "qronos") else 1
    device = _layer_modules(shape, w, copies) + device_peak + 2 * _activations(shape, w, w.seqlen)
    return _split(_checkpoint_layer(shape) + cache_peak, device, w).with_written(
        weights_record(shape, w) + hidden_record(shape, w, 1))


#: A layer search's record: attributes only (the choice and every candidate's score).
SEARCH_RECORD = RECORD_META + 2048


def search_layer_cost(shape: Shape, w: Workload, search: SearchConfig | None = None, behind: int = 1) -> Cost:
    """A quantize stage's peak and, beside it, the widest input's untouched H (each candidate's solve
    damps a copy) and the SOA part of W_out's right-hand side. The ``kl`` objective also holds the
    ``behind`` layers from this one on and the head in full precision, and two windows' log-probabilities."""
    base = quantize_layer_cost(shape, w)
    extra = shape.intermediate * shape.intermediate * 8 + shape.intermediate * shape.hidden * 8
    host = 0
    if search is not None and search.objective == "kl":
        extra += (_layer_modules(shape, w, behind) + shape.vocab * shape.hidden * w.dtype_bytes
                  + 2 * w.seqlen * shape.vocab * 4)
        host = shape.vocab * shape.hidden * shape.checkpoint_bytes
    if w.on_device:
        return Cost(SEARCH_RECORD, base.host + host, base.device + extra)
    return Cost(SEARCH_RECORD, base.host + host + extra, 0)


def perplexity_cost(shape: Shape, w: Workload, windows: int, seqlen: int) -> Cost:
    stream = 2 * windows * seqlen * shape.hidden * w.dtype_bytes  # every window's hidden states, in and out
    head = shape.vocab * shape.hidden * (shape.checkpoint_bytes + w.dtype_bytes) + 3 * seqlen * shape.vocab * 4
    device = max(_layer_modules(shape, w, 1) + _activations(shape, w, seqlen), head)
    return _split(stream + _checkpoint_layer(shape), device, w).with_written(RECORD_META + 400 + array_bytes((windows,), 8))


def zero_shot_cost(shape: Shape, w: Workload) -> Cost:
    """lm-eval scores a whole model: every layer at once."""
    whole = (shape.layers * shape.layer_params() + shape.vocab * shape.hidden * 2) * w.dtype_bytes
    return _split(0, whole, w).with_written(RECORD_META + 2000 + array_bytes((), 8))


def eval_windows(dataset: str, seqlen: int, max_windows: int | None) -> int:
    windows = DATASET_TOKENS[dataset] // seqlen
    return windows if max_windows is None else min(windows, max_windows)
