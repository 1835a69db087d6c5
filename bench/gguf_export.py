"""GGUF export of a quantized run: does an independent reader reproduce the pipeline, and how big is it?

Exports the run (already in the store: run ``loaq run`` with the same config first) as fake_quant,
compressed_tensors and gguf; opens the GGUF with the ``gguf`` reader (tensor types) and, in a fresh
process where loaq cannot be imported, with transformers' GGUF loader (which dequantizes Q4_0/Q4_1/
Q8_0 itself) next to the fake-quant checkpoint; scores the run's own evaluation windows with both;
measures what the fp16 rounding of scales and mins changed in the weights; and lists each export's
size on disk. Prints a table and writes ``bench/results/gguf_export.json``.

    .venv/bin/loaq run default --set quantize.bits=4 --set quantize.group_size=32 ...
    .venv/bin/python bench/gguf_export.py default --set quantize.bits=4 --set quantize.group_size=32 ...
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

SCORE = r"""
import json, math, sys
sys.modules["loaq"] = None
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

windows = torch.load(sys.argv[1])
gguf = AutoModelForCausalLM.from_pretrained(sys.argv[2], gguf_file="model.gguf", dtype=torch.float32).eval()
fake = AutoModelForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float32).eval()
g, f = gguf.state_dict(), fake.state_dict()
rel, other = [], 0.0
for name, w in f.items():
    d = (g[name] - w).abs().max().item()
    if name.endswith("proj.weight"):
        rel.append(d / w.abs().max().item())
    else:
        other = max(other, d)
nll = {"gguf": [], "fake_quant": []}
with torch.no_grad():
    for i in range(windows.shape[0]):
        w = windows[i:i + 1]
        nll["gguf"].append(F.cross_entropy(gguf(w).logits[0, :-1].float(), w[0, 1:]).double())
        nll["fake_quant"].append(F.cross_entropy(fake(w).logits[0, :-1].float(), w[0, 1:]).double())
print("RESULT " + json.dumps({"ppl": {k: math.exp(float(torch.stack(v).mean())) for k, v in nll.items()},
                              "linear_max_rel_diff": max(rel), "linear_median_rel_diff": sorted(rel)[len(rel) // 2],
                              "other_max_abs_diff": other}))
"""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "gguf_export.json"))
    args = ap.parse_args()
    import gguf
    from transformers import AutoTokenizer

    import loaq
    from loaq.data.windows import eval_windows
    from loaq.models.sources import source_gguf

    config = loaq.load_config(args.config, args.overrides)
    run = loaq.run(config)  # from the store: the run must already be there
    timings, exports = {}, {}
    for fmt in ("fake_quant", "compressed_tensors", "gguf"):
        started = time.perf_counter()
        exports[fmt] = loaq.export(config, [fmt])[fmt]
        timings[fmt] = time.perf_counter() - started
    reader = gguf.GGUFReader(exports["gguf"] / "model.gguf")
    types = dict(Counter(t.tensor_type.name for t in reader.tensors))
    dataset = config.evaluation.datasets[0]
    windows = eval_windows(AutoTokenizer.from_pretrained(exports["fake_quant"]), dataset, config.evaluation.seqlen,
                           config.evaluation.max_windows, config.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(windows, Path(tmp) / "windows.pt")
        proc = subprocess.run([sys.executable, "-c", SCORE, str(Path(tmp) / "windows.pt"), str(exports["gguf"]),
                               str(exports["fake_quant"])], capture_output=True, text=True, cwd=tmp,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    scored = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    pipeline = run.perplexity[dataset]["quantized"]
    sizes = {fmt: folder_bytes(path) for fmt, path in exports.items()}
    source = source_gguf(config.model.source)
    if source:
        sizes["source gguf"] = Path(source).stat().st_size
    q = config.quantize
    row = {"model": config.model.source, "method": q.method, "bits": q.bits, "group_size": q.group_size,
           "symmetric": q.symmetric, "dataset": "{label} ({windows} x {seqlen} tokens)".format(**run.protocol[dataset]), "pipeline_ppl": pipeline,
           "gguf_ppl": scored["ppl"]["gguf"], "fake_quant_ppl": scored["ppl"]["fake_quant"],
           "gguf_rel_diff_pipeline": scored["ppl"]["gguf"] / pipeline - 1,
           "fake_quant_rel_diff_pipeline": scored["ppl"]["fake_quant"] / pipeline - 1,
           "gguf_tensor_types": types, "linear_max_rel_diff": scored["linear_max_rel_diff"],
           "linear_median_rel_diff": scored["linear_median_rel_diff"], "other_max_abs_diff": scored["other_max_abs_diff"],
           "bytes": sizes, "export_seconds": {k: round(v, 1) for k, v in timings.items()},
           "command": "python bench/gguf_export.py " + " ".join(sys.argv[1:])}
    print(f"{row['dataset']} perplexity, {q.method} W{q.bits} g{q.group_size}:")
    print("| reader | perplexity | vs pipeline |\n| --- | ---: | ---: |")
    print(f"| pipeline (loaq) | {pipeline:.3f} | - |")
    print(f"| transformers GGUF loader | {row['gguf_ppl']:.3f} | {100 * row['gguf_rel_diff_pipeline']:+.3f}% |")
    print(f"| transformers fake_quant | {row['fake_quant_ppl']:.3f} | {100 * row['fake_quant_rel_diff_pipeline']:+.3f}% |")
    print("\n| export | MiB on disk | export s |\n| --- | ---: | ---: |")
    for fmt, b in sizes.items():
        print(f"| {fmt} | {b / 2**20:.1f} | {row['export_seconds'].get(fmt, '-')} |")
    print(f"\nGGUF tensor types {types}; quantized weights vs fake_quant: max |dw|/max|w| per tensor "
          f"{row['linear_max_rel_diff']:.2e} (median {row['linear_median_rel_diff']:.2e}); other tensors max |dw| "
          f"{row['other_max_abs_diff']:.1e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
