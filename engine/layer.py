"""Quantize one decoder layer with two streams (paper, Algorithm 1, lines 3-21).

What runs when (``LayerQuantizer.run``; one decoder layer, its two sub-layers in order):

    for each sub-layer h + phi(Norm(h) W_in) W_out  (attention: W_in = [q;k;v], W_out = o;
                                                     MLP: W_in = [gate;up], W_out = down)
        1. W_in statistics    H = X̂ᵀX̂, C = X̂ᵀ(X − X̂) of X = Norm(h)     ``w_in_stats``
        2. solve W_in          R = α·C·Wᵀ (LLOA); SOLVERS[method]           ``_solve``
        3. W_out statistics   H and R (LoaQ family) or H, C (GPTAQ/Qronos)  ``_w_out_stats``
        4. solve W_out         SOLVERS[method]                              ``_solve``
        5. advance             ĥ ← ĥ + X̂Qᵀ (+ b) through the solved layer  ``advance``

    SOLVERS: gptq, lloa, lloa_soa, loaq → GPTQ towards W̃ = W + (H⁻¹R)ᵀ (``quant.loaq_target``);
    gptaq, qronos → their own solvers on H and C; rtn → round to nearest (H's diagonal for NeUQI).

The clean stream ``h`` is the full-precision model; the quantized stream ``h_hat`` runs the layer
whose earlier linears are already quantized (true-sequential order). Each W is quantized towards
its LoaQ target (``quant.targets.loaq_target``) by GPTQ with the same damped Hessian.

We build transformers' own decoder layer and replace its W_out linear by an identity, so calling
the attention (or MLP) module yields ``X_hat = phi(Norm(h_hat) W_in)``, the input of W_out, which
we then apply ourselves.

The clean stream is read, never recomputed: it comes as the layer's input h and each sub-layer's
output Y = X W_out^T + b (``CleanStream``, computed once by ``forward.clean_layer_forward`` and
shared by every variant). That is all the LoaQ targets need: W_in's C uses X = Norm(h) (h_mid =
h + Y_attn for the MLP), and W_out's statistics need X only through X W_out^T = Y - b
(``quant.ProjectedOutputStats``, ``quant.projected_difference``). So a variant on a stored clean
stream runs the quantized stream only, like GPTQ.

Norm factors: the W_out statistics of LoaQ weight each token by s = r(h + Y) and
s_hat = r(h_hat + Y_hat) (eq. 12 with h_hat; Algorithm 1 line 11 misprints h), where r is the
per-token factor of the *next* RMSNorm (this layer's post-attention norm after attention, the next
layer's input norm or the model's final norm after the MLP). The next norm's elementwise weight
gamma is deliberately left out: it scales output feature j of both sides by the same gamma_j, so it
only re-weights the independent per-output-channel least-squares problems (rows of W in our
(out, in) convention) and changes none of their minimisers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from loaq.configs.schema import MISMATCH_METHODS, QuantizeConfig
from loaq.models.adapters import Adapter, SubLayer
from loaq.models.layers import (ContextFactory, InputTransform, build_layer, call_sublayer, input_transforms_of,
                               set_submodule, submodule, with_input_transforms)
from loaq.quant import (DampedHessian, GPTQResult, InputStats, ProjectedOutputStats, QuantizedWeight, QuantSpec,
                        damp_hessian, gptaq, gptq, lloa_rhs, loaq_target, projected_difference, qronos, rtn)
from loaq.quant.targets import RightHandSide

from .arrays import MemoryArray, SampleArray, micro_batches
from .metrics import PhaseTimes
from .sources import with_activation_quantizer


def apply_all(transforms, x: torch.Tensor) -> torch.Tensor:
    """x through input transforms in order (what a linear with these transforms multiplies)."""
    for transform in transforms:
        x = transform(x)
    return x


@dataclass
class LayerResult:
    """Quantized weights of one decoder layer and what the solver recorded for each part."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # linear name -> weight
    solver: dict[str, dict] = field(default_factory=dict)  # "attn.w_in" etc. -> loss, damping, tokens
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall time (read, quant_forward, ...)


@dataclass
class CleanStream:
    """The clean stream through one decoder layer: its input ``h`` (samples, seqlen, d) and each
    sub-layer's output ``out[name]`` = phi(Norm(h) W_in) W_out + b, so that h_mid = h + Y_attn and
    the layer's output is h_mid + Y_mlp."""

    h: SampleArray
    out: dict[str, SampleArray]


def take_rows(q: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    """Rows [start, stop) of a quantized weight: per-output-channel scales split with their rows."""
    rows = lambda t: None if t is None else t[start:stop]
    return replace(q, weight=q.weight[start:stop], codes=rows(q.codes), scales=rows(q.scales), zeros=rows(q.zeros))


def quant_spec(cfg: QuantizeConfig) -> QuantSpec:
    return QuantSpec(bits=cfg.bits, symmetric=cfg.symmetric, group_size=cfg.group_size, mse_clip=cfg.mse_clip,
                     grid_init=cfg.grid_init)


@dataclass(frozen=True)
class SolverSettings:
    """What the solvers read of the quantization config."""

    method: str
    spec: QuantSpec
    percdamp: float
    block_size: int
    act_order: bool
    static_groups: bool
    gptaq_alpha: float

    @classmethod
    def of(cls, cfg: QuantizeConfig) -> "SolverSettings":
        return cls(cfg.method, quant_spec(cfg), cfg.percdamp, cfg.block_size, cfg.act_order, cfg.static_groups,
                   cfg.gptaq_alpha)

    @property
    def options(self) -> dict:
        return dict(block_size=self.block_size, act_order=self.act_order, static_groups=self.static_groups)


Solver = Callable[[torch.Tensor, DampedHessian, "torch.Tensor | None", "RightHandSide | None", SolverSettings],
                  GPTQResult]


def gptq_to_target(W, hessian, C, R, s: SolverSettings) -> GPTQResult:
    """GPTQ towards the LoaQ target W̃ = W + (H⁻¹R)ᵀ (W itself when R is None: plain GPTQ)."""
    target = loaq_target(W, hessian, R)
    hessian.drop_factor()  # GPTQ refactors H in its column order
    return gptq(target, hessian, s.spec, **s.options)


def gptaq_solver(W, hessian, C, R, s: SolverSettings) -> GPTQResult:
    return gptaq(W, hessian, C, s.spec, alpha=s.gptaq_alpha, **s.options)


def qronos_solver(W, hessian, C, R, s: SolverSettings) -> GPTQResult:
    return qronos(W, hessian, C, s.spec, **s.options)


# Method -> solver on the damped H. GPTAQ and Qronos correct the mismatch C in their own solvers;
# the LoaQ ladder differs only in the right-hand side R its statistics produce.
SOLVERS: dict[str, Solver] = {"gptq": gptq_to_target, "lloa": gptq_to_target, "lloa_soa": gptq_to_target,
                              "loaq": gptq_to_target, "gptaq": gptaq_solver, "qronos": qronos_solver}


def solve(W: torch.Tensor, stats, C: torch.Tensor | None, R: RightHandSide | None,
          s: SolverSettings) -> tuple[QuantizedWeight, dict]:
    """Quantize W (out, in) against its statistics' H, the mismatch C (GPTAQ, Qronos) and the LoaQ
    target's right-hand side R."""
    # The accumulator is not needed after this: it becomes the damped H in place (the largest tensor
    # of a layer).
    if s.method == "rtn":
        # NeUQI weighs the grid's error by the damped Hessian's diagonal, as it does under GPTQ.
        importance = damp_hessian(stats.H, s.percdamp, overwrite=True).H.diagonal() if s.spec.uses_importance else None
        return rtn(W, s.spec, importance), {}
    hessian = damp_hessian(stats.H, s.percdamp, overwrite=True)
    result = SOLVERS[s.method](W, hessian, C, R, s)
    info = {"loss": float(result.loss), "percdamp": float(result.percdamp), "lambda": float(result.lam),
            "tokens": int(stats.n_tokens)}
    return result.qweight, info


class LayerQuantizer:
    """Quantizes decoder layer ``index`` given the quantized stream's input (and, for the LoaQ
    family, the clean stream through the layer); writes the quantized stream's output."""

    def __init__(self, adapter: Adapter, config, index: int, state: dict[str, torch.Tensor], cfg: QuantizeConfig,
                 contexts: ContextFactory, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 micro_batch: int = 8, cache_bytes: int = 8 << 30,
                 input_transforms: dict[str, list[InputTransform]] | None = None):
        self.adapter, self.config, self.index = adapter, config, index
        self.contexts, self.device, self.dtype, self.micro_batch = contexts, device, dtype, micro_batch
        self.eps = float(config.rms_norm_eps)
        self.cache_bytes = cache_bytes  # host memory allowed for caching a sub-layer's W_out inputs
        # What the layer reads of the config: the solver settings, the terms' strengths, the streams.
        self.settings = SolverSettings.of(cfg)
        self.strengths = cfg.layer_strengths(index)  # sub-layer -> (alpha_in, alpha_out, beta)
        self.terms = cfg.terms
        self.noa = cfg.terms.noa
        self.needs_clean, self.resets_clean = cfg.needs_clean_stream(), cfg.resets_clean_stream()
        # input_transforms: the model's own online transforms of linear inputs (a rotated model's
        # online Hadamard), applied in both streams; see models.layers.add_input_transform. With
        # act_bits, every linear of the quantized stream also quantizes its input per token, after
        # those: so X_hat, the statistics, the cached W_out inputs and the quantized stream all see
        # the activations the quantized model computes with. The clean stream stays full precision.
        self.model_transforms = dict(input_transforms or {})
        self.quant = build_layer(adapter, config, index, state, dtype, device,
                                 with_activation_quantizer(self.model_transforms, adapter.linear_names(), cfg.act_bits))
        # W_out linears are applied by hand (see module docstring); keep the full-precision ones.
        # Their identity stand-ins keep the linears' input transforms, so X_hat is what W_out reads.
        self.w_out: dict[str, nn.Linear] = {}
        for sub in adapter.sublayers:
            self.w_out[sub.name] = submodule(self.quant, sub.w_out)
            set_submodule(self.quant, sub.w_out, with_input_transforms(nn.Identity(), self.w_out[sub.name]))
        self.result = LayerResult()
        self.timer = PhaseTimes(device)
        # RTN needs no statistics, except the Hessian diagonal that NeUQI weighs its grid search by.
        self.gathers_statistics = cfg.method != "rtn" or self.settings.spec.uses_importance
        # GPTAQ and Qronos need C = X_hat^T (X - X_hat) of W_out itself, so the clean X (W_out's
        # input in the full-precision layer) is recomputed for them; the LoaQ family needs only Y.
        self.fp = None
        if cfg.method in MISMATCH_METHODS:
            self.fp = build_layer(adapter, config, index, state, dtype, device, input_transforms)
            for sub in adapter.sublayers:
                set_submodule(self.fp, sub.w_out, with_input_transforms(nn.Identity(), submodule(self.fp, sub.w_out)))

    # -- the sub-layer pieces -------------------------------------------------------------------
    def inner(self, sub: SubLayer, hq: torch.Tensor) -> torch.Tensor:
        """X_hat = phi(Norm(h_hat) W_in): the input of the sub-layer's W_out (quantized stream)."""
        with self.timer("quant_forward"):
            return call_sublayer(self.quant, sub, hq, self.contexts, self.index)

    def load(self, h: SampleArray, start: int, stop: int) -> torch.Tensor:
        with self.timer("read"):
            return h.read(start, stop).to(device=self.device, dtype=self.dtype)

    def clean_input(self, clean: CleanStream, position: int, start: int, stop: int) -> torch.Tensor:
        """The clean residual stream in front of sub-layer ``position``: h, or h + Y_attn, ..."""
        h = self.load(clean.h, start, stop)
        for before in self.adapter.sublayers[:position]:
            h = h + self.load(clean.out[before.name], start, stop)
        return h

    @staticmethod
    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).to(torch.float32)

    def assign(self, names: tuple[str, ...], q: QuantizedWeight) -> None:
        """Split a stacked quantized W_in by output rows and install it in the quantized layer."""
        row = 0
        for name in names:
            linear = submodule(self.quant, name)
            rows = linear.weight.shape[0]
            part = take_rows(q, row, row + rows)
            linear.weight.data = part.weight.to(device=self.device, dtype=self.dtype)
            self.result.weights[name] = part
            row += rows

    def _solve(self, part: str, W: torch.Tensor, stats, C: torch.Tensor | None,
               R: RightHandSide | None) -> QuantizedWeight:
        with self.timer("solve"):
            q, info = solve(W, stats, C, R, self.settings)
        self.result.solver[part] = info
        return q

    # -- the steps of one sub-layer ------------------------------------------------------------------
    def w_in_stats(self, position: int, sub: SubLayer, clean: CleanStream | None, hq: SampleArray,
                    n_in: int) -> InputStats:
        """H = X̂ᵀX̂ and C = X̂ᵀ(X − X̂) of X = Norm(h). Norms are not quantized, so the quantized layer's
        norm serves both streams. W_in's linears read one input, each through the same transforms: the
        model's own (both streams) and, in the quantized stream, the activation quantizer."""
        stats = InputStats(n_in, device=self.device)
        if not self.gathers_statistics:
            return stats
        quant_reads = input_transforms_of(submodule(self.quant, sub.w_in[0]))
        clean_reads = self.model_transforms.get(sub.w_in[0], ())
        norm = submodule(self.quant, sub.norm)
        for start, stop in micro_batches(hq.shape[0], self.micro_batch):
            hq_b = self.load(hq, start, stop)
            h_b = None if clean is None else self.clean_input(clean, position, start, stop)
            with self.timer("stats"):
                xq = self.flat(apply_all(quant_reads, norm(hq_b)))
                stats.add(None if clean is None else self.flat(apply_all(clean_reads, norm(h_b))), xq)
        return stats

    def _w_out_stats(self, position: int, sub: SubLayer, clean: CleanStream | None, hq: SampleArray,
                     W_out: torch.Tensor, bias: torch.Tensor | None, inputs: SampleArray | None = None
                     ) -> tuple[InputStats | ProjectedOutputStats, torch.Tensor | None, RightHandSide | None,
                                MemoryArray | None]:
        """W_out's statistics on X̂ = phi(Norm(ĥ) W_in) with the quantized W_in, C (GPTAQ/Qronos), its
        right-hand side R, and X̂ kept in host memory (within the budget) for advancing the stream:
        X̂ does not depend on W_out.

        GPTQ/RTN: H of X̂ alone. GPTAQ/Qronos: H and C, from the clean X recomputed by the full-precision
        layer. The LoaQ family: H and R = Σ X̂'ᵀD, D from the stored clean output Y (no clean X)."""
        n, (n_out, n_in) = hq.shape[0], W_out.shape
        _, alpha_out, beta = self.strengths[sub.name]
        projected = clean is not None and self.fp is None
        stats = (ProjectedOutputStats(n_in, n_out, device=self.device) if projected
                 else InputStats(n_in, device=self.device))
        if not self.gathers_statistics:
            return stats, None, None, None
        inner_shape = (n, *hq.shape[1:-1], n_in)
        cache = inputs if isinstance(inputs, MemoryArray) else None
        if cache is None and math.prod(inner_shape) * self.dtype.itemsize <= self.cache_bytes:
            cache = MemoryArray(shape=inner_shape, dtype=self.dtype)
        for start, stop in micro_batches(n, self.micro_batch):
            hq_b = self.load(hq, start, stop)
            xq = self.inner(sub, hq_b) if inputs is None else self.load(inputs, start, stop)
            if cache is not None and cache is not inputs:
                cache.write(start, xq)
            if clean is None:
                with self.timer("stats"):
                    stats.add(None, self.flat(xq))
            elif self.fp is not None:
                h_b = self.clean_input(clean, position, start, stop)
                with self.timer("clean_forward"):
                    x = call_sublayer(self.fp, sub, h_b, self.contexts, self.index)
                with self.timer("stats"):
                    stats.add(self.flat(x), self.flat(xq))
            else:
                h_b = self.clean_input(clean, position, start, stop)
                y = self.load(clean.out[sub.name], start, stop)
                with self.timer("stats"):
                    flat_xq = self.flat(xq)
                    D, s_hat = projected_difference(self.flat(h_b), self.flat(y), self.flat(hq_b), flat_xq,
                                                    W_out, bias, alpha_out, beta,
                                                    self.eps if self.noa else None)
                    stats.add(flat_xq, D, s_hat)
        if projected:
            return stats, None, stats.R, cache
        return stats, stats.C, lloa_rhs(stats.C, W_out, alpha_out), cache

    def advance(self, sub: SubLayer, hq: SampleArray, hq_next: SampleArray, Q: torch.Tensor,
                 bias: torch.Tensor | None, cache: MemoryArray | None) -> None:
        """The quantized stream through the finished sub-layer: ĥ + X̂Qᵀ (+ b)."""
        for start, stop in micro_batches(hq.shape[0], self.micro_batch):
            hq_b = self.load(hq, start, stop)
            xq = self.load(cache, start, stop) if cache is not None else self.inner(sub, hq_b)
            with self.timer("quant_forward"):
                out = hq_b + F.linear(xq, Q, bias)
            with self.timer("write"):
                hq_next.write(start, out)

    def quantize_w_in(self, position: int, sub: SubLayer, clean: CleanStream | None, hq: SampleArray) -> None:
        """Steps 1-2: W_in's statistics, its solve, the result installed in the quantized layer."""
        W_in = torch.cat([submodule(self.quant, name).weight for name in sub.w_in]).float()
        stats = self.w_in_stats(position, sub, clean, hq, W_in.shape[1])
        R = lloa_rhs(stats.C, W_in, self.strengths[sub.name][0])
        self.assign(sub.w_in, self._solve(f"{sub.name}.w_in", W_in, stats, stats.C, R))

    def quantize_w_out(self, position: int, sub: SubLayer, clean: CleanStream | None, hq: SampleArray,
                       hq_next: SampleArray, inputs: SampleArray | None = None) -> None:
        """Steps 3-5: W_out's statistics (on ``inputs`` = X̂ when given, the W_in installed now), its
        solve, and the quantized stream through the finished sub-layer."""
        linear = self.w_out[sub.name]
        W_out = linear.weight.float()  # no copy when float32
        bias32 = None if linear.bias is None else linear.bias.float()
        stats, C, R, cache = self._w_out_stats(position, sub, clean, hq, W_out, bias32, inputs)
        q = self._solve(f"{sub.name}.w_out", W_out, stats, C, R)
        self.result.weights[sub.w_out] = q
        del stats, C, R
        self.advance(sub, hq, hq_next, q.weight.to(device=self.device, dtype=self.dtype), linear.bias, cache)

    @torch.no_grad()
    def _quantize_sublayer(self, position: int, sub: SubLayer, clean: CleanStream | None, hq: SampleArray,
                           hq_next: SampleArray) -> None:
        self.quantize_w_in(position, sub, clean, hq)
        self.quantize_w_out(position, sub, clean, hq, hq_next)

    def in_memory(self, arrays: list[SampleArray]) -> list[SampleArray]:
        """The arrays read once into host memory when together they fit the cache budget (each is
        read by several passes), else unchanged (read per micro-batch, from the store)."""
        size = sum(math.prod(a.shape) * self.dtype.itemsize for a in arrays)
        if size > self.cache_bytes // 2 or all(isinstance(a, MemoryArray) for a in arrays):
            return arrays
        return self.to_memory(arrays)

    def to_memory(self, arrays: list[SampleArray]) -> list[MemoryArray]:
        """Copies of the arrays in host memory, read per micro-batch."""
        out = []
        for array in arrays:
            memory = MemoryArray(shape=array.shape, dtype=self.dtype)
            for start, stop in micro_batches(array.shape[0], self.micro_batch):
                memory.write(start, self.load(array, start, stop))
            out.append(memory)
        return out

    @torch.no_grad()
    def _fp_stream(self, h_in: SampleArray) -> CleanStream:
        """The full-precision layer's stream (its sub-layer outputs) on input ``h_in``, in memory."""
        out = {sub.name: MemoryArray(shape=h_in.shape, dtype=self.dtype) for sub in self.adapter.sublayers}
        for start, stop in micro_batches(h_in.shape[0], self.micro_batch):
            h = self.load(h_in, start, stop)
            for sub in self.adapter.sublayers:
                linear = self.w_out[sub.name]
                with self.timer("clean_forward"):
                    y = F.linear(call_sublayer(self.fp, sub, h, self.contexts, self.index), linear.weight, linear.bias)
                out[sub.name].write(start, y)
                h = h + y
        return CleanStream(h_in, out)

    def run(self, clean: CleanStream | None, hq_in: SampleArray, hq_out: SampleArray) -> LayerResult:
        """Quantize the layer. ``clean`` (the clean stream through this layer) is needed by the LoaQ
        family and ignored by RTN/GPTQ, which only need the quantized stream."""
        if self.resets_clean:
            # Qronos: the clean stream restarts from the quantized one at this layer's input, so
            # C holds only this layer's own error (the full-precision layer applied to h_hat).
            clean = self._fp_stream(hq_in)
        elif clean is not None and self.needs_clean:
            names = list(clean.out)
            h, *outs = self.in_memory([clean.h, *clean.out.values()])
            clean = CleanStream(h, dict(zip(names, outs)))
        else:
            clean = None
        if self.gathers_statistics:
            (hq_in,) = self.in_memory([hq_in])
        hq_mid = MemoryArray(shape=hq_in.shape, dtype=self.dtype)
        first, second = self.adapter.sublayers
        self._quantize_sublayer(0, first, clean, hq_in, hq_mid)
        self._quantize_sublayer(1, second, clean, hq_mid, hq_out)
        self.result.seconds = self.timer.as_dict()
        return self.result
