"""Peak host memory of export against depth: quantize tiny random LLaMAs of 16 and 64 layers (same
width) with `loaq run`, then export each in both formats with `loaq export` in a process of its own
and report that process's peak RSS.

Export streams one layer at a time from the store and the source checkpoint (one shard per layer),
so its peak should not grow with depth, while the checkpoint does. Prints a table and writes
``bench/results/export_memory.json``.

    .venv/bin/python bench/export_memory.py [--layers 16 64] [--hidden 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from memory import MAKE_MODEL, write_tokenizer

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]

EXPORT = """
import resource, sys
from loaq.cli import main
rc = main(["export", sys.argv[1], "--format", "fake_quant", "--format", "compressed_tensors"])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def folder_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(RESULTS / "export_memory.json"))
    args = ap.parse_args()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            model = Path(tmp) / f"llama-{layers}"
            subprocess.run([sys.executable, "-c", MAKE_MODEL, str(layers), str(args.hidden), str(model)], check=True, env=env)
            write_tokenizer(model)
            config = {"name": f"export-memory-{layers}", "model": {"source": str(model)}, "data_dir": args.data_dir,
                      "calibration": {"n_samples": 4, "seqlen": 128}, "quantize": {"method": "rtn", "bits": 4},
                      "evaluation": {"seqlen": 128, "max_windows": 2}, "runtime": {"threads": 1, "micro_batch": 4},
                      "store": {"url": f"{tmp}/store-{layers}"}, "report_dir": f"{tmp}/runs"}
            cfg_path = Path(tmp) / f"export-memory-{layers}.yaml"
            cfg_path.write_text(yaml.safe_dump(config))
            quantize = subprocess.run([sys.executable, "-m", "loaq", "run", str(cfg_path)], capture_output=True,
                                      text=True, env=env, cwd=REPO)
            if quantize.returncode != 0:
                raise SystemExit(quantize.stderr[-3000:])
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", EXPORT, str(cfg_path)], capture_output=True, text=True,
                                  env=env, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            seconds = time.perf_counter() - started
            peak = int(next(l for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_KB")).split()[1])
            folders = {l.split()[1]: Path(l.split(": ")[1].split()[0]) for l in proc.stdout.splitlines()
                       if l.startswith("export ")}
            rows.append({"layers": layers, "checkpoint_mib": folder_mib(model),
                         "fake_quant_mib": folder_mib(folders["fake_quant"]),
                         "compressed_tensors_mib": folder_mib(folders["compressed_tensors"]),
                         "export_peak_rss_mib": round(peak / 1024, 1), "export_seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
    base = rows[0]["export_peak_rss_mib"]
    for r in rows:
        r["growth_vs_first"] = round(r["export_peak_rss_mib"] / base - 1, 4)
    print(f"\n| layers | source MiB | fake-quant MiB | packed MiB | export peak RSS MiB | growth vs {rows[0]['layers']} layers | seconds |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['layers']} | {r['checkpoint_mib']} | {r['fake_quant_mib']} | {r['compressed_tensors_mib']} | "
              f"{r['export_peak_rss_mib']} | {100 * r['growth_vs_first']:+.1f}% | {r['export_seconds']} |")
    import torch

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"hidden": args.hidden, "rows": rows, "torch": torch.__version__,
                                          "cpu": platform.processor() or platform.machine(),
                                          "command": "python bench/export_memory.py " + " ".join(sys.argv[1:])}, indent=1))


if __name__ == "__main__":
    main()
