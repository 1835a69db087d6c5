"""One `loaq` command as a process of its own, timed, with its peak RSS (for the bench scripts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_loaq(args: list[str], env: dict | None = None) -> tuple[float, int, str, int]:
    """(wall seconds, exit code, output, peak RSS in bytes) of `python -m loaq ARGS`."""
    full_env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "loaq", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env=full_env, start_new_session=True)
        _, status, usage = os.wait4(proc.pid, 0)
        rc = proc.returncode = os.waitstatus_to_exitcode(status)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Prefect's ephemeral server outlives a killed run
        except ProcessLookupError:
            pass
        out.seek(0)
        text = out.read()
    return time.perf_counter() - started, rc, text, usage.ru_maxrss * 1024  # Linux: ru_maxrss in KiB
