"""Start-up time of Prefect's ephemeral API server, on an idle machine and with every core busy.

Each start runs in a fresh Python process (as ``loaq run`` does) with its own ``PREFECT_HOME``:
"fresh" is a new home, whose first start also creates Prefect's SQLite database and runs its
migrations; "warm" is the same home started again. The time is from constructing the server to
its health check answering (``SubprocessASGIServer.start``), the window that
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` bounds (Prefect's default 20 s, loaq's 120 s,
see ``loaq/prefect_startup.py``). "loaded" runs one busy loop per core during the starts.

    .venv/bin/python bench/prefect_startup.py              # 2 repeats per case
    .venv/bin/python bench/prefect_startup.py --repeats 1 --out /tmp/prefect_startup.json

Prints a table and writes ``bench/results/prefect_startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

_START = """
import time
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
started = time.monotonic()
server.start(timeout=600)
print(time.monotonic() - started, flush=True)
server.stop()
"""

# A busy loop that ends by itself, so an interrupted bench leaves no load behind.
_SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def start_seconds(home: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-c", _START], env=env, capture_output=True, text=True, timeout=900,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(repeats: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for condition in ("idle", "loaded"):
        load = []
        if condition == "loaded":
            load = [subprocess.Popen([sys.executable, "-c", _SPIN.format(seconds=900)])
                    for _ in range(os.cpu_count() or 1)]
            time.sleep(1.0)
        try:
            fresh, warm = [], []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory(prefix="prefect-home-") as home:
                    fresh.append(start_seconds(Path(home)))
                    warm.append(start_seconds(Path(home)))
            results[condition] = {"fresh": fresh, "warm": warm}
        finally:
            for proc in load:
                proc.kill()
                proc.wait()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "prefect_startup.json")
    args = parser.parse_args()

    import prefect

    from loaq.prefect_startup import DEFAULT_WINDOW, PREFECT_DEFAULT_WINDOW

    results = measure(args.repeats)
    print(f"Prefect {prefect.__version__} ephemeral server start-up, seconds ({os.cpu_count()} cores, "
          f"{args.repeats} repeats; Prefect's default window {PREFECT_DEFAULT_WINDOW} s, loaq's {DEFAULT_WINDOW} s)")
    print(f"{'condition':<10} {'home':<6} {'median':>7} {'max':>7}  runs")
    for condition, homes in results.items():
        for home, times in homes.items():
            runs = " ".join(f"{t:.1f}" for t in times)
            print(f"{condition:<10} {home:<6} {statistics.median(times):7.1f} {max(times):7.1f}  {runs}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "prefect": prefect.__version__, "python": platform.python_version(), "cpu": platform.processor() or
        platform.machine(), "cores": os.cpu_count(), "repeats": args.repeats, "seconds": results,
        "loadavg_at_end": os.getloadavg(),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
