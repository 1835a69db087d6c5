"""Do a run's exported checkpoints reproduce the pipeline? Loads the fake-quant and the packed
(compressed-tensors) export of an exported run in a fresh process with plain transformers (loaq
cannot be imported there), scores the run's own evaluation windows, and compares with the
pipeline's stored perplexity; the packed checkpoint's logits are compared with the fake-quant
one's. Also reports the packed bytes of the quantized linears against their fp16 bytes, read from
the files. Appends a row to ``bench/results/export_check.json``.

    .venv/bin/loaq run default --set 'export.formats=[fake_quant, compressed_tensors]'
    .venv/bin/python bench/export_check.py default [--set quantize.bits=4 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loaq.models.export import packed_checkpoint_bytes

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]

# One window at a time: a 49k vocabulary makes the logits of all windows gigabytes.
SCORE = r"""
import json, math, sys
sys.modules["loaq"] = None
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

windows = torch.load(sys.argv[1])
fake = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
packed = AutoModelForCausalLM.from_pretrained(sys.argv[3], quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
nll = {"fake_quant": [], "compressed_tensors": []}
diff = scale = 0.0
with torch.no_grad():
    for i in range(windows.shape[0]):
        w = windows[i:i + 1]
        a, b = fake(w).logits[0].float(), packed(w).logits[0].float()
        nll["fake_quant"].append(F.cross_entropy(a[:-1], w[0, 1:]).double())
        nll["compressed_tensors"].append(F.cross_entropy(b[:-1], w[0, 1:]).double())
        diff, scale = max(diff, (a - b).abs().max().item()), max(scale, a.abs().max().item())
out = {k: math.exp(float(torch.stack(v).mean())) for k, v in nll.items()}
print("RESULT " + json.dumps({"ppl": out, "logits_max_abs_diff": diff, "logits_max_abs": scale,
                              "dtype": str(fake.dtype)}))
"""


def packed_ratio(folder: Path) -> float:
    packed, fp16 = packed_checkpoint_bytes(folder)
    return packed / fp16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "export_check.json"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from loaq.configs.load import load_config
    from loaq.data.windows import eval_windows
    from loaq.flows.export import export_root
    from loaq.flows.plan import plan
    from loaq.flows.quantize import open_context
    from loaq.stages.export import export_dtype, export_path, is_exported
    from loaq.stages.keys import export_key

    config = load_config(args.config, args.overrides)
    ctx = open_context(config)
    p = plan(ctx, config)
    folders, attrs = {}, {}
    for fmt in ("fake_quant", "compressed_tensors"):
        key = export_key(p.chain[-1], fmt, export_dtype(p.model, config.export.dtype))
        folders[fmt] = export_path(export_root(config), fmt, key)
        if not is_exported(ctx, key, folders[fmt]):
            raise SystemExit(f"no {fmt} export of this run: run `loaq export` with the same config first")
        attrs[fmt] = ctx.store.open(key).attrs
    dataset = config.evaluation.datasets[0]
    pipeline = ctx.store.open(p.evals[dataset]["quantized"]).attrs
    windows = eval_windows(AutoTokenizer.from_pretrained(folders["fake_quant"]), dataset, config.evaluation.seqlen,
                           config.evaluation.max_windows, config.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(windows, Path(tmp) / "windows.pt")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", SCORE, str(Path(tmp) / "windows.pt"), str(folders["fake_quant"]),
                               str(folders["compressed_tensors"])], capture_output=True, text=True, cwd=tmp,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    q = config.quantize
    row = {"model": config.model.source, "method": q.method, "bits": q.bits, "group_size": q.group_size,
           "dtype": result["dtype"], "dataset": pipeline["label"], "windows": int(windows.shape[0]),
           "seqlen": config.evaluation.seqlen, "pipeline_ppl": pipeline["ppl"],
           "fake_quant_ppl": result["ppl"]["fake_quant"], "compressed_tensors_ppl": result["ppl"]["compressed_tensors"],
           "fake_quant_rel_diff": abs(result["ppl"]["fake_quant"] / pipeline["ppl"] - 1),
           "compressed_tensors_rel_diff": abs(result["ppl"]["compressed_tensors"] / pipeline["ppl"] - 1),
           "logits_max_abs_diff": result["logits_max_abs_diff"], "logits_max_abs": result["logits_max_abs"],
           "packed_ratio_fp16": packed_ratio(folders["compressed_tensors"]),
           "fake_quant_mib": round(attrs["fake_quant"]["total_bytes"] / 2**20, 1),
           "compressed_tensors_mib": round(attrs["compressed_tensors"]["total_bytes"] / 2**20, 1),
           "score_seconds": round(time.perf_counter() - started, 1),
           "command": "python bench/export_check.py " + " ".join(sys.argv[1:])}
    print(json.dumps(row, indent=1))
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    rows = [r for r in rows if (r["model"], r["method"], r["bits"], r["group_size"]) !=
            (row["model"], row["method"], row["bits"], row["group_size"])] + [row]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
