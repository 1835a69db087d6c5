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
from loaq.engine.sources import with_activation_quantizer
from loaq.evaluation.perplexity import perplexity
from loaq.models.layers import add_input_transforms

from . import interrupt
from .context import StageContext
from .keys import perplexity_key, weights_key, zero_shot_key
from .model import ModelRef
from .quantize import read_weights


class StoredQuantizedWeights:
    """A ``WeightSource``: the checkpoint with each layer's linears replaced by stored quantized weights.

    A layer quantized with activation bits (its record's config has ``act_bits``) also quantizes the
    inputs of its quantized linears per token, after the checkpoint's own input transforms: the
    evaluated model computes what the quantized stream computed during calibration.
    """

    def __init__(self, checkpoint, store, chain: list[str]):
        self.base, self.store, self.chain = checkpoint, store, chain
        self.config, self.adapter, self.num_layers = checkpoint.config, checkpoint.adapter, checkpoint.num_layers

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        interrupt.check()
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

    def input_transforms(self, index: int):
        attrs = self.store.open(weights_key(self.chain[index])).attrs
        return with_activation_quantizer(self.base.input_transforms(index), attrs["linears"],
                                         attrs["config"].get("act_bits"))


def dataset_label(dataset: str, data_dir: str | None) -> str:
    return "WikiText-2 test" if dataset == "wikitext2" else c4_validation_label(data_dir)


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


def load_whole(source, dtype: torch.dtype, device: str):
    """The whole model for lm-eval, built layer by layer from ``source`` (FP or quantized weights).

    lm-eval scores a complete ``transformers`` model, so this one stage holds every layer at once
    (on the device, or offloaded by the user's ``accelerate`` setup for models that do not fit).
    """
    from transformers import AutoModelForCausalLM

    # The source's config, not the files': a rotated model's head is no longer tied to its embedding.
    tied = getattr(source.config, "tie_word_embeddings", False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(source.config, dtype=dtype)
    state = {source.adapter.embed: source.embed_weight(), source.adapter.final_norm: source.final_norm_weight()}
    if not tied:
        state[source.adapter.lm_head] = source.lm_head_weight()
    for index in range(source.num_layers):
        prefix = source.adapter.layer_prefix.format(index=index)
        state.update({prefix + k: v for k, v in source.layer_state(index).items()})
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True, strict=False)
    # Online input transforms (a rotated model's Hadamard on down_proj's input, a W4A4 model's activation
    # quantizer) are not weights.
    for index in range(source.num_layers):
        add_input_transforms(model.model.layers[index], source.input_transforms(index))
    # Non-persistent buffers (rotary frequencies) are not in any state dict: build them for real.
    model.model.rotary_emb = source.adapter.resolve("rotary_embedding")(config=model.config).to(device)
    if tied:
        model.tie_weights()
    return model.eval()


@task(name="zero-shot", cache_policy=NONE)
def zero_shot_stage(ctx: StageContext, model: ModelRef, chain: list[str] | None, cfg: EvaluationConfig,
                    data_dir: str | None) -> str:
    from loaq.evaluation.zeroshot import zero_shot

    key = zero_shot_key(ctx, model, chain, cfg, data_dir)

    def compute():
        rt = ctx.runtime
        checkpoint = model.open()
        source = StoredQuantizedWeights(checkpoint, ctx.store, chain) if chain else checkpoint
        whole = load_whole(source, rt.dtype, rt.device)
        results = zero_shot(whole, checkpoint.tokenizer(), list(cfg.zero_shot_tasks), data_dir, cfg.zero_shot_limit)
        with ctx.store.writer(key, kind="eval", attrs={"zero_shot": results, "quantized": chain is not None}) as w:
            w.put("tasks", torch.tensor(len(cfg.zero_shot_tasks)))

    return ctx.cached("zero-shot", key, compute)
