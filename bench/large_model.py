"""A mid-size LLaMA streamed for real: random weights at a real shape, sharded safetensors on disk,
then `loaq run` with GPTQ and LoaQ at W4, a SIGKILL in the middle and a resume.

  1.1b  TinyLlama-1.1B's shape: hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV heads,
        vocab 32000, float32 on disk (4.4 GB), float32 forwards on the CPU
  7b    (opt-in) LLaMA-2-7B's shape in bfloat16 (13 GB on disk), bfloat16 forwards

Random weights measure the machinery, not quality. Each `loaq run` is a process of its own; the
table gives per-layer seconds (clean stream and quantization, from the store's event log), the
process's peak RSS against the plan's host peak and against the weights' size on disk, and the
store's size against the plan's bytes kept. The LoaQ run reuses the GPTQ run's calibration,
embeddings and clean stream (the same model and calibration), is killed inside layer --kill-layer,
and resumed. Prints a table and writes ``bench/results/large_model.{json,md}``.

    .venv/bin/python bench/large_model.py [--shape 1.1b] [--samples 4 --seqlen 256] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from processes import run_loaq

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, runtime_dtype="float32", disk_dtype="float32"),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, runtime_dtype="bfloat16", disk_dtype="bfloat16"),
}
SHARD_BYTES = 1 << 30


def build_model(folder: Path, shape: dict, layers: int | None) -> int:
    """Random LLaMA weights (in the shape's disk dtype) as sharded safetensors, a config.json and a character tokenizer;
    returns the weights' bytes on disk. Tensors are made one at a time (memory: one shard)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    n_layers = layers or shape["num_hidden_layers"]
    config = LlamaConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_hidden_layers=n_layers, num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], vocab_size=32000,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         torch_dtype=shape["disk_dtype"])
    config.save_pretrained(folder)
    d, f = config.hidden_size, config.intermediate_size
    head_dim = d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, shape["disk_dtype"])

    def randn(*size, std):
        return (torch.randn(*size, generator=gen) * std).to(dtype)

    def tensors():
        yield "model.embed_tokens.weight", randn(config.vocab_size, d, std=1.0)
        for i in range(n_layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", torch.ones(d, dtype=dtype)
            yield p + "post_attention_layernorm.weight", torch.ones(d, dtype=dtype)
            for name, (o, n) in {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                                 "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
                                 "mlp.down_proj": (d, f)}.items():
                yield p + name + ".weight", randn(o, n, std=1 / math.sqrt(n))
        yield "model.norm.weight", torch.ones(d, dtype=dtype)
        yield "lm_head.weight", randn(config.vocab_size, d, std=1 / math.sqrt(d))

    shard, shard_bytes, shards, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        shards.append(name)
        for k in shard:
            weight_map[k] = name
        shard, shard_bytes = {}, 0

    for name, tensor in tensors():
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    # The shard files are named for their count at the end, as transformers names them.
    renamed = {}
    for i, old in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / old).rename(folder / new)
        renamed[old] = new
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}))
    _tokenizer(folder)
    return sum((folder / n).stat().st_size for n in renamed.values())


def _tokenizer(folder: Path) -> None:
    """The tests' character-level tokenizer: calibration and evaluation run on real text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(4)}
    for ch in (chr(c) for c in range(32, 127)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", bos_token="<1>",
                            eos_token="<2>").save_pretrained(folder)


def write_config(path: Path, model: Path, store: Path, args, method: str, dtype: str) -> Path:
    path.write_text(yaml.safe_dump({
        "name": f"large-{method}", "model": {"source": str(model)}, "data_dir": str(REPO.parent / "shared" / "data"),
        "calibration": {"n_samples": args.samples, "seqlen": args.seqlen},
        "quantize": {"method": method, "bits": 4},
        "evaluation": {"datasets": ["wikitext2"], "seqlen": args.seqlen, "max_windows": 2},
        "runtime": {"device": "cpu", "dtype": dtype, "micro_batch": args.micro_batch},
        "store": {"url": str(store), "keep_quant_states": "last", "keep_clean_states": "all"},
        "report_dir": str(store.parent / "runs")}))
    return path


def loaq_run(config: Path, env: dict | None = None) -> dict:
    """One `loaq run` process: wall seconds, exit code, output, its peak RSS (bytes)."""
    seconds, rc, text, peak = run_loaq(["run", str(config)], {"HF_HUB_OFFLINE": "1", **(env or {})})
    return {"seconds": seconds, "rc": rc, "output": text, "peak_rss": peak}


def planned(config: Path) -> dict:
    """The plan of ``config`` on its store now: host peak of what is left, bytes kept by the run."""
    from loaq.configs.load import load_config
    from loaq.flows.plan import plan
    from loaq.flows.quantize import open_context

    cfg = load_config(str(config))
    p = plan(open_context(cfg), cfg)
    return {"host_peak": p.peaks()[0], "kept": {s.keys: s.kept for s in p.stages}, "to_add": p.bytes_to_add()}


def store_bytes(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def layer_seconds(store_url: Path, run_ids: list[str]) -> dict[str, list[float]]:
    from loaq.store import Store

    out: dict[str, list[float]] = {}
    for rid in run_ids:
        for e in Store(str(store_url)).events(rid):
            if e["action"] == "computed" and e["stage"] in ("clean-layer", "quantize-layer"):
                out.setdefault(e["stage"], []).append(e.get("seconds") or 0.0)
    return out


def run_ids(store_url: Path) -> set[str]:
    from loaq.store import Store

    return {e["run_id"] for e in Store(str(store_url)).events()} if (store_url / "events").exists() else set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a probe of the per-layer cost)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--kill-layer", type=int, default=None, help="layer whose LoaQ quantization is killed "
                    "(default: the middle one)")
    ap.add_argument("--root", default=None, help="work folder (model, store; default: a temporary one, removed)")
    ap.add_argument("--out", default=str(RESULTS / "large_model"))
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    root = Path(args.root or tempfile.mkdtemp(prefix="loaq-large-"))
    try:
        return _bench(args, shape, root)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


def _bench(args, shape: dict, root: Path) -> int:
    model, store = root / "model", root / "store"
    started = time.perf_counter()
    on_disk = build_model(model, shape, args.layers)
    build_s = time.perf_counter() - started
    n_layers = args.layers or shape["num_hidden_layers"]
    kill = args.kill_layer if args.kill_layer is not None else n_layers // 2
    print(f"model {args.shape}: {n_layers} layers, {on_disk / 2**30:.2f} GiB on disk, built in {build_s:.0f} s",
          flush=True)

    rows, kept, run_ids = [], {}, []
    steps = [("gptq", "cold", None), ("loaq", f"killed in layer {kill}", f"quantize-layer:{kill}:mid"),
             ("loaq", "resumed", None)]
    for method, situation, failpoint in steps:
        config = write_config(root / f"{method}.yaml", model, store, args, method, shape["runtime_dtype"])
        plan = planned(config)
        kept.update(plan["kept"])
        before = run_ids(store)
        result = loaq_run(config, {"LOAQ_FAILPOINT": failpoint} if failpoint else None)
        expect_rc = -signal.SIGKILL if failpoint else 0
        if result["rc"] != expect_rc:
            print(result["output"][-4000:])
            raise SystemExit(f"{method} {situation}: exit {result['rc']}, expected {expect_rc}")
        # From the event log: a killed run never prints its id.
        rid = next(iter(run_ids(store) - before), None)
        run_ids += [rid] if rid else []
        seconds = layer_seconds(store, [rid]) if rid else {}
        records = store_bytes(store / "records")
        plan_records = sum(kept.values())
        rows.append({
            "method": method, "situation": situation, "wall_s": result["seconds"],
            "layers_quantized": len(seconds.get("quantize-layer", [])),
            "clean_layer_s": _median(seconds.get("clean-layer")), "quantize_layer_s": _median(seconds.get("quantize-layer")),
            "peak_rss": result["peak_rss"], "plan_host_peak": plan["host_peak"],
            "rss_vs_plan": result["peak_rss"] / plan["host_peak"], "rss_vs_disk": result["peak_rss"] / on_disk,
            "store_records": records, "plan_records": plan_records, "store_vs_plan": records / plan_records,
        })
        print(_row(rows[-1]), flush=True)
        # Written after every run, so a benchmark stopped early keeps the rows it measured.
        result = {"shape": args.shape, "layers": n_layers, "hidden": shape["hidden_size"],
                  "intermediate": shape["intermediate_size"], "weights_on_disk": on_disk,
                  "calibration": [args.samples, args.seqlen], "micro_batch": args.micro_batch,
                  "runtime_dtype": shape["runtime_dtype"], "disk_dtype": shape["disk_dtype"],
                  "threads": torch.get_num_threads(), "rows": rows}
        table = _table(result)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(table + "\n")
    print("\n" + table)
    return 0


def _median(values):
    if not values:
        return None
    values = sorted(values)
    return values[len(values) // 2]


def _mib(n):
    return f"{n / 2**20:.0f}"


def _row(r) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    return (f"| {r['method']} | {r['situation']} | {r['wall_s']:.0f} | {r['layers_quantized']} | "
            f"{fmt(r['clean_layer_s'])} | {fmt(r['quantize_layer_s'])} | {_mib(r['peak_rss'])} | "
            f"{_mib(r['plan_host_peak'])} | {r['rss_vs_plan']:.2f} | {r['rss_vs_disk']:.2f} | "
            f"{_mib(r['store_records'])} | {_mib(r['plan_records'])} | {r['store_vs_plan']:.3f} |")


def _table(result) -> str:
    head = (f"{result['shape']}-shaped LLaMA, random weights: {result['layers']} layers, hidden {result['hidden']}, "
            f"intermediate {result['intermediate']}, {result['weights_on_disk'] / 2**30:.2f} GiB {result['disk_dtype']} on disk; "
            f"W4, calibration {result['calibration'][0]}x{result['calibration'][1]} tokens, "
            f"{result['runtime_dtype']} forwards, micro-batch {result['micro_batch']}\n\n"
            "| method | situation | wall s | layers quantized | clean s/layer | quantize s/layer | peak RSS MiB | "
            "plan host MiB | RSS / plan | RSS / weights on disk | store MiB | plan kept MiB | store / plan |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    return head + "\n" + "\n".join(_row(r) for r in result["rows"])


if __name__ == "__main__":
    sys.exit(main())
