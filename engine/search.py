"""Choose a decoder layer's LoaQ strengths (alpha, beta) on calibration windows the solves never see.

What runs when (``LayerSearch.run``; one decoder layer, its sub-layers in order):

    split the windows: solve = the first ones, held out = the last (``SearchConfig.split``)
    for each sub-layer h + phi(Norm(h) W_in) W_out:
        1. W_in statistics H, C on the solve windows; one GPTQ of every alpha's W_in target
        2. for each alpha: X̂ = phi(Norm(ĥ) W_in) on every window, W_out's H and both parts of its
           R (LLOA, SOA) on the solve windows; one GPTQ of every beta's target R = alpha·R_lloa + beta·R_soa
        3. score each (alpha, beta) on the held-out windows (``normalised_output_error``)
        4. keep the best pair; advance the quantized stream (all windows) through its weights

GPTQ quantizes the rows of W independently given H, so the candidates that share an H share one
column loop, their targets stacked row-wise. The choice is greedy per sub-layer: the MLP is searched
on the quantized stream that the chosen attention produces, so a layer costs len(alpha) forwards of
each sub-layer, not a product over sub-layers. The search's weights are thrown away: the stage then
quantizes the layer on all windows with the chosen values, exactly as a run configured with them does
(its records are that run's records).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loaq.configs.schema import SearchConfig
from loaq.models.adapters import SubLayer
from loaq.models.layers import submodule
from loaq.quant import (ProjectedTermStats, QuantizedWeight, damp_hessian, gptq, lloa_rhs, loaq_target,
                        normalised_output_error, projected_terms)

from .arrays import MemoryArray, Rows, SampleArray, micro_batches
from .layer import CleanStream, LayerQuantizer, take_rows


@dataclass
class SearchResult:
    """Per sub-layer: the chosen (alpha, beta), every candidate's score, and the tokens each side used."""

    choice: dict[str, tuple[float, float]] = field(default_factory=dict)
    scores: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)  # (alpha, beta, objective)
    windows: dict[str, list[int]] = field(default_factory=dict)  # "solve"/"held_out" -> [start, stop)
    solver_tokens: dict[str, int] = field(default_factory=dict)  # "attn.w_in" etc. -> tokens its H summed
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # the chosen candidates' (solve windows only)
    seconds: dict[str, float] = field(default_factory=dict)


def _rows(clean: CleanStream, start: int, stop: int) -> CleanStream:
    return CleanStream(Rows(clean.h, start, stop), {k: Rows(v, start, stop) for k, v in clean.out.items()})


class LayerSearch:
    """The search over ``search``'s candidates for one layer, on a ``LayerQuantizer`` of the layer
    built with the run's config (its solver settings, method and norms)."""

    def __init__(self, quantizer: LayerQuantizer, search: SearchConfig):
        self.q, self.search = quantizer, search
        terms = quantizer.terms
        # Candidates that are equal once the method's unused terms are zeroed are tried once.
        self.candidates = list(dict.fromkeys((a if terms.lloa else 0.0, b if terms.soa else 0.0)
                                             for a, b in search.candidates()))

    @torch.no_grad()
    def run(self, clean: CleanStream, hq_in: SampleArray) -> SearchResult:
        q = self.q
        names = list(clean.out)
        h, *outs = q.in_memory([clean.h, *clean.out.values()])
        clean = CleanStream(h, dict(zip(names, outs)))
        (hq_in,) = q.in_memory([hq_in])
        n = hq_in.shape[0]
        n_solve, _ = self.search.split(n)
        if n_solve < 1:
            raise ValueError(f"quantize.search.holdout leaves no calibration window to solve on ({n} windows)")
        result = SearchResult(windows={"solve": [0, n_solve], "held_out": [n_solve, n]})
        hq = hq_in
        for position, sub in enumerate(q.adapter.sublayers):
            hq_next = MemoryArray(shape=hq_in.shape, dtype=q.dtype)
            self._sublayer(position, sub, clean, hq, hq_next, n_solve, result)
            hq = hq_next
        result.seconds = q.timer.as_dict()
        return result

    def _sublayer(self, position: int, sub: SubLayer, clean: CleanStream, hq: SampleArray, hq_next: SampleArray,
                  n_solve: int, result: SearchResult) -> None:
        q, n = self.q, hq.shape[0]
        solve_clean, held_clean = _rows(clean, 0, n_solve), _rows(clean, n_solve, n)
        held_hq = Rows(hq, n_solve, n)
        W_in = torch.cat([submodule(q.quant, name).weight for name in sub.w_in]).float()
        in_stats = q.w_in_stats(position, sub, solve_clean, Rows(hq, 0, n_solve), W_in.shape[1])
        result.solver_tokens[f"{sub.name}.w_in"] = int(in_stats.n_tokens)
        linear = q.w_out[sub.name]
        W_out, bias = linear.weight.float(), None if linear.bias is None else linear.bias.float()

        alphas = list(dict.fromkeys(a for a, _ in self.candidates))
        q_ins = self._solve_stacked(W_in, in_stats.H, [lloa_rhs(in_stats.C, W_in, a) for a in alphas])
        del in_stats
        best, scores = None, []
        for alpha, q_in in zip(alphas, q_ins):
            q.assign(sub.w_in, q_in)
            out_stats, x_all = self._w_out_terms(position, sub, clean, hq, n_solve, W_out, bias)
            result.solver_tokens[f"{sub.name}.w_out"] = int(out_stats.n_tokens)
            betas = [b for a, b in self.candidates if a == alpha]
            q_outs = self._solve_stacked(W_out, out_stats.H, [out_stats.rhs(alpha, b) for b in betas])
            del out_stats
            for beta, q_out in zip(betas, q_outs):
                score = self._score(position, sub, held_clean, held_hq, Rows(x_all, n_solve, n), q_out.weight,
                                    linear.bias)
                scores.append((alpha, beta, score))
                if best is None or score < best[2]:
                    best = (alpha, beta, score, q_in, q_out, x_all)
        alpha, beta, _, q_in, q_out, x_all = best
        result.choice[sub.name] = (alpha, beta)
        result.scores[sub.name] = scores
        q.assign(sub.w_in, q_in)
        result.weights.update({name: q.result.weights[name] for name in sub.w_in})
        result.weights[sub.w_out] = q_out
        cache = x_all if isinstance(x_all, MemoryArray) else None
        q.advance(sub, hq, hq_next, q_out.weight.to(device=q.device, dtype=q.dtype), linear.bias, cache)

    def _solve_stacked(self, W: torch.Tensor, H: torch.Tensor, rhs: list) -> list[QuantizedWeight]:
        """GPTQ of every candidate's target W + (H⁻¹R)ᵀ in one call: GPTQ treats the rows of W
        independently given H, so the targets stacked row-wise share one column loop."""
        q = self.q
        with q.timer("solve"):
            hessian = damp_hessian(H.clone(), q.settings.percdamp, overwrite=True)
            targets = [loaq_target(W, hessian, R) for R in rhs]
            hessian.drop_factor()
            stacked = gptq(torch.cat(targets), hessian, q.settings.spec, **q.settings.options).qweight
        rows = W.shape[0]
        return [take_rows(stacked, i * rows, (i + 1) * rows) for i in range(len(targets))]

    def _w_out_terms(self, position: int, sub: SubLayer, clean: CleanStream, hq: SampleArray, n_solve: int,
                     W_out: torch.Tensor, bias: torch.Tensor | None) -> tuple[ProjectedTermStats, SampleArray]:
        """W_out's H and the two parts of its R on the solve windows (the first ``n_solve``), through
        the W_in now installed; and W_out's input on every window (in memory within the budget, else
        recomputed when read)."""
        q, n = self.q, hq.shape[0]
        stats = ProjectedTermStats(W_out.shape[1], W_out.shape[0], device=q.device)
        eps = q.eps if q.terms.noa else None
        inner_shape = (n, *hq.shape[1:-1], W_out.shape[1])
        x_all = (MemoryArray(shape=inner_shape, dtype=q.dtype)
                 if math.prod(inner_shape) * q.dtype.itemsize <= q.cache_bytes else _Inner(q, sub, hq, inner_shape))
        for start, stop in micro_batches(n, q.micro_batch):
            hq_b = q.load(hq, start, stop)
            x = q.inner(sub, hq_b)
            if isinstance(x_all, MemoryArray):
                x_all.write(start, x)
            if start >= n_solve:
                continue
            keep = min(stop, n_solve) - start  # a micro-batch across the split: its solve windows only
            xq = q.flat(x[:keep])
            h_b = q.flat(q.clean_input(clean, position, start, start + keep))
            y = q.flat(q.load(clean.out[sub.name], start, start + keep))
            hq_f = q.flat(hq_b[:keep])
            with q.timer("stats"):
                D_lloa, D_soa, s_hat = projected_terms(h_b, y, hq_f, xq, W_out, bias, eps)
                stats.add(xq, D_lloa, D_soa, s_hat)
        return stats, x_all

    def _score(self, position: int, sub: SubLayer, clean: CleanStream, hq: SampleArray, x: SampleArray,
               Q: torch.Tensor, bias: torch.Tensor | None) -> float:
        """The objective on the held-out windows: the sub-layer's RMS-normalised output error."""
        q = self.q
        err = ref = 0.0
        Q = Q.to(device=q.device, dtype=q.dtype)
        for start, stop in micro_batches(hq.shape[0], q.micro_batch):
            u = q.clean_input(clean, position, start, stop) + q.load(clean.out[sub.name], start, stop)
            uq = q.load(hq, start, stop) + F.linear(q.load(x, start, stop), Q, bias)
            with q.timer("score"):
                e, r = normalised_output_error(q.flat(u), q.flat(uq), q.eps)
            err, ref = err + e, ref + r
        return err / ref if ref else 0.0


class _Inner:
    """W_out's input X̂ = phi(Norm(ĥ) W_in) of ``hq``'s windows, recomputed when read (the search's
    stand-in for a cache that does not fit the host budget)."""

    def __init__(self, quantizer: LayerQuantizer, sub: SubLayer, hq: SampleArray, shape: tuple[int, ...]):
        self.q, self.sub, self.hq, self.shape = quantizer, sub, hq, shape

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.q.inner(self.sub, self.q.load(self.hq, start, stop))
