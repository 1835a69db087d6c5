"""Stage: quantize decoder layer l (Algorithm 1, lines 3-21) and advance the quantized stream.

The quantized chain's identity (``stages.keys.chain_keys``): key_l = hash(key_{l-1}, config_l), rooted at
the embedding record (which is keyed by model and calibration). Two variants that agree on
layers 0..k share those layers' records; a crash resumes at the first layer whose records are not
complete. Each layer writes two records: its quantized weights (kind "weights", small, always kept)
and the quantized stream after it (kind "quant_state", large, subject to retention).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NONE

from loaq.configs.schema import QuantizeConfig
from loaq.engine.layer import CleanStream, LayerQuantizer, LayerResult
from loaq.engine.metrics import DivergenceMeter, outlier_threshold
from loaq.models.layers import ContextFactory
from loaq.quant import QuantizedWeight
from loaq.quant.packing import pack_codes, unpack_codes

from . import interrupt
from .arrays import RecordArray, WriterArray
from .context import StageContext, failpoint
from .keys import config_identity, weights_key
from .model import ModelRef
from .streams import HIDDEN, sublayer_output

WEIGHT_PARTS = ("codes", "scales", "zeros", "g_idx")
# Codes are stored densely packed (``{name}.packed``, shape in the record's ``shapes`` attr);
# records written before hold them as uint8 (``{name}.codes``) and are still read.
PACKED = "packed"


def weight_shapes(weights: dict[str, QuantizedWeight]) -> dict[str, list[int]]:
    return {name: list(q.weight.shape) for name, q in weights.items()}


def write_weights(writer, weights: dict[str, QuantizedWeight]) -> None:
    """Write each linear's packed codes, scales, zeros and g_idx (its shape goes in the attrs, see
    ``weight_shapes``)."""
    for name, q in weights.items():
        if q.codes is None:  # 16-bit sanity runs: nothing quantized, keep the weight itself
            writer.put(f"{name}.weight", q.weight.float().contiguous())
            continue
        writer.put(f"{name}.{PACKED}", pack_codes(q.codes, q.bits))
        writer.put(f"{name}.scales", q.scales.float().contiguous())
        writer.put(f"{name}.zeros", q.zeros.float().contiguous())
        writer.put(f"{name}.g_idx", q.g_idx.to(torch.int32).contiguous())


def read_weights(record, names) -> dict[str, QuantizedWeight]:
    out = {}
    bits, group_size = record.attrs["bits"], record.attrs["group_size"]
    for name in names:
        if f"{name}.weight" in record:
            w = record.read(f"{name}.weight")
            out[name] = QuantizedWeight(w, None, None, None, None, bits, group_size)
            continue
        if f"{name}.{PACKED}" in record:
            codes = unpack_codes(record.read(f"{name}.{PACKED}"), bits, tuple(record.attrs["shapes"][name]))
        else:
            codes = record.read(f"{name}.codes")
        scales, zeros, g_idx = (record.read(f"{name}.{p}") for p in WEIGHT_PARTS[1:])
        q = QuantizedWeight(None, codes, scales, zeros, g_idx, bits, group_size)
        q.weight = q.dequantize()
        out[name] = q
    return out


class _MeteredArray:
    """Writes the quantized stream and, on the way, measures its drift from the clean one."""

    def __init__(self, target: WriterArray, clean: RecordArray, meter: DivergenceMeter):
        self.target, self.clean, self.meter, self.shape = target, clean, meter, target.shape

    def read(self, start, stop):
        raise TypeError("array is being written")

    def write(self, start: int, values: torch.Tensor) -> None:
        self.target.write(start, values)
        self.meter.add(self.clean.read(start, start + values.shape[0]), values)


def stored_clean_stream(ctx: StageContext, adapter, input_key: str, output_key: str) -> CleanStream:
    """The clean stream through a layer from its stored input and output records."""
    out = ctx.store.open(output_key)
    return CleanStream(RecordArray(ctx.store.open(input_key), HIDDEN),
                       {sub.name: RecordArray(out, sublayer_output(sub.name)) for sub in adapter.sublayers})


def stored_layer(ctx: StageContext, model: ModelRef, index: int, cfg: QuantizeConfig, quant_input_key: str,
                 clean_input_key: str, clean_output_key: str
                 ) -> tuple[LayerQuantizer, CleanStream, RecordArray, RecordArray]:
    """Layer ``index``'s quantizer and its streams from the store: the clean stream through it, the
    quantized stream's input, and the clean output."""
    rt = ctx.runtime
    checkpoint = model.open()
    hq_in = RecordArray(ctx.store.open(quant_input_key), HIDDEN)
    clean = stored_clean_stream(ctx, checkpoint.adapter, clean_input_key, clean_output_key)
    contexts = ContextFactory(checkpoint.adapter, checkpoint.config, rt.device)
    quantizer = LayerQuantizer(checkpoint.adapter, checkpoint.config, index, checkpoint.layer_state(index), cfg,
                               contexts, device=rt.device, dtype=rt.dtype, micro_batch=rt.micro_batch,
                               input_transforms=checkpoint.input_transforms(index))
    return quantizer, clean, hq_in, RecordArray(ctx.store.open(clean_output_key), HIDDEN)


def store_layer(ctx: StageContext, index: int, cfg: QuantizeConfig, chain_id: str, chain_key: str,
                shape: tuple[int, ...], clean_out: RecordArray, compute: Callable[[Any], LayerResult]) -> None:
    """Write layer ``index``'s records under ``chain_key``: the quantized stream after it, which
    ``compute(out)`` writes into ``out`` (its drift from ``clean_out`` measured on the way), and the
    weights of the ``LayerResult`` it returns."""
    rt = ctx.runtime
    w_key = weights_key(chain_key)
    meter = DivergenceMeter(outlier_threshold(clean_out, micro_batch=rt.micro_batch))
    # `chain` names the variant (root + config) so retention can keep only its last layer's states.
    attrs = {"layer": index, "chain": chain_id, "method": cfg.method}
    with ctx.store.writer(chain_key, kind="quant_state", attrs=attrs, overwrite=True) as w:
        hq_out = _MeteredArray(WriterArray(w, HIDDEN, shape, rt.dtype, rt.micro_batch,
                                           point=f"quantize-layer:{index}:mid"), clean_out, meter)
        result = compute(hq_out)
    divergence = meter.result()
    if not ctx.store.is_complete(w_key):
        with ctx.store.writer(w_key, kind="weights", overwrite=True,
                              attrs={"layer": index, "bits": cfg.bits, "group_size": cfg.group_size,
                                     "symmetric": cfg.symmetric, "config": config_identity(cfg, index),
                                     "strengths": {k: list(v) for k, v in cfg.layer_strengths(index).items()},
                                     "solver": result.solver, "divergence": divergence, "seconds": result.seconds,
                                     "linears": list(result.weights),
                                     "shapes": weight_shapes(result.weights)}) as w:
            write_weights(w, result.weights)


@task(name="quantize-layer", cache_policy=NONE)
def quantize_layer_stage(ctx: StageContext, model: ModelRef, index: int, cfg: QuantizeConfig, chain_id: str,
                         chain_key: str, quant_input_key: str, clean_input_key: str, clean_output_key: str) -> str:
    """Quantize layer ``index``; returns its chain key (both of its records complete)."""
    if ctx.store.is_complete(chain_key) and ctx.store.is_complete(weights_key(chain_key)):
        ctx.store.log_event(ctx.run_id, "quantize-layer", chain_key, "reused")
        return chain_key
    started = time.perf_counter()
    interrupt.check()
    failpoint(f"quantize-layer:{index}:before")
    quantizer, clean, hq_in, clean_out = stored_layer(ctx, model, index, cfg, quant_input_key, clean_input_key,
                                                      clean_output_key)
    store_layer(ctx, index, cfg, chain_id, chain_key, hq_in.shape, clean_out,
                lambda out: quantizer.run(clean if cfg.needs_clean_stream() else None, hq_in, out))
    failpoint(f"quantize-layer:{index}:after")
    ctx.store.log_event(ctx.run_id, "quantize-layer", chain_key, "computed", seconds=time.perf_counter() - started)
    return chain_key
