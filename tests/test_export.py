"""Export: checkpoints that plain transformers loads reproduce the pipeline's model; exports are cached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flowkit import make_checkpoint, run_cli, run_id, write_config
from loaq.cli import main
from loaq.configs.load import load_config
from loaq.models.export import packed_checkpoint_bytes
from loaq.store import Store

BOTH = "export.formats=[fake_quant, compressed_tensors]"

# Runs in a fresh interpreter in which loaq cannot be imported: only transformers (and, for the
# packed checkpoint, the compressed-tensors library it delegates to) reads the exports.
SCORE = r"""
import json, math, sys
sys.modules["loaq"] = None
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

windows = torch.load(sys.argv[1])
results = {}
for spec in sys.argv[2:]:
    path, mode = spec.rsplit("=", 1)
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if mode == "dequantize" else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    with torch.no_grad():
        logits = torch.cat([model(windows[i:i + 1]).logits.float() for i in range(windows.shape[0])])
    nll = torch.stack([F.cross_entropy(logits[i, :-1], windows[i, 1:]).double() for i in range(windows.shape[0])])
    out = f"{path}.{mode}.logits.pt"
    torch.save(logits, out)
    ids = AutoTokenizer.from_pretrained(path)("The quick brown fox.").input_ids
    results[spec] = {"ppl": math.exp(float(nll.mean())), "logits": out, "dtype": str(model.dtype), "ids": ids}
print("RESULT " + json.dumps(results))
"""


def score(windows: torch.Tensor, tmp: Path, *specs: str) -> dict:
    """Perplexity and logits of each ``folder=mode`` (mode: plain or dequantize), in a fresh process."""
    path = tmp / "windows.pt"
    torch.save(windows, path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCORE, str(path), *specs], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    for r in results.values():
        r["logits"] = torch.load(r["logits"])
    return results


def pipeline_windows(config_path: Path, folder: str, shared_data: str) -> torch.Tensor:
    """The pipeline's evaluation windows, tokenized with the exported tokenizer."""
    from transformers import AutoTokenizer
    from loaq.data.windows import eval_windows

    cfg = load_config(str(config_path))
    return eval_windows(AutoTokenizer.from_pretrained(folder), "wikitext2", cfg.evaluation.seqlen,
                        cfg.evaluation.max_windows, shared_data)


def quantized_ppl(store_url: Path) -> float:
    (ppl,) = [i.attrs["ppl"] for i in Store(str(store_url)).list(kind="eval") if i.attrs["quantized"]]
    return ppl


def run(config: Path, *overrides: str) -> dict:
    from loaq.flows.quantize import quantize_flow

    return quantize_flow(load_config(str(config), overrides))


def tensor_file(folder, name: str) -> Path:
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    return Path(folder) / index["weight_map"][name]




@pytest.fixture(scope="module")
def loaq_w3(tmp_path_factory, shared_data):
    """LoaQ W3 (channel-wise, asymmetric) on a tiny LLaMA, exported in both formats by `loaq run`."""
    root = tmp_path_factory.mktemp("export-w3")
    checkpoint = make_checkpoint(root / "model", layers=3)
    config = write_config(root / "tiny.yaml", checkpoint, root / "store", shared_data)
    result = run(config, BOTH)
    return {"root": root, "config": config, "checkpoint": checkpoint, "result": result}


def test_run_exports_both_formats_and_links_them_from_the_run(loaq_w3):
    exports = loaq_w3["result"]["exports"]
    assert set(exports) == {"fake_quant", "compressed_tensors"}
    for fmt, folder in exports.items():
        folder = Path(folder)
        assert folder.parent == loaq_w3["root"] / "exports" and folder.name.startswith(fmt)
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        # One shard per non-layer tensor (embedding, final norm, head), then one per layer.
        assert sorted(set(index["weight_map"].values()))[3:] == [f"model-0000{i}-of-00006.safetensors" for i in (4, 5, 6)]
        assert {index["weight_map"][f"model.layers.{i}.input_layernorm.weight"] for i in range(3)} == {
            f"model-0000{i}-of-00006.safetensors" for i in (4, 5, 6)}
        assert (loaq_w3["root"] / "runs" / "tiny" / f"export-{fmt}").resolve() == folder
    assert not list((loaq_w3["root"] / "exports").glob("*.partial"))
    config = json.loads((Path(exports["compressed_tensors"]) / "config.json").read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert config["quantization_config"]["format"] == "pack-quantized" and config["dtype"] == "float32"
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"]) == (3, "channel", False)


def test_exports_reproduce_the_pipeline_in_plain_transformers(loaq_w3, shared_data, tmp_path):
    exports = loaq_w3["result"]["exports"]
    windows = pipeline_windows(loaq_w3["config"], exports["fake_quant"], shared_data)
    fake, packed = f"{exports['fake_quant']}=plain", f"{exports['compressed_tensors']}=dequantize"
    results = score(windows, tmp_path, fake, packed)
    expected = quantized_ppl(loaq_w3["root"] / "store")
    assert abs(results[fake]["ppl"] / expected - 1) <= 1e-4, (results[fake]["ppl"], expected)
    assert results[fake]["dtype"] == "torch.float32"
    # The packed checkpoint, decompressed by transformers, gives the fake-quant model's logits.
    diff = (results[packed]["logits"] - results[fake]["logits"]).abs().max().item()
    assert diff <= 1e-5 * results[fake]["logits"].abs().max().item(), diff
    assert abs(results[packed]["ppl"] / expected - 1) <= 1e-4
    # The exported tokenizer is the source model's.
    from transformers import AutoTokenizer
    assert results[fake]["ids"] == AutoTokenizer.from_pretrained(loaq_w3["checkpoint"])("The quick brown fox.").input_ids


def test_symmetric_grouped_act_order_packs_and_loads_compressed(tmp_path, shared_data):
    """GPTQ act_order with static groups, symmetric g32 on Qwen2 (q/k/v biases): transformers loads the
    packed checkpoint both ways (kept compressed until the first forward, and dequantized at load)."""
    checkpoint = make_checkpoint(tmp_path / "model", family="qwen2", layers=2)
    config = write_config(tmp_path / "q.yaml", checkpoint, tmp_path / "store", shared_data, method="gptq", bits=4,
                          symmetric=True, group_size=32, act_order=True)
    exports = run(config, BOTH)["exports"]
    windows = pipeline_windows(config, exports["fake_quant"], shared_data)
    specs = [f"{exports['fake_quant']}=plain", f"{exports['compressed_tensors']}=plain",
             f"{exports['compressed_tensors']}=dequantize"]
    results = score(windows, tmp_path, *specs)
    expected = quantized_ppl(tmp_path / "store")
    reference = results[specs[0]]["logits"]
    for spec in specs:
        assert abs(results[spec]["ppl"] / expected - 1) <= 1e-4, (spec, results[spec]["ppl"], expected)
        assert (results[spec]["logits"] - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    with safe_open(tensor_file(exports["compressed_tensors"], "model.layers.0.self_attn.q_proj.bias"), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.0.self_attn.q_proj.weight_packed" in names
    assert not any(n.endswith("weight_zero_point") for n in names)  # symmetric: no zero points


@pytest.fixture(scope="module")
def rtn_store(tmp_path_factory, shared_data):
    """RTN W4 and W3 (channel-wise) of a wider tiny LLaMA (hidden 256), quantized without export."""
    root = tmp_path_factory.mktemp("export-rtn")
    checkpoint = make_checkpoint(root / "model", layers=2, hidden=256)
    config = write_config(root / "wide.yaml", checkpoint, root / "store", shared_data, method="rtn", bits=4)
    for bits in (4, 3):
        run(config, f"quantize.bits={bits}")
    return {"root": root, "config": config}


def test_packed_bytes_per_bit_width(rtn_store, capsys):
    ratios = {}
    for bits in (4, 3):
        assert main(["export", str(rtn_store["config"]), "--set", f"quantize.bits={bits}",
                     "--format", "compressed_tensors"]) == 0
        folder = capsys.readouterr().out.split("compressed_tensors (float32, W%d): " % bits)[1].split()[0]
        packed, fp16 = packed_checkpoint_bytes(folder)
        ratios[bits] = packed / fp16
        attrs = json.loads((Path(folder) / "loaq-export.json").read_text())
        assert attrs["linear_bytes"] == packed and attrs["linear_fp16_bytes"] == fp16
    print(f"packed bytes / fp16 bytes of the quantized linears (hidden 256): W4 {ratios[4]:.4f}, W3 {ratios[3]:.4f}")
    assert ratios[4] <= 0.27
    assert ratios[3] <= 0.21  # 3-bit codes pack densely (3 bits each) in compressed-tensors >= 0.20


def test_reexport_computes_nothing(rtn_store, capsys):
    args = ["export", str(rtn_store["config"]), "--format", "fake_quant", "--format", "compressed_tensors"]
    assert main(args) == 0
    first = capsys.readouterr().out
    folders = [Path(l.split(": ")[1].split()[0]) for l in first.splitlines() if l.startswith("export ")]
    stamps = {f: [(p.name, p.stat().st_mtime_ns) for p in sorted(f.iterdir())] for f in folders}
    assert main(args) == 0
    second = capsys.readouterr().out
    events = Store(str(rtn_store["root"] / "store")).events(second.split("run id: ")[1].split()[0])
    assert [(e["stage"], e["action"]) for e in events] == [("export", "reused")] * 2
    assert stamps == {f: [(p.name, p.stat().st_mtime_ns) for p in sorted(f.iterdir())] for f in folders}


def test_export_of_a_run_not_quantized_names_what_to_run(rtn_store, capsys):
    assert main(["export", str(rtn_store["config"]), "--set", "quantize.bits=2"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("loaq:")]
    assert len(err) == 1 and "loaq run" in err[0], err


@pytest.mark.parametrize("overrides, field", [
    (["quantize.bits=16"], "quantize.bits"),
    (["quantize.method=gptq", "quantize.act_order=true", "quantize.group_size=32", "quantize.static_groups=false"],
     "quantize.static_groups"),
    (["quantize.group_size=48"], "quantize.group_size"),
    (["quantize.grid_init=neuqi"], "quantize.grid_init"),
    (["quantize.bits=4", "quantize.act_bits=4"], "quantize.act_bits"),
])
def test_unpackable_scheme_fails_before_any_work(tmp_path, shared_data, capsys, overrides, field):
    checkpoint = make_checkpoint(tmp_path / "model", layers=2)
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    args = ["run", str(config), "--set", "export.formats=[compressed_tensors]"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("loaq:")]
    assert len(lines) == 1 and lines[0].startswith("loaq: error: ") and field in lines[0], err
    assert "Traceback" not in err
    assert not Store(str(tmp_path / "store")).list(kind="weights")


def test_killed_export_leaves_no_finished_checkpoint(rtn_store):
    config = str(rtn_store["config"])
    args = ["export", config, "--format", "fake_quant", "--set", "export.dtype=float16"]
    killed = run_cli(*args, env={"LOAQ_FAILPOINT": "export:0:after"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    exports = rtn_store["root"] / "exports"
    partial = [p for p in exports.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and not Path(str(partial[0])[: -len(".partial")]).exists()
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    events = Store(str(rtn_store["root"] / "store")).events(run_id(done))
    assert [(e["stage"], e["action"]) for e in events] == [("export", "computed")]
    folder = Path(str(partial[0])[: -len(".partial")])
    assert not partial[0].exists() and json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    with safe_open(tensor_file(folder, "model.layers.0.mlp.down_proj.weight"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float16


def test_presets_export_nothing():
    for preset in ("default", "paper"):
        assert load_config(preset).export.formats == ()
