"""Stage: perplexity of the full-precision or the quantized model, cached by the model it evaluates.

The quantized model is identified by its last chain key (which determines every layer's weights);
the full-precision one by the model key. Evaluation streams layers like quantization does: the
quantized weights are read from their layer records one layer at a time.
"""

from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.schema import EvaluationConfig
from loaq.data.text import c4_validation_label
from loaq.data.windows import eval_windows
from loaq.evaluation.perplexity import perplexity
from loaq.store.keys import stage_key

from .context import StageContext
from .model import ModelRef
from .quantize import read_weights, weights_key
from .streams import data_identity

EVAL_VERSION = 1


class StoredQuantizedWeights:
    """A ``WeightSource``: the checkpoint with each layer's linears replaced by stored quantized weights."""

    def __init__(self, checkpoint, store, chain: list[str]):
        self.base, self.store, self.chain = checkpoint, store, chain
        self.config, self.adapter, self.num_layers = checkpoint.config, checkpoint.adapter, checkpoint.num_layers

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        state = dict(self.base.layer_state(index))
        record = self.store.open(weights_key(self.chain[index]))
        for name, q in read_weights(record, record.attrs["linears"]).items():
            state[f"{name}.weight"] = q.weight.to(state[f"{name}.weight"].dtype)
        return state

    def embed_weight(self):
        return self.base.embed_weight()

    def final_norm_weight(self):
        return self.base.final_norm_weight()

    def lm_head_weight(self):
        return self.base.lm_head_weight()


def dataset_label(dataset: str, data_dir: str | None) -> str:
    return "WikiText-2 test" if dataset == "wikitext2" else c4_validation_label(data_dir)


def perplexity_key(ctx: StageContext, model: ModelRef, chain: list[str] | None, dataset: str,
                   cfg: EvaluationConfig, data_dir: str | None) -> str:
    return stage_key("perplexity", EVAL_VERSION, model=model.key, quantized=chain[-1] if chain else None,
                     dataset=dataset, seqlen=cfg.seqlen, max_windows=cfg.max_windows, data=data_identity(data_dir),
                     dtype=str(ctx.runtime.dtype))


@task(name="perplexity", cache_policy=NONE)
def perplexity_stage(ctx: StageContext, model: ModelRef, chain: list[str] | None, dataset: str,
                     cfg: EvaluationConfig, data_dir: str | None) -> str:
    quantized = chain[-1] if chain else None
    key = perplexity_key(ctx, model, chain, dataset, cfg, data_dir)

    def compute():
        rt = ctx.runtime
        checkpoint = model.open()
        windows = eval_windows(checkpoint.tokenizer(), dataset, cfg.seqlen, cfg.max_windows, data_dir)
        source = StoredQuantizedWeights(checkpoint, ctx.store, chain) if chain else checkpoint
        ppl, nll = perplexity(source, windows, device=rt.device, dtype=rt.dtype, micro_batch=rt.micro_batch)
        attrs = {"ppl": ppl, "dataset": dataset, "label": dataset_label(dataset, data_dir),
                 "windows": int(windows.shape[0]), "seqlen": cfg.seqlen, "quantized": quantized is not None}
        with ctx.store.writer(key, kind="eval", attrs=attrs) as w:
            w.put("nll", nll)

    return ctx.cached("perplexity", key, compute)
