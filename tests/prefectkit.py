"""A real Prefect server and process worker for integration tests, isolated from the user's Prefect.

Everything runs from this environment's ``prefect`` command with a temporary PREFECT_HOME (its own
SQLite database and profile), the server on a free loopback port, and each process in its own
session, so stopping kills its whole process group (the worker's flow-run subprocesses included).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, api_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url, "PREFECT_PROFILES_PATH":
            str(home / "profiles.toml"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "INFO", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def start(args: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, give it ``grace`` seconds, then SIGKILL whatever of it is left
    (a worker's flow-run subprocesses may outlive the worker)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_healthy(api_url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s:\n{tail(log)}")


def run_prefect(*args: str, env: dict, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc


class Api:
    """The few REST calls the tests need (plain HTTP: no Prefect settings in the test process)."""

    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url, timeout=30)

    #: Answers a busy server gives for a request worth repeating; Prefect's own client retries them too.
    RETRY_STATUS = (429, 502, 503)

    def _send(self, method: str, path: str, **kw):
        for wait in (1, 2, 4, 8, None):
            response = self.client.request(method, path, **kw)
            if response.status_code not in self.RETRY_STATUS or wait is None:
                break
            time.sleep(wait)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict | None = None):
        return self._send("POST", path, json=body or {})

    def get(self, path: str):
        return self._send("GET", path)

    def deployment(self, name: str) -> dict:
        return self.get(f"/deployments/name/{name}")

    def flow_runs(self, deployment_id: str, states: list[str] | None = None) -> list[dict]:
        body = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
        if states:
            body["flow_runs"] = {"state": {"type": {"any_": states}}}
        return self.post("/flow_runs/filter", body)

    def wait_final(self, flow_run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {run['state'] and run['state']['type']} "
                                   f"after {timeout:.0f} s")
            time.sleep(1)
