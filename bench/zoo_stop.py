"""How long a zoo takes to exit after a signal, and what it leaves running.

A two-model zoo in one process (``concurrency: 2``): a tiny random LLaMA (3 layers) and the embedded
SmolLM2-135M (30 layers), each quantized with LoaQ W3 on a small calibration (4 x 64 tokens), on a
fresh store. ``--after`` seconds into the run (once both models are quantizing) the zoo is sent the
signal, as a scheduler that preempts the job (SIGTERM) or a user at the terminal (SIGINT) does; a
grace period such as Kubernetes' 30 s is what the exit has to fit in. Each row: the exit status, the
seconds from the signal to the exit, the processes of its session still running after it (Prefect's
ephemeral server, when it is not stopped), and how many layers of SmolLM2 were complete on the store.

    .venv/bin/python bench/zoo_stop.py                       # SIGTERM and SIGINT, 40 s in
    .venv/bin/python bench/zoo_stop.py --signals TERM --after 30

Prints a table and writes ``bench/results/zoo_stop.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(REPO / "tests"))

from flowkit import make_checkpoint, session_processes, tiny_protocol  # noqa: E402


def zoo_config(root: Path, data_dir: str) -> Path:
    tiny = make_checkpoint(root / "tiny-llama", "llama", layers=3)
    config = {"name": "stopzoo",
              "models": [{"name": "tiny", "source": str(tiny)}, {"name": "smol", "source": "embedded:smollm2"}],
              "settings": [{"method": "loaq", "bits": 3}], "concurrency": 2,
              **tiny_protocol(root / "store", data_dir)}
    path = root / "zoo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stop_once(sig: signal.Signals, after: float, data_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = zoo_config(root, data_dir)
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
        env.pop("PREFECT_API_URL", None)  # the zoo starts Prefect's ephemeral server itself
        with open(root / "out.log", "w") as out:
            # SIGINT is ignored in a background job; the zoo gets it as a terminal's Ctrl-C would.
            proc = subprocess.Popen([sys.executable, "-m", "loaq", "zoo", str(config)], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            time.sleep(after)
            sent = time.monotonic()
            proc.send_signal(sig)
            rc = proc.wait(timeout=600)
            seconds = time.monotonic() - sent
            time.sleep(1)
            left = session_processes(proc.pid)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        from loaq.store import Store

        weights = [i for i in Store(str(root / "store")).list(kind="weights") if i.complete]
        last_line = (root / "out.log").read_text().strip().splitlines()[-1]
        return {"signal": sig.name, "after_s": after, "exit_status": rc, "exit_s": round(seconds, 1),
                "left_running": len(left), "complete_weights": len(weights), "last_line": last_line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--signals", nargs="+", default=["TERM", "INT"], choices=["TERM", "INT"])
    ap.add_argument("--after", type=float, default=40.0, help="seconds from the start to the signal")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(RESULTS / "zoo_stop.json"))
    args = ap.parse_args()
    rows = [stop_once(getattr(signal, f"SIG{name}"), args.after, args.data_dir) for name in args.signals]
    print("| signal | exit status | seconds to exit | left running | complete layer records | last line |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['signal']} | {r['exit_status']} | {r['exit_s']} | {r['left_running']} | "
              f"{r['complete_weights']} | {r['last_line']} |")
    header = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
