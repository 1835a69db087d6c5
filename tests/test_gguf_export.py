"""GGUF export: llama.cpp blocks that hold loaq's codes exactly, a file that transformers' GGUF loader
and the gguf reader open, metadata and names as in the embedded SmolLM2 GGUF, and one-line refusals."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowkit import error_line, write_config
from gguf_kit import make_bpe_checkpoint
from loaq.cli import main
from loaq.models.gguf_export import (BLOCK_TYPES, gguf_tokenizer_fields, hf_tokenizer_fields, hparams, name_map,
                                     pack_blocks, permute_rows)

TYPES = {t.name: t for t in BLOCK_TYPES}


def _grid(name: str, n_out: int, n_in: int, group: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = TYPES[name]
    groups = n_in // (group or n_in)
    # scales of real weights (1e-3..5e-2): normal fp16 numbers
    scales = torch.exp(torch.randn(n_out, groups, generator=g, dtype=torch.float64) * 0.6 - 5).float()
    if t.symmetric:
        zeros = torch.full((n_out, groups), float(1 << (t.bits - 1)))
    else:
        zeros = torch.randint(0, 1 << t.bits, (n_out, groups), generator=g).float()
    codes = torch.randint(0, 1 << t.bits, (n_out, n_in), generator=g, dtype=torch.uint8)
    return codes, scales, zeros


@pytest.mark.parametrize("name, group", [("Q4_1", 32), ("Q4_1", 64), ("Q4_1", None), ("Q4_0", 32), ("Q8_0", 32),
                                         ("Q8_0", None)])
def test_blocks_dequantize_bit_exactly_in_gguf(name, group):
    import gguf

    t = TYPES[name]
    codes, scales, zeros = _grid(name, 48, 128, group)
    packed = pack_blocks(codes, scales, zeros, group, t)
    assert packed.shape == (48, 128 // 32 * t.block_bytes)
    got = gguf.quants.dequantize(packed, t.qtype)
    per = (group or 128)
    s = scales.double().repeat_interleave(per, dim=1)
    z = zeros.double().repeat_interleave(per, dim=1)
    d16 = s.numpy().astype(np.float16).astype(np.float32)
    c = codes.numpy().astype(np.float32)
    if name == "Q4_1":  # ggml: y = d*q + m, both fp16, in float32
        expected = d16 * c + (-s * z).numpy().astype(np.float16).astype(np.float32)
    else:  # y = d * (q - zero)
        expected = d16 * (c - float(1 << (t.bits - 1)))
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    # Against loaq's own dequantized weight, only the fp16 rounding of d (and m) differs.
    exact = (s * (codes.double() - z)).numpy()
    bound = s.numpy() * 2 ** (t.bits + 1) * 2.0 ** -11  # |code| and |zero| below 2^bits, each rounded once
    assert np.all(np.abs(got - exact) <= bound)
    assert not np.array_equal(got, exact.astype(np.float32))


def test_q_and_k_rows_follow_llama_cpp_order():
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    w = torch.arange(8 * 4 * 3, dtype=torch.float32).reshape(8 * 4, 3)
    permuted = permute_rows(w, 4)
    assert not torch.equal(permuted, w)
    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": 4, "num_key_value_heads": 4})
    back = processor.process(weights=permuted.numpy(), name="blk.0.attn_q.weight").weights
    assert np.array_equal(back, w.numpy())


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("gguf")
    checkpoint = make_bpe_checkpoint(root / "tiny-bpe")
    config = write_config(root / "c.yaml", checkpoint, root / "store", shared_data, method="rtn", bits=4, group_size=32)
    assert main(["run", str(config), "--set", "export.formats=[gguf, fake_quant]"]) == 0
    gguf_dir = Path(glob.glob(str(root / "exports" / "gguf-*"))[0])
    fake = Path(glob.glob(str(root / "exports" / "fake_quant-*"))[0])
    return root, config, gguf_dir, fake


def test_export_reads_back_in_the_gguf_reader(tiny_export):
    import gguf

    _, _, gguf_dir, fake = tiny_export
    reader = gguf.GGUFReader(gguf_dir / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    linears = [n for n in types if n.split(".")[-2] in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                          "ffn_up", "ffn_down")]
    assert len(linears) == 14 and all(types[n] == "Q4_1" for n in linears)
    assert types["token_embd.weight"] == "F32" and types["blk.1.attn_norm.weight"] == "F32"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["general.file_type"].contents() == 3
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    mark = json.loads((gguf_dir / "loaq-export.json").read_text())
    assert mark["block_type"] == "Q4_1" and mark["total_bytes"] == (gguf_dir / "model.gguf").stat().st_size
    from safetensors.torch import load_file

    fq = {}
    for f in fake.glob("*.safetensors"):
        fq.update(load_file(f))
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    w = gguf.quants.dequantize(q.data, q.tensor_type)
    ref = permute_rows(fq["model.layers.1.self_attn.q_proj.weight"].float(), 4).numpy()
    assert np.abs(w - ref).max() <= np.abs(ref).max() * 2.0 ** -10


def test_export_loads_in_transformers_gguf_loader(tiny_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, gguf_dir, fake = tiny_export
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf", dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32).eval()
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for name, w in want.items():
        if name.endswith("proj.weight"):  # quantized: the fp16 rounding of scales and mins only
            assert (got[name] - w).abs().max() <= w.abs().max() * 2.0 ** -10, name
            assert not torch.equal(got[name], w)
        else:
            assert torch.equal(got[name], w), name
    ids = torch.randint(0, 260, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert (a - b).abs().max() < 1e-2 * b.abs().max()
    text = "the theater <|im_start|>user\nin the north<|im_end|>"
    assert AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")(text).input_ids == \
        AutoTokenizer.from_pretrained(fake)(text).input_ids


def test_reexport_computes_nothing(tiny_export, capsys):
    _, config, gguf_dir, _ = tiny_export
    before = (gguf_dir / "model.gguf").stat().st_mtime_ns
    assert main(["export", str(config), "--format", "gguf"]) == 0
    assert f"export gguf" in capsys.readouterr().out
    assert (gguf_dir / "model.gguf").stat().st_mtime_ns == before



@pytest.mark.parametrize("overrides, expected", [
    (["quantize.bits=3"], ["W3 asymmetric has no exact llama.cpp block type", "Q4_1", "Q4_0", "Q8_0"]),
    (["quantize.bits=8"], ["W8 asymmetric", "W8 symmetric -> Q8_0"]),
    (["quantize.bits=4", "quantize.group_size=16"], ["group_size 16 is not a multiple of 32"]),
    (["quantize.bits=4", "model.rotation.kind=hadamard"], ["model.rotation.kind=hadamard", "fake_quant"]),
])
def test_unmappable_scheme_is_one_line_before_any_work(tmp_path, capsys, shared_data, tiny_export, overrides, expected):
    root = tiny_export[0]
    config = write_config(tmp_path / "c.yaml", root / "tiny-bpe", tmp_path / "store", shared_data, method="rtn")
    args = ["run", str(config), "--set", "export.formats=[gguf]"]
    for o in overrides:
        args += ["--set", o]
    line = error_line(capsys, args)
    for part in expected:
        assert part in line, line
    assert not (tmp_path / "store" / "records").exists() or not any((tmp_path / "store" / "records").iterdir())


def test_names_and_metadata_match_the_embedded_smollm2_gguf(smollm2):
    import gguf

    source, checkpoint = smollm2
    reader = gguf.GGUFReader(source)
    names = name_map("llama", checkpoint.num_layers)
    ours = {names(n) for n in checkpoint.tensor_names()}
    assert ours == {t.name for t in reader.tensors}
    for key, (value, _) in hparams(checkpoint.config, "llama").items():
        assert reader.fields[key].contents() == pytest.approx(value, rel=1e-7), key
    theirs = {k: v for k, v, *_ in gguf_tokenizer_fields(source)}
    built = {k: v for k, v, *_ in hf_tokenizer_fields(checkpoint.path)}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert built[key] == theirs[key], key
