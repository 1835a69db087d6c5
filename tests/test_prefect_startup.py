"""Prefect's ephemeral API server under CPU load: the CLI's start-up window, its retry, its one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import psutil
import pytest

from flowkit import EPHEMERAL, REPO, make_checkpoint, run_cli, write_config
from loadkit import Throttle, ephemeral_servers, start_load, stop_load, wait_for
from loaq.prefect_startup import PREFECT_DEFAULT_WINDOW, STARTUP_SETTING


def _prefect_env(home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _port(server: psutil.Process) -> int:
    cmdline = server.cmdline()
    return int(cmdline[cmdline.index("--port") + 1])


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_run_completes_when_the_server_starts_slower_than_prefects_default_window(tmp_path, shared_data):
    checkpoint = make_checkpoint(tmp_path / "model", layers=2)
    config = write_config(tmp_path / "tiny.yaml", checkpoint, tmp_path / "store", shared_data)
    home = tmp_path / "prefect-home"  # fresh: the first start also creates Prefect's database
    with tempfile.TemporaryFile("w+") as out:
        cli = subprocess.Popen([sys.executable, "-m", "loaq", "run", str(config)], stdout=out, stderr=out,
                               env=_prefect_env(home), cwd=REPO, start_new_session=True)
        load = []
        try:
            server = wait_for(lambda: (ephemeral_servers(cli.pid) or [None])[0], timeout=180)
            assert server is not None, "the CLI started no ephemeral server"
            # Both cores busy, and the server held to a sixth of the time until Prefect's own window
            # has passed (then left to the load alone, so the test's length stays bounded).
            load = start_load(seconds=150)
            port = wait_for(lambda: _port(server), timeout=30)
            with Throttle(server.pid, share=1 / 6):
                wait_for(lambda: _healthy(port), timeout=PREFECT_DEFAULT_WINDOW + 5, interval=0.5)
            assert wait_for(lambda: _healthy(port), timeout=120, interval=0.5), "the server never answered"
            took = time.time() - server.create_time()
            stop_load(load)
            assert took > PREFECT_DEFAULT_WINDOW, f"the load slowed the start to {took:.1f} s only"
            assert cli.wait(timeout=300) == 0, out.seek(0) or out.read()[-3000:]
        finally:
            stop_load(load)
            try:
                os.killpg(cli.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            cli.wait(timeout=30)
        out.seek(0)
        assert "perplexity" in out.read()


def test_a_window_too_short_fails_in_one_line(tmp_path, shared_data):
    checkpoint = make_checkpoint(tmp_path / "model", layers=1)
    config = write_config(tmp_path / "tiny.yaml", checkpoint, tmp_path / "store", shared_data)
    env = {**_prefect_env(tmp_path / "prefect-home"), STARTUP_SETTING: "1", **EPHEMERAL}
    proc = run_cli("run", str(config), env=env, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loaq: error:"), proc.stderr[-3000:]
    assert STARTUP_SETTING in lines[0] and "PREFECT_API_URL" in lines[0] and "2 tries" in lines[0]
    assert not (tmp_path / "store" / "records").exists()  # nothing ran


def test_a_configured_api_url_starts_nothing(monkeypatch):
    from loaq.prefect_startup import ensure_prefect_api

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv(STARTUP_SETTING, "1")  # restored afterwards, whatever the call does to it
    assert ensure_prefect_api(window=1) is None
    assert os.environ[STARTUP_SETTING] == "1"  # a configured server's settings are left alone
