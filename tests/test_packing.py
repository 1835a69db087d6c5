"""Packed storage of quantized codes: exact round trip, packed size, and old records still read."""

from __future__ import annotations

import math

import pytest
import torch

import loaq.quant.packing as packing
from loaq.quant import QuantSpec, rtn
from loaq.quant.packing import pack_codes, packed_nbytes, unpack_codes
from loaq.stages.quantize import read_weights, weight_shapes, write_weights
from loaq.store import Store


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(3, 7), (17, 33), (64, 128), (1,)])
def test_pack_round_trip_is_exact_and_dense(bits, shape, monkeypatch):
    monkeypatch.setattr(packing, "_STEP", 64)  # several steps even for small arrays
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_pack_puts_the_first_code_in_the_low_bits():
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]


def test_unpack_refuses_a_wrong_length():
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (2, 4))


def _weights(bits):
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    return {"mlp.down_proj": rtn(W, QuantSpec(bits=bits, symmetric=False, group_size=32))}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_record_holds_packed_codes_and_reads_back_bit_identical(tmp_path, bits):
    weights = _weights(bits)
    store = Store(str(tmp_path / "store"))
    attrs = {"bits": bits, "group_size": 32, "shapes": weight_shapes(weights)}
    with store.writer("a" * 64, kind="weights", attrs=attrs) as w:
        write_weights(w, weights)
    record = store.open("a" * 64)
    assert record.shape("mlp.down_proj.packed") == (packed_nbytes(48 * 96, bits),)
    assert "mlp.down_proj.codes" not in record
    q = read_weights(record, ["mlp.down_proj"])["mlp.down_proj"]
    assert torch.equal(q.codes, weights["mlp.down_proj"].codes)
    assert torch.equal(q.weight, weights["mlp.down_proj"].dequantize())


def test_a_record_with_unpacked_codes_is_still_read(tmp_path):
    """Stores written before codes were packed hold them as uint8 arrays."""
    q0 = _weights(3)["mlp.down_proj"]
    store = Store(str(tmp_path / "store"))
    with store.writer("b" * 64, kind="weights", attrs={"bits": 3, "group_size": 32}) as w:
        w.put("mlp.down_proj.codes", q0.codes)
        w.put("mlp.down_proj.scales", q0.scales.float())
        w.put("mlp.down_proj.zeros", q0.zeros.float())
        w.put("mlp.down_proj.g_idx", q0.g_idx.to(torch.int32))
    q = read_weights(store.open("b" * 64), ["mlp.down_proj"])["mlp.down_proj"]
    assert torch.equal(q.codes, q0.codes) and torch.equal(q.weight, q0.dequantize())
