"""Peak host memory against depth: quantize tiny random LLaMAs of 16, 64 and 256 layers (same
width) through the real pipeline (`loaq run`, store on disk) and report each run's peak RSS.

Weights stream from the checkpoint one layer at a time and hidden states have a fixed size, so the
peak should not grow with depth. Prints a table and writes ``bench/results/memory.json``.

    .venv/bin/python bench/memory.py [--layers 16 64 256] [--hidden 256]
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

import yaml

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]

MAKE_MODEL = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
layers, hidden, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="64MB")
"""

RUN = """
import resource, sys
from loaq.cli import main
rc = main(["run", sys.argv[1]])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(4)}
    for ch in (chr(c) for c in range(32, 127)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", bos_token="<1>", eos_token="<2>").save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = ap.parse_args()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            model = Path(tmp) / f"llama-{layers}"
            subprocess.run([sys.executable, "-c", MAKE_MODEL, str(layers), str(args.hidden), str(model)], check=True, env=env)
            write_tokenizer(model)
            config = {"name": f"memory-{layers}", "model": {"source": str(model)}, "data_dir": args.data_dir,
                      "calibration": {"n_samples": 8, "seqlen": 128}, "quantize": {"method": "loaq", "bits": 3},
                      "evaluation": {"seqlen": 128, "max_windows": 4}, "runtime": {"threads": 1, "micro_batch": 4},
                      "store": {"url": f"{tmp}/store-{layers}"}, "report_dir": f"{tmp}/runs"}
            cfg_path = Path(tmp) / f"memory-{layers}.yaml"
            cfg_path.write_text(yaml.safe_dump(config))
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", RUN, str(cfg_path)], capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            peak = int(next(l for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_KB")).split()[1])
            size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
            rows.append({"layers": layers, "checkpoint_mib": round(size / 2**20, 1), "peak_rss_mib": round(peak / 1024, 1),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(rows[-1], flush=True)
    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["growth_vs_first"] = round(r["peak_rss_mib"] / base - 1, 4)
    print(f"\n| layers | checkpoint MiB | peak RSS MiB | growth vs {rows[0]['layers']} layers | seconds |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['layers']} | {r['checkpoint_mib']} | {r['peak_rss_mib']} | {100 * r['growth_vs_first']:+.1f}% | {r['seconds']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"hidden": args.hidden, "rows": rows,
                                          "command": "python bench/memory.py " + " ".join(sys.argv[1:])}, indent=1))


if __name__ == "__main__":
    main()
