"""Choose a decoder layer's LoaQ strengths (alpha, beta) on calibration windows the solves never see.

What runs when (``LayerSearch.run``; one decoder layer, its sub-layers in order):

    split the windows: solve = the first ones, held out = the last (``SearchConfig.split``)
    for each sub-layer h + phi(Norm(h) W_in) W_out:
        1. W_in statistics H, C on the solve windows                 once
        2. for each alpha: solve W_in (R = alpha·C·Wᵀ), then W_out's   once per alpha
           H and both parts of R (LLOA, SOA) on the solve windows
        3. for each beta: solve W_out on R = alpha·R_lloa + beta·R_soa once per (alpha, beta)
           and score it on the held-out windows (``normalised_output_error``)
        4. keep the best pair; advance the quantized stream (all windows) through its weights

The choice is greedy per sub-layer: the MLP is searched on the quantized stream that the chosen
attention produces, so a layer costs len(alpha) W_in solves and forwards per sub-layer plus
len(alpha)·len(beta) W_out solves, not a product over sub-layers. The search's weights are
thrown away: the stage then quantizes the layer on all windows with the chosen values, exactly as
a run configured with them does (its records are that run's records).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from loaq.configs.schema import SearchConfig
from loaq.models.adapters import SubLayer
from loaq.models.layers import submodule
from loaq.quant import ProjectedTermStats, QuantizedWeight, lloa_rhs, normalised_output_error, projected_difference

from .arrays import MemoryArray, Rows, SampleArray, micro_batches
from .layer import CleanStream, LayerQuantizer, solve


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
        solve_hq, held_hq = Rows(hq, 0, n_solve), Rows(hq, n_solve, n)
        W_in = torch.cat([submodule(q.quant, name).weight for name in sub.w_in]).float()
        in_stats = q.w_in_stats(position, sub, solve_clean, solve_hq, W_in.shape[1])
        H_in = in_stats.H.clone()  # each solve damps its H in place
        result.solver_tokens[f"{sub.name}.w_in"] = int(in_stats.n_tokens)
        linear = q.w_out[sub.name]
        W_out, bias = linear.weight.float(), None if linear.bias is None else linear.bias.float()

        best, scores = None, []
        for alpha in dict.fromkeys(a for a, _ in self.candidates):
            R_in = lloa_rhs(in_stats.C, W_in, alpha)
            with q.timer("solve"):
                q_in, _ = solve(W_in, SimpleNamespace(H=H_in.clone(), n_tokens=in_stats.n_tokens), in_stats.C, R_in,
                                q.settings)
            q.assign(sub.w_in, q_in)
            out_stats = self._w_out_terms(position, sub, solve_clean, solve_hq, W_out, bias)
            result.solver_tokens[f"{sub.name}.w_out"] = int(out_stats.n_tokens)
            held_x = self._inner_all(sub, held_hq)
            for a, beta in self.candidates:
                if a != alpha:
                    continue
                with q.timer("solve"):
                    q_out, _ = solve(W_out, SimpleNamespace(H=out_stats.H.clone(), n_tokens=out_stats.n_tokens), None,
                                     out_stats.R(alpha, beta), q.settings)
                score = self._score(position, sub, held_clean, held_hq, held_x, q_out.weight, linear.bias)
                scores.append((alpha, beta, score))
                if best is None or score < best[2]:
                    best = (alpha, beta, score, q_in, q_out)
        alpha, beta, _, q_in, q_out = best
        result.choice[sub.name] = (alpha, beta)
        result.scores[sub.name] = scores
        q.assign(sub.w_in, q_in)
        result.weights.update({name: q.result.weights[name] for name in sub.w_in})
        result.weights[sub.w_out] = q_out
        q.advance(sub, hq, hq_next, q_out.weight.to(device=q.device, dtype=q.dtype), linear.bias, None)

    def _w_out_terms(self, position: int, sub: SubLayer, clean: CleanStream, hq: SampleArray, W_out: torch.Tensor,
                     bias: torch.Tensor | None) -> ProjectedTermStats:
        """W_out's H and the two parts of its R on ``hq``'s windows, through the W_in now installed."""
        q = self.q
        stats = ProjectedTermStats(W_out.shape[1], W_out.shape[0], device=q.device)
        eps = q.eps if q.terms.noa else None
        for start, stop in micro_batches(hq.shape[0], q.micro_batch):
            hq_b = q.load(hq, start, stop)
            xq = q.flat(q.inner(sub, hq_b))
            h_b = q.flat(q.clean_input(clean, position, start, stop))
            y = q.flat(q.load(clean.out[sub.name], start, stop))
            hq_f = q.flat(hq_b)
            with q.timer("stats"):
                D_lloa, s_hat = projected_difference(h_b, y, hq_f, xq, W_out, bias, 1.0, 0.0, eps)
                D_soa, _ = projected_difference(h_b, y, hq_f, xq, W_out, bias, 0.0, 1.0, eps)
                stats.add(xq, D_lloa, D_soa, s_hat)
        return stats

    def _inner_all(self, sub: SubLayer, hq: SampleArray) -> list[torch.Tensor]:
        q = self.q
        return [q.inner(sub, q.load(hq, start, stop)) for start, stop in micro_batches(hq.shape[0], q.micro_batch)]

    def _score(self, position: int, sub: SubLayer, clean: CleanStream, hq: SampleArray, xs: list[torch.Tensor],
               Q: torch.Tensor, bias: torch.Tensor | None) -> float:
        """The objective on the held-out windows: the sub-layer's RMS-normalised output error."""
        q = self.q
        err = ref = 0.0
        Q = Q.to(device=q.device, dtype=q.dtype)
        for x, (start, stop) in zip(xs, micro_batches(hq.shape[0], q.micro_batch)):
            u = q.clean_input(clean, position, start, stop) + q.load(clean.out[sub.name], start, stop)
            uq = q.load(hq, start, stop) + F.linear(x, Q, bias)
            with q.timer("score"):
                e, r = normalised_output_error(q.flat(u), q.flat(uq), q.eps)
            err, ref = err + e, ref + r
        return err / ref if ref else 0.0
