"""Quantize one decoder layer with two streams (paper, Algorithm 1, lines 3-21).

The clean stream ``h`` runs the full-precision layer; the quantized stream ``h_hat`` runs the layer
whose earlier linears are already quantized (true-sequential order: attention W_in = [q;k;v],
attention W_out = o, MLP W_in = [gate;up], MLP W_out = down). For each W the engine accumulates
statistics micro-batch by micro-batch, forms the LoaQ target and hands it to GPTQ with the same
damped Hessian.

Every sub-layer is handled the same way: ``h + phi(Norm(h) W_in) W_out``. We build transformers'
own decoder layer and replace its W_out linear by an identity, so calling the attention (or MLP)
module yields ``X = phi(Norm(h) W_in)``, the input of W_out, which we then apply ourselves.

Norm factors: the W_out statistics of LoaQ weight each token by s = r(h + X W_out) and
s_hat = r(h_hat + X_hat W_out) (eq. 12 with h_hat; Algorithm 1 line 11 misprints h), where r is the
per-token factor of the *next* RMSNorm (this layer's post-attention norm after attention, the next
layer's input norm or the model's final norm after the MLP). The next norm's elementwise weight
gamma is deliberately left out: it scales output feature j of both sides by the same gamma_j, so it
only re-weights the independent per-output-channel least-squares problems (rows of W in our
(out, in) convention) and changes none of their minimisers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from loaq.configs.schema import QuantizeConfig
from loaq.models.adapters import Adapter, SubLayer
from loaq.models.layers import ContextFactory, build_layer, rms_factor, set_submodule, submodule
from loaq.quant import (InputStats, OutputStats, QuantizedWeight, QuantSpec, damp_hessian, gptaq, gptq, loaq_target,
                        qronos, rtn)

from .arrays import MemoryArray, SampleArray, micro_batches


@dataclass
class LayerResult:
    """Quantized weights of one decoder layer and what the solver recorded for each part."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # linear name -> weight
    solver: dict[str, dict] = field(default_factory=dict)  # "attn.w_in" etc. -> loss, damping, tokens


def take_rows(q: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    """Rows [start, stop) of a quantized weight: per-output-channel scales split with their rows."""
    rows = lambda t: None if t is None else t[start:stop]
    return replace(q, weight=q.weight[start:stop], codes=rows(q.codes), scales=rows(q.scales), zeros=rows(q.zeros))


def quant_spec(cfg: QuantizeConfig) -> QuantSpec:
    return QuantSpec(bits=cfg.bits, symmetric=cfg.symmetric, group_size=cfg.group_size, mse_clip=cfg.mse_clip)


def solve(W: torch.Tensor, cfg: QuantizeConfig, stats, alpha: float, beta: float) -> tuple[QuantizedWeight, dict]:
    """Quantize W (out, in) against its statistics: LoaQ target, then GPTQ with the same damped H
    (GPTAQ and Qronos: their own solvers on the same damped H and C)."""
    spec = quant_spec(cfg)
    if cfg.method == "rtn":
        return rtn(W, spec), {}
    hessian = damp_hessian(stats.H, cfg.percdamp)
    options = dict(block_size=cfg.block_size, act_order=cfg.act_order, static_groups=cfg.static_groups)
    if cfg.method == "gptaq":
        result = gptaq(W, hessian, stats.C, spec, alpha=cfg.gptaq_alpha, **options)
    elif cfg.method == "qronos":
        result = qronos(W, hessian, stats.C, spec, **options)
    else:
        result = gptq(loaq_target(W, hessian, stats.C, stats.B, alpha, beta), hessian, spec, **options)
    info = {"loss": float(result.loss), "percdamp": float(result.percdamp), "lambda": float(result.lam),
            "tokens": int(stats.n_tokens)}
    return result.qweight, info


class LayerQuantizer:
    """Quantizes decoder layer ``index`` given both streams' inputs; writes both streams' outputs."""

    def __init__(self, adapter: Adapter, config, index: int, state: dict[str, torch.Tensor], cfg: QuantizeConfig,
                 contexts: ContextFactory, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 micro_batch: int = 8, cache_bytes: int = 8 << 30):
        self.adapter, self.config, self.index, self.cfg = adapter, config, index, cfg
        self.contexts, self.device, self.dtype, self.micro_batch = contexts, device, dtype, micro_batch
        self.eps = float(config.rms_norm_eps)
        self.cache_bytes = cache_bytes  # host memory allowed for caching a sub-layer's W_out inputs
        self.clean = build_layer(adapter, config, index, state, dtype, device)
        self.quant = build_layer(adapter, config, index, state, dtype, device)
        # W_out linears are applied by hand (see module docstring); keep the clean ones.
        self.w_out: dict[str, nn.Linear] = {}
        for sub in adapter.sublayers:
            self.w_out[sub.name] = submodule(self.clean, sub.w_out)
            set_submodule(self.clean, sub.w_out, nn.Identity())
            set_submodule(self.quant, sub.w_out, nn.Identity())
        self.result = LayerResult()

    # -- the sub-layer pieces -------------------------------------------------------------------
    def _inner(self, layer: nn.Module, sub: SubLayer, h: torch.Tensor) -> torch.Tensor:
        """X = phi(Norm(h) W_in): the input of the sub-layer's W_out."""
        x = submodule(layer, sub.norm)(h)
        module = submodule(layer, sub.module)
        if sub.name == "attn":
            ctx = self.contexts(h)
            return module(hidden_states=x, position_embeddings=ctx.position_embeddings,
                          attention_mask=ctx.mask_for(self.config, self.index))[0]
        return module(x)

    def _load(self, h: SampleArray, start: int, stop: int) -> torch.Tensor:
        return h.read(start, stop).to(device=self.device, dtype=self.dtype)

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).to(torch.float32)

    def _assign(self, names: tuple[str, ...], q: QuantizedWeight) -> None:
        """Split a stacked quantized W_in by output rows and install it in the quantized layer."""
        row = 0
        for name in names:
            linear = submodule(self.quant, name)
            rows = linear.weight.shape[0]
            part = take_rows(q, row, row + rows)
            linear.weight.data = part.weight.to(device=self.device, dtype=self.dtype)
            self.result.weights[name] = part
            row += rows

    # -- one sub-layer ------------------------------------------------------------------------------
    @torch.no_grad()
    def _quantize_sublayer(self, sub: SubLayer, h: SampleArray | None, hq: SampleArray,
                           h_next: SampleArray | None, hq_next: SampleArray) -> None:
        cfg, n = self.cfg, hq.shape[0]
        alpha_in, alpha_out, beta = cfg.alphas_beta()
        lloa, soa, noa = cfg.terms
        clean = h is not None and cfg.needs_clean_stream()
        gather = cfg.method != "rtn"

        # W_in: H = X_hat^T X_hat, C = X_hat^T (X - X_hat) with X = Norm(h).
        w_in_names = sub.w_in
        W_in = torch.cat([submodule(self.clean, name).weight for name in w_in_names]).float()
        stats = InputStats(W_in.shape[1])
        if gather:
            norm_c, norm_q = submodule(self.clean, sub.norm), submodule(self.quant, sub.norm)
            for start, stop in micro_batches(n, self.micro_batch):
                xq = self._flat(norm_q(self._load(hq, start, stop)))
                x = self._flat(norm_c(self._load(h, start, stop))) if clean else xq
                stats.add(x, xq)
        q, info = solve(W_in, cfg, stats, alpha_in, 0.0)
        self.result.solver[f"{sub.name}.w_in"] = info
        self._assign(w_in_names, q)
        del stats

        # W_out: statistics on X = phi(Norm(h) W_in) with the quantized W_in in the quantized stream.
        linear = self.w_out[sub.name]
        W_out, bias = linear.weight.float(), linear.bias
        stats = OutputStats(W_out.shape[1], W_out.shape[0]) if clean else InputStats(W_out.shape[1])
        # X_hat does not depend on W_out: keep it (host memory, within a budget) for the final pass
        # instead of running the sub-layer module a second time.
        inner_shape = (n, *hq.shape[1:-1], W_out.shape[1])
        cache = None
        if gather and math.prod(inner_shape) * self.dtype.itemsize <= self.cache_bytes:
            cache = MemoryArray(shape=inner_shape, dtype=self.dtype)
        if gather:
            for start, stop in micro_batches(n, self.micro_batch):
                hq_b = self._load(hq, start, stop)
                xq = self._inner(self.quant, sub, hq_b)
                if cache is not None:
                    cache.write(start, xq)
                resid_q = hq_b if bias is None else hq_b + bias
                if clean:
                    h_b = self._load(h, start, stop)
                    x = self._inner(self.clean, sub, h_b)
                    resid = h_b if bias is None else h_b + bias
                    if noa:
                        s = rms_factor(resid + F.linear(x, linear.weight), self.eps)
                        s_hat = rms_factor(resid_q + F.linear(xq, linear.weight), self.eps)
                    else:
                        s = s_hat = None
                    if h_next is not None:
                        h_next.write(start, h_b + F.linear(x, linear.weight, bias))
                    stats.add(self._flat(x), self._flat(xq), self._flat(resid), self._flat(resid_q),
                              None if s is None else s.reshape(-1), None if s_hat is None else s_hat.reshape(-1))
                else:
                    stats.add(self._flat(xq), self._flat(xq))
        q, info = solve(W_out, cfg, stats, alpha_out, beta if soa else 0.0)
        self.result.solver[f"{sub.name}.w_out"] = info
        self.result.weights[sub.w_out] = q
        del stats

        # Quantized stream through the finished sub-layer: h_hat + X_hat Q^T (+ b).
        Q = q.weight.to(device=self.device, dtype=self.dtype)
        for start, stop in micro_batches(n, self.micro_batch):
            hq_b = self._load(hq, start, stop)
            xq = cache.read(start, stop) if cache is not None else self._inner(self.quant, sub, hq_b)
            hq_next.write(start, hq_b + F.linear(xq, Q, bias))
            if h is not None and not clean and h_next is not None:
                h_b = self._load(h, start, stop)
                h_next.write(start, h_b + F.linear(self._inner(self.clean, sub, h_b), linear.weight, bias))

    def _clean_forward(self, h_in: SampleArray, h_out: SampleArray) -> None:
        """h_out = the full-precision layer applied to h_in."""
        for start, stop in micro_batches(h_in.shape[0], self.micro_batch):
            h = self._load(h_in, start, stop)
            for sub in self.adapter.sublayers:
                linear = self.w_out[sub.name]
                h = h + F.linear(self._inner(self.clean, sub, h), linear.weight, linear.bias)
            h_out.write(start, h)

    def run(self, h_in: SampleArray | None, hq_in: SampleArray, h_out: SampleArray | None,
            hq_out: SampleArray) -> LayerResult:
        """Quantize the layer. ``h_in``/``h_out`` (clean stream) may be None for RTN/GPTQ, which
        only need the quantized stream; given, the clean stream is propagated too.

        With ``cfg.resets_clean_stream()`` (Qronos) the statistics see a clean stream restarted from
        the quantized one, h = h_hat at the layer input, so C holds only this layer's own error;
        h_out is still the full-precision stream."""
        if h_in is not None and self.cfg.resets_clean_stream():
            if h_out is not None:
                self._clean_forward(h_in, h_out)
            h_in, h_out = hq_in, None
        first, second = self.adapter.sublayers
        hq_mid = MemoryArray(shape=hq_in.shape, dtype=self.dtype)
        h_mid = MemoryArray(shape=h_in.shape, dtype=self.dtype) if h_in is not None else None
        self._quantize_sublayer(first, h_in, hq_in, h_mid, hq_mid)
        self._quantize_sublayer(second, h_mid, hq_mid, h_out, hq_out)
        return self.result
