"""The per-layer search scored by the loss-gradient-weighted (Fisher diagonal) error instead of NOA.

The full-precision model's gradient of the summed next-token NLL of the search's held-out windows
(``data.calibration.sample_holdout``) at each sub-layer's output (the residual stream after attention
and after the MLP), one backward pass of transformers' model; then the pipeline's search with
``LayerSearch._score`` replaced by sum (g * (h_hat + Y_hat - h - Y))^2 on the held-out windows.
Everything else (candidates, solves, the choice per sub-layer, the stored records) is the product's
search. A store of its own: the search record's key does not name this objective. Writes
``bench/results/search_fisher_<bits>.json`` (perplexity and the choice per layer).

    .venv/bin/python bench/search_fisher.py --bits 3 [--holdout 1]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from loaq.configs.load import load_config  # noqa: E402
from loaq.data.calibration import sample_holdout  # noqa: E402
from loaq.engine import search  # noqa: E402
from loaq.engine.arrays import micro_batches  # noqa: E402
from loaq.flows.quantize import open_context, quantize_flow  # noqa: E402
from loaq.stages.model import prepare_model  # noqa: E402
from loaq.stages.report import weights_rows  # noqa: E402
from loaq.stages.streams import calibration_spec  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def held_out_gradients(config, samples: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, sub-layer) -> d(sum of NLL)/d(residual stream after the sub-layer): (n, seqlen, d) for the
    text's own next tokens (``samples`` 0), else (samples, n, seqlen, d), each for labels drawn from
    the full-precision model's own next-token distribution (so that the mean of (g . e)^2 over the
    draws is e's second-order KL, e^T F e, F the model's Fisher)."""
    ctx = open_context(config)
    checkpoint = prepare_model.fn(config.model, ctx.model_cache).open()
    spec = calibration_spec(config.calibration)
    tokens = sample_holdout(checkpoint.tokenizer(), spec, config.quantize.search.held_windows(spec.n_samples),
                            config.data_dir)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, torch_dtype=torch.float32)
    grads = {}

    def keep(index, name):
        return lambda g: grads.setdefault((index, name), []).append(g.detach().clone())

    for i, layer in enumerate(model.model.layers):
        # The attention's residual output is the post-attention norm's input; the MLP's is the layer's output.
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: a[0].register_hook(keep(i, "attn")) and None)
        layer.register_forward_hook(
            lambda m, a, o, i=i: (o[0] if isinstance(o, tuple) else o).register_hook(keep(i, "mlp")) and None)
    generator = torch.Generator().manual_seed(0)
    chunks = tokens.split(4)  # windows are independent: a few at a time bounds the logits' memory
    for chunk in chunks:
        if not samples:
            out = model(chunk, labels=chunk)
            (out.loss * chunk.numel()).backward()
            continue
        logp = model(chunk).logits.log_softmax(-1)
        probs = logp.detach().exp().flatten(0, 1)
        for s in range(samples):
            y = torch.multinomial(probs, 1, generator=generator).view(chunk.shape)
            (-logp.gather(-1, y[..., None]).sum()).backward(retain_graph=s < samples - 1)
    if not samples:
        return {k: torch.cat(v) for k, v in grads.items()}
    return {k: torch.stack([torch.cat(v[s::samples]) for s in range(samples)]) for k, v in grads.items()}


def fisher_score(grads, sampled: bool):
    def score(self, position, sub, clean, hq, x, Q, bias):
        q, err = self.q, 0.0
        Q = Q.to(device=q.device, dtype=q.dtype)
        g_all = grads[(q.index, sub.name)]
        for start, stop in micro_batches(hq.shape[0], q.micro_batch):
            u = q.clean_input(clean, position, start, stop) + q.load(clean.out[sub.name], start, stop)
            uq = q.load(hq, start, stop) + torch.nn.functional.linear(q.load(x, start, stop), Q, bias)
            if sampled:  # the mean over draws of (g . e)^2 per token
                err += float(((g_all[:, start:stop] * (uq - u)).sum(-1) ** 2).mean(0).sum())
            else:
                err += float(((g_all[start:stop] * (uq - u)) ** 2).sum())
        return err
    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--store", default=".loaq/bench-search-fisher")
    ap.add_argument("--holdout", type=float, default=0.25, help="quantize.search.holdout")
    ap.add_argument("--samples", type=int, default=0,
                    help="0: the text's own labels, diagonal weighting; k: k label draws from the model (KL)")
    args = ap.parse_args()
    config = load_config("default", [f"store.url={args.store}", "evaluation.datasets=[wikitext2]",
                                     f"quantize.bits={args.bits}",
                                     "quantize.search={alpha: [0.25, 0.5, 0.75], beta: [0.0, 0.25, 0.5], "
                                     f"holdout: {args.holdout}}}"])
    search.LayerSearch._score = fisher_score(held_out_gradients(config, args.samples), args.samples > 0)
    result = quantize_flow(config)
    ctx = open_context(config)
    ppl = {d: ctx.store.open(k["quantized"]).attrs["ppl"] for d, k in result["evals"].items()}
    choice = [{sub: s[1:] for sub, s in row["strengths"].items()} for row in weights_rows(ctx, result["weights"])]
    print(f"W{args.bits} search, fisher objective, holdout {args.holdout:g}: WikiText-2 {ppl['wikitext2']:.3f}")
    for i, c in enumerate(choice):
        print(f"  layer {i:2d}: attn (alpha_out, beta) {c['attn']}  mlp {c['mlp']}")
    RESULTS.mkdir(exist_ok=True)
    name = (f"search_fisher_{args.bits}" + ("" if args.holdout == 0.25 else f"_holdout{args.holdout:g}")
            + (f"_kl{args.samples}" if args.samples else ""))
    (RESULTS / f"{name}.json").write_text(json.dumps({"bits": args.bits, "holdout": args.holdout, "samples": args.samples, "ppl": ppl,
                                                      "choice": choice}, indent=1))


if __name__ == "__main__":
    main()
