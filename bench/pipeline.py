"""Pipeline costs on SmolLM2 with the default config, each a real `loaq run` in a fresh store:

  cold     first run (everything computed)
  warm     the identical run again (everything reused)
  variant  another alpha/beta (calibration, embeddings, clean stream and FP evaluation reused)
  resume   a fresh store, the run SIGKILLed in the middle of layer K's quantization, then run again:
           resume overhead = (resumed wall time - the cold run's time for the same remaining work)
                             / that remaining work

Prints a table and writes ``bench/results/pipeline.json``.

    .venv/bin/python bench/pipeline.py [--kill-layer 15] [--set calibration.n_samples=16]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from processes import run_loaq

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def loaq_run(store: str, extra: list[str], env: dict | None = None) -> tuple[float, int, str, float]:
    """(wall seconds, exit code, output, peak RSS of the `loaq run` process in MiB)."""
    seconds, rc, text, peak = run_loaq(["run", "default", "--set", f"store.url={store}", *extra], env)
    return seconds, rc, text, peak / 2**20


def run_id(text: str) -> str:
    return next(l.split(": ", 1)[1] for l in text.splitlines() if l.startswith("run id: "))


def computed_seconds(store_url: str, rid: str) -> dict:
    from loaq.store import Store

    out: dict = {}
    for e in Store(store_url).events(rid):
        if e["action"] == "computed":
            out.setdefault(e["stage"], []).append(e.get("seconds") or 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-layer", type=int, default=15)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "pipeline.json"))
    args = ap.parse_args()
    extra = [x for o in args.overrides for x in ("--set", o)]
    rows = {}
    with tempfile.TemporaryDirectory(dir=REPO / ".loaq" if (REPO / ".loaq").is_dir() else None) as tmp:
        store = f"{tmp}/store"
        cold, rc, text, rows["cold_peak_rss_mib"] = loaq_run(store, extra)
        assert rc == 0, text[-3000:]
        cold_stages = computed_seconds(store, run_id(text))
        rows["cold"] = cold
        warm, rc, text, _ = loaq_run(store, extra)
        assert rc == 0, text[-3000:]
        rows["warm"] = warm
        variant, rc, text, _ = loaq_run(store, [*extra, "--set", "quantize.alpha_in=0.3", "--set", "quantize.alpha_out=0.3"])
        assert rc == 0, text[-3000:]
        rows["variant"] = variant

        store2 = f"{tmp}/store-resume"
        killed, rc, text, _ = loaq_run(store2, extra, env={"LOAQ_FAILPOINT": f"quantize-layer:{args.kill_layer}:mid"})
        assert rc == -signal.SIGKILL, (rc, text[-2000:])
        resumed, rc, text, _ = loaq_run(store2, extra)
        assert rc == 0, text[-3000:]
        # The work left at the kill: layers >= K (clean and quantized) and the evaluations, as timed in the cold run.
        layers_left = cold_stages["quantize-layer"][args.kill_layer:]
        clean_left = cold_stages["clean-layer"][args.kill_layer:]
        remaining = sum(layers_left) + sum(clean_left) + sum(cold_stages.get("perplexity", [])) + sum(cold_stages.get("report", []))
        rows["killed_at_layer"] = args.kill_layer
        rows["killed_run"] = killed
        rows["resumed"] = resumed
        rows["remaining_work_in_cold_run"] = remaining
    result = {
        "cold_s": round(rows["cold"], 1), "cold_peak_rss_mib": round(rows["cold_peak_rss_mib"], 1),
        "warm_s": round(rows["warm"], 1), "warm_over_cold": round(rows["warm"] / rows["cold"], 4),
        "variant_s": round(rows["variant"], 1), "variant_over_cold": round(rows["variant"] / rows["cold"], 4),
        "kill_layer": args.kill_layer, "resumed_s": round(rows["resumed"], 1),
        "remaining_work_s": round(rows["remaining_work_in_cold_run"], 1),
        "resume_overhead": round(rows["resumed"] / rows["remaining_work_in_cold_run"] - 1, 4),
        "command": "python bench/pipeline.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print("| measure | seconds | ratio |\n| --- | ---: | ---: |")
    print(f"| cold run (peak RSS {result['cold_peak_rss_mib']:.0f} MiB) | {result['cold_s']} | 1 |")
    print(f"| identical rerun | {result['warm_s']} | {result['warm_over_cold']:.3f} of cold |")
    print(f"| alpha/beta variant | {result['variant_s']} | {result['variant_over_cold']:.3f} of cold |")
    print(f"| resume after SIGKILL in layer {args.kill_layer} | {result['resumed_s']} | "
          f"overhead {100 * result['resume_overhead']:+.1f}% of the remaining {result['remaining_work_s']} s |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
