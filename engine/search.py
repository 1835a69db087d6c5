"""Choose a decoder layer's LoaQ strengths (alpha_out, beta) per sub-layer, scored on held-out windows.

What runs when (``LayerSearch.run``; one decoder layer, its sub-layers in order):

    for each sub-layer h + phi(Norm(h) W_in) W_out:
        1. W_in as the run quantizes it (its alpha_in), on every calibration window
        2. W_out's H and both parts of its R (LLOA, SOA) on every calibration window, once; one GPTQ
           of every candidate's target R = alpha_out·R_lloa + beta·R_soa
        3. score each candidate on the held-out windows: ``noa``, the sub-layer's RMS-normalised
           output error (``normalised_output_error``); ``kl``, the KL of the final next-token
           distribution from the full-precision model's, the rest of the model run in full
           precision behind the sub-layer (``tail.FullPrecisionTail``)
        4. W_out as the run configured with the best candidate quantizes it; both streams advance

The held-out windows are a separate draw (``data.calibration.sample_holdout``) carried through
every layer in both streams: no solve of any layer sees them, so the quantized stream's error on
them is what the quantized model makes on unseen text. (Windows held out of the calibration set
instead are in-sample for every earlier layer, and there larger strengths look better than they are.)

GPTQ quantizes the rows of W independently given H, so the candidates share one column loop, their
targets stacked row-wise. The choice is greedy per sub-layer: the MLP is searched on the quantized
stream that the chosen attention produces. Steps 1 and 4 are ``LayerQuantizer``'s own, so the layer's
weights are bit for bit those of a run configured with the chosen values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loaq.configs.schema import SearchConfig
from loaq.models.adapters import SubLayer
from loaq.quant import (ProjectedTermStats, QuantizedWeight, damp_hessian, gptq, loaq_target,
                        normalised_output_error, projected_terms, summed_kl)

from .arrays import MemoryArray, SampleArray, micro_batches
from .layer import CleanStream, LayerQuantizer, LayerResult, take_rows
from .tail import FullPrecisionTail


@dataclass
class SearchResult:
    """Per sub-layer: the strengths chosen (alpha_in, alpha_out, beta) and every candidate's score; the
    layer's result."""

    choice: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    scores: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)  # (alpha_out, beta, objective)
    layer: LayerResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class LayerSearch:
    """The search over ``search``'s candidates for one layer, on a ``LayerQuantizer`` of the layer
    built with the run's config (its solver settings, method, norms and alpha_in)."""

    def __init__(self, quantizer: LayerQuantizer, search: SearchConfig, tail: FullPrecisionTail | None = None):
        if search.objective == "kl" and tail is None:
            raise ValueError("the kl objective needs the model behind the layer (tail)")
        self.q, self.search, self.tail = quantizer, search, tail
        terms = quantizer.terms
        # Candidates that are equal once the method's unused terms are zeroed are tried once.
        self.candidates = list(dict.fromkeys((a if terms.lloa else 0.0, b if terms.soa else 0.0)
                                             for a, b in search.candidates()))

    @torch.no_grad()
    def run(self, clean: CleanStream, hq_in: SampleArray, hq_out: SampleArray, held_clean: CleanStream,
            held_in: SampleArray) -> SearchResult:
        """Quantize the layer with the chosen strengths; writes the quantized stream to ``hq_out``.
        ``held_clean``/``held_in``: both streams' input on the held-out windows (and the clean outputs)."""
        q = self.q
        names = list(clean.out)
        h, *outs = q.in_memory([clean.h, *clean.out.values()])
        clean = CleanStream(h, dict(zip(names, outs)))
        (hq,) = q.in_memory([hq_in])
        # The held-out arrays, a small share of the calibration's, are always read into memory.
        held_h, *held_outs = q.to_memory([held_clean.h, *held_clean.out.values()])
        held_clean = CleanStream(held_h, dict(zip(names, held_outs)))
        (held,) = q.to_memory([held_in])
        result = SearchResult()
        first, second = q.adapter.sublayers
        hq_mid, held_mid = MemoryArray(shape=hq.shape, dtype=q.dtype), MemoryArray(shape=held.shape, dtype=q.dtype)
        self._sublayer(0, first, clean, hq, hq_mid, held_clean, held, held_mid, result)
        self._sublayer(1, second, clean, hq_mid, hq_out, held_clean, held_mid, None, result)
        result.layer = q.result
        q.result.seconds = result.seconds = q.timer.as_dict()
        return result

    def _sublayer(self, position: int, sub: SubLayer, clean: CleanStream, hq: SampleArray, hq_next: SampleArray,
                  held_clean: CleanStream, held: SampleArray, held_next: MemoryArray | None,
                  result: SearchResult) -> None:
        q = self.q
        q.quantize_w_in(position, sub, clean, hq)
        linear = q.w_out[sub.name]
        W_out, bias = linear.weight.float(), None if linear.bias is None else linear.bias.float()
        terms, x_all = self._w_out_terms(position, sub, clean, hq, W_out, bias)
        q_outs = self._solve_stacked(W_out, terms.H, [terms.rhs(a, b) for a, b in self.candidates])
        del terms
        x_held = MemoryArray(shape=(*held.shape[:-1], W_out.shape[1]), dtype=q.dtype)
        for start, stop in micro_batches(held.shape[0], q.micro_batch):
            x_held.write(start, q.inner(sub, q.load(held, start, stop)))
        Qs = [q_out.weight.to(device=q.device, dtype=q.dtype) for q_out in q_outs]
        score = self._kl if self.search.objective == "kl" else self._noa
        scores = [(a, b, s) for (a, b), s in zip(self.candidates,
                                                 score(position, sub, held_clean, held, x_held, Qs, linear.bias))]
        alpha_out, beta, _ = min(scores, key=lambda s: s[2])  # the first of equal scores
        result.choice[sub.name] = (q.strengths[sub.name][0], alpha_out, beta)
        result.scores[sub.name] = scores
        q.strengths = {**q.strengths, sub.name: result.choice[sub.name]}
        q.quantize_w_out(position, sub, clean, hq, hq_next, x_all)
        if held_next is not None:
            Q = q.result.weights[sub.w_out].weight.to(device=q.device, dtype=q.dtype)
            q.advance(sub, held, held_next, Q, linear.bias, x_held)

    def _solve_stacked(self, W: torch.Tensor, H: torch.Tensor, rhs: list) -> list[QuantizedWeight]:
        """GPTQ of every candidate's target W + (H⁻¹R)ᵀ in one call: GPTQ treats the rows of W
        independently given H, so the targets stacked row-wise share one column loop."""
        q = self.q
        with q.timer("search_solve"):
            hessian = damp_hessian(H.clone(), q.settings.percdamp, overwrite=True)
            targets = [loaq_target(W, hessian, R) for R in rhs]
            hessian.drop_factor()
            stacked = gptq(torch.cat(targets), hessian, q.settings.spec, **q.settings.options).qweight
        rows = W.shape[0]
        return [take_rows(stacked, i * rows, (i + 1) * rows) for i in range(len(targets))]

    def _w_out_terms(self, position: int, sub: SubLayer, clean: CleanStream, hq: SampleArray,
                     W_out: torch.Tensor, bias: torch.Tensor | None) -> tuple[ProjectedTermStats, SampleArray]:
        """W_out's H and the two parts of its R through the W_in now installed, and its input X̂ on
        every window (in memory within the budget, else recomputed when read)."""
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
            h_b = q.flat(q.clean_input(clean, position, start, stop))
            y = q.flat(q.load(clean.out[sub.name], start, stop))
            with q.timer("search_stats"):
                D_lloa, D_soa, s_hat = projected_terms(h_b, y, q.flat(hq_b), q.flat(x), W_out, bias, eps)
                stats.add(q.flat(x), D_lloa, D_soa, s_hat)
        return stats, x_all

    def _noa(self, position: int, sub: SubLayer, clean: CleanStream, hq: SampleArray, x: SampleArray,
             Qs: list[torch.Tensor], bias: torch.Tensor | None) -> list[float]:
        """Each candidate's RMS-normalised output error of the sub-layer on the held-out windows."""
        q = self.q
        err, ref = [0.0] * len(Qs), 0.0
        for start, stop in micro_batches(hq.shape[0], q.micro_batch):
            u = q.flat(q.clean_input(clean, position, start, stop) + q.load(clean.out[sub.name], start, stop))
            hq_b, x_b = q.load(hq, start, stop), q.load(x, start, stop)
            with q.timer("score"):
                for i, Q in enumerate(Qs):
                    e, r = normalised_output_error(u, q.flat(hq_b + F.linear(x_b, Q, bias)), q.eps)
                    err[i] += e
                ref += r
        return [e / ref if ref else 0.0 for e in err]

    def _kl(self, position: int, sub: SubLayer, clean: CleanStream, hq: SampleArray, x: SampleArray,
            Qs: list[torch.Tensor], bias: torch.Tensor | None) -> list[float]:
        """Each candidate's mean KL per held-out token of the final next-token distribution from the
        full-precision model's: both streams after the sub-layer, through the full-precision tail.
        One window at a time, so only two (seqlen, vocab) log-probability arrays are held."""
        q, tail = self.q, self.tail
        kl, tokens = [0.0] * len(Qs), 0
        for start, stop in micro_batches(hq.shape[0], q.micro_batch):
            u = q.clean_input(clean, position, start, stop) + q.load(clean.out[sub.name], start, stop)
            hq_b, x_b = q.load(hq, start, stop), q.load(x, start, stop)
            with q.timer("score"):
                for w in range(u.shape[0]):
                    log_p = tail.log_probs(tail.hidden(position, u[w:w + 1]))
                    for i, Q in enumerate(Qs):
                        uq = hq_b[w:w + 1] + F.linear(x_b[w:w + 1], Q, bias)
                        kl[i] += summed_kl(log_p.flatten(0, -2), tail.log_probs(tail.hidden(position, uq)).flatten(0, -2))
                    tokens += log_p[..., 0].numel()
        return [k / tokens for k in kl]


class _Inner:
    """W_out's input X̂ = phi(Norm(ĥ) W_in) of ``hq``'s windows, recomputed when read (the search's
    stand-in for a cache that does not fit the host budget)."""

    def __init__(self, quantizer: LayerQuantizer, sub: SubLayer, hq: SampleArray, shape: tuple[int, ...]):
        self.q, self.sub, self.hq, self.shape = quantizer, sub, hq, shape

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.q.inner(self.sub, self.q.load(self.hq, start, stop))
