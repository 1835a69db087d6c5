"""Does a run's GGUF export reproduce the pipeline? Opens the GGUF file of an exported run with the
``gguf`` reader (block types, tensor count) and, in a fresh process without loaq, with transformers'
GGUF loader, which dequantizes Q4_0/Q4_1/Q8_0 itself; scores the run's own evaluation windows and
compares with the pipeline's stored perplexity. The fp16 rounding of scales and mins is the only
change to the weights: its size is measured against the fake-quant export, weight by weight. Sizes
on disk of the fake-quant, compressed-tensors and GGUF exports of the same run sit side by side.
Appends a row to ``bench/results/gguf_check.json`` and prints a table.

    .venv/bin/loaq run default --set quantize.bits=4 --set quantize.group_size=32 \
        --set 'export.formats=[fake_quant, compressed_tensors, gguf]'
    .venv/bin/python bench/gguf_check.py default --set quantize.bits=4 --set quantize.group_size=32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# One window at a time: a 49k vocabulary makes the logits of all windows gigabytes.
SCORE = r"""
import json, math, sys
sys.modules["loaq"] = None
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

windows = torch.load(sys.argv[1])
folder, fake_folder = sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()
fake = AutoModelForCausalLM.from_pretrained(fake_folder, dtype=torch.float32).eval()
got, want = model.state_dict(), fake.state_dict()
rel, changed, same = 0.0, 0, 0
for name, w in want.items():
    d = (got[name].float() - w.float()).abs().max().item()
    if d > 0:
        changed += 1
        rel = max(rel, d / w.float().abs().max().item())
    else:
        same += 1
del fake, want
nll = []
with torch.no_grad():
    for i in range(windows.shape[0]):
        w = windows[i:i + 1]
        logits = model(w).logits[0].float()
        nll.append(F.cross_entropy(logits[:-1], w[0, 1:]).double())
print("RESULT " + json.dumps({"ppl": math.exp(float(torch.stack(nll).mean())), "weight_max_rel_diff": rel,
                              "tensors_changed": changed, "tensors_identical": same}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "gguf_check.json"))
    args = ap.parse_args()
    import gguf
    from transformers import AutoTokenizer

    from loaq.configs.load import load_config
    from loaq.data.windows import eval_windows
    from loaq.flows.export import export_root
    from loaq.flows.plan import plan
    from loaq.flows.quantize import open_context
    from loaq.stages.export import export_dtype, export_key, export_path, is_exported

    config = load_config(args.config, args.overrides)
    ctx = open_context(config)
    p = plan(ctx, config)
    folders, attrs = {}, {}
    for fmt in ("fake_quant", "compressed_tensors", "gguf"):
        key = export_key(p.chain[-1], fmt, export_dtype(p.model, config.export.dtype))
        folders[fmt] = export_path(export_root(config), fmt, key)
        if not is_exported(ctx, key, folders[fmt]):
            raise SystemExit(f"no {fmt} export of this run: run `loaq export` with the same config first")
        attrs[fmt] = ctx.store.open(key).attrs
    reader = gguf.GGUFReader(folders["gguf"] / "model.gguf")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    dataset = config.evaluation.datasets[0]
    pipeline = ctx.store.open(p.evals[dataset]["quantized"]).attrs
    windows = eval_windows(AutoTokenizer.from_pretrained(folders["fake_quant"]), dataset, config.evaluation.seqlen,
                           config.evaluation.max_windows, config.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(windows, Path(tmp) / "windows.pt")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", SCORE, str(Path(tmp) / "windows.pt"), str(folders["gguf"]),
                               str(folders["fake_quant"])], capture_output=True, text=True, cwd=tmp,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    q = config.quantize
    mib = {fmt: round(sum(f.stat().st_size for f in folders[fmt].rglob("*") if f.is_file()) / 2**20, 1)
           for fmt in folders}
    row = {"model": config.model.source, "method": q.method, "bits": q.bits, "group_size": q.group_size,
           "symmetric": q.symmetric, "block_type": attrs["gguf"]["block_type"], "gguf_tensor_types": dict(types),
           "gguf_tensors": len(reader.tensors), "dataset": pipeline["label"], "windows": int(windows.shape[0]),
           "seqlen": config.evaluation.seqlen, "pipeline_ppl": pipeline["ppl"], "gguf_ppl": result["ppl"],
           "gguf_rel_diff": abs(result["ppl"] / pipeline["ppl"] - 1),
           "weight_max_rel_diff": result["weight_max_rel_diff"], "tensors_changed": result["tensors_changed"],
           "tensors_identical": result["tensors_identical"],
           "fake_quant_mib": mib["fake_quant"], "compressed_tensors_mib": mib["compressed_tensors"],
           "gguf_mib": mib["gguf"], "gguf_linear_ratio_fp16": attrs["gguf"]["linear_ratio_fp16"],
           "score_seconds": round(time.perf_counter() - started, 1),
           "command": "python bench/gguf_check.py " + " ".join(sys.argv[1:])}
    print(f"{'export':<20} {'MiB on disk':>12}")
    for fmt in folders:
        print(f"{fmt:<20} {mib[fmt]:>12.1f}")
    print(f"\n{pipeline['label']} perplexity ({row['windows']} x {row['seqlen']} tokens): pipeline "
          f"{row['pipeline_ppl']:.4f}   GGUF ({row['block_type']}, transformers' loader) {row['gguf_ppl']:.4f}   "
          f"relative difference {row['gguf_rel_diff']:.2e}")
    print(f"weights: {row['tensors_changed']} tensors changed by the fp16 rounding of scales/mins (max "
          f"{row['weight_max_rel_diff']:.2e} of the tensor's largest weight), {row['tensors_identical']} identical")
    print(json.dumps(row, indent=1))
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    rows = [r for r in rows if (r["model"], r["method"], r["bits"], r["group_size"]) !=
            (row["model"], row["method"], row["bits"], row["group_size"])] + [row]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
