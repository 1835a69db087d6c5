"""Artificial CPU load for tests and benches: busy processes that end by themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

_SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def start_load(processes: int | None = None, seconds: float = 120.0) -> list[subprocess.Popen]:
    """``processes`` busy loops (default: one per core), each ending after ``seconds`` at the latest."""
    count = processes or os.cpu_count() or 1
    return [subprocess.Popen([sys.executable, "-c", _SPIN.format(seconds=float(seconds))]) for _ in range(count)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait(timeout=10)


def ephemeral_servers(root_pid: int) -> list[psutil.Process]:
    """Prefect ephemeral API servers started by process ``root_pid`` or its descendants."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if any("prefect.server.api.server:create_app" in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def listening_port(proc: psutil.Process) -> int | None:
    try:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                return conn.laddr.port
    except psutil.Error:
        pass
    return None


def wait_for(predicate, timeout: float, interval: float = 0.1):
    """``predicate()``'s first truthy value within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


class Throttle:
    """Holds process ``pid`` to ``share`` of the wall-clock time (SIGSTOP / SIGCONT in ``period``
    cycles, as ``cpulimit`` does): a starved process whatever else the machine runs. A context manager;
    leaving it lets the process run on."""

    def __init__(self, pid: int, share: float, period: float = 0.1) -> None:
        import threading

        self.pid, self.share, self.period = pid, share, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._cycle, daemon=True)

    def _signal(self, sig) -> bool:
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def _cycle(self) -> None:
        import signal

        while not self._stop.is_set():
            if not self._signal(signal.SIGCONT):
                return
            time.sleep(self.period * self.share)
            if not self._signal(signal.SIGSTOP):
                return
            time.sleep(self.period * (1 - self.share))
        self._signal(signal.SIGCONT)

    def __enter__(self) -> "Throttle":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        import signal

        self._signal(signal.SIGCONT)
