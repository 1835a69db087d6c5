"""The execution log: what each run computed, what it reused, and what failed.

One append-only JSON Lines file per run, ``<root>/events/<run_id>.jsonl``; one line per stage
execution::

    {"time": ISO-8601 UTC, "run_id", "stage", "key", "action": "computed"|"reused"|"failed",
     "seconds": float|null, "nbytes": int|null, "detail": str|null, "result": object|null,
     "pid", "host"}

``detail`` (the reason of a failure) and ``result`` (JSON, e.g. the store keys a unit of work
produced) are how work run elsewhere, such as a zoo member on another worker, tells whoever
reads the store how it ended, without sharing anything but the store.

This is how a test (or a user) checks that a second identical run recomputed nothing, or that a
variant reused the shared prefix of a chain. Locally each event is one ``write`` of one line on
a file opened in append mode, so concurrent appends do not interleave and a crash loses at most
the line being written (a torn last line is skipped when reading). On filesystems without
append (object stores) the file is rewritten per event; a run id belongs to one process, so
nothing else writes that file meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime, timezone
from typing import Any

from .layout import EVENTS_DIR, check_name

log = logging.getLogger(__name__)

#: What a stage did with its record.
ACTIONS = ("computed", "reused", "failed")


class EventLog:
    """The ``events/`` directory of a store."""

    def __init__(self, fs, root: str) -> None:
        self._fs = fs
        self._directory = f"{root.rstrip('/')}/{EVENTS_DIR}"

    def append(
        self,
        run_id: str,
        stage: str,
        key: str,
        action: str,
        *,
        seconds: float | None = None,
        nbytes: int | None = None,
        detail: str | None = None,
        result: Any = None,
    ) -> dict[str, Any]:
        check_name(run_id, "run id")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        event = {
            "time": datetime.now(timezone.utc).isoformat(),
            "run_id": run_id,
            "stage": str(stage),
            "key": str(key),
            "action": action,
            "seconds": None if seconds is None else float(seconds),
            "nbytes": None if nbytes is None else int(nbytes),
            "detail": None if detail is None else str(detail),
            "result": result,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        line = (json.dumps(event, sort_keys=True) + "\n").encode("utf-8")
        self._fs.makedirs(self._directory, exist_ok=True)
        path = self._path(run_id)
        try:
            with self._fs.open(path, "ab") as f:
                f.write(line)
        except (NotImplementedError, ValueError):  # no append on this filesystem
            previous = self._fs.cat_file(path) if self._fs.exists(path) else b""
            self._fs.pipe_file(path, previous + line)
        return event

    def read(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Events of ``run_id`` in logging order; of all runs ordered by time if None."""
        if run_id is not None:
            check_name(run_id, "run id")
            return self._read_file(self._path(run_id))
        if not self._fs.exists(self._directory):
            return []
        events = []
        for path in sorted(self._fs.ls(self._directory, detail=False)):
            if path.endswith(".jsonl"):
                events.extend(self._read_file(path))
        return sorted(events, key=lambda e: e.get("time", ""))  # stable: keeps per-run order

    def _path(self, run_id: str) -> str:
        return f"{self._directory}/{run_id}.jsonl"

    def _read_file(self, path: str) -> list[dict[str, Any]]:
        try:
            raw = self._fs.cat_file(path)
        except FileNotFoundError:
            return []
        events = []
        for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError:  # a line torn by a crash while it was being appended
                log.warning("skipping unreadable line %d of %s", number, path)
        return events
