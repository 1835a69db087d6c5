"""A process that takes store locks when told on stdin (tests of locks across processes).

    python lockproc.py URL [--host NAME]
stdin "try"  -> tries the run lock once, prints "won" or "lost"
stdin "release" -> releases it if held, prints "ok"
stdin "write KEY" -> opens a record writer of KEY and keeps it open, prints "writing"
"""

from __future__ import annotations

import socket
import sys

if "--host" in sys.argv:  # another host, as far as the lock can tell
    name = sys.argv[sys.argv.index("--host") + 1]
    socket.gethostname = lambda: name

from loaq.store import Store, StoreLocked  # noqa: E402

store = Store(sys.argv[1])
lock = None
writers = []
for line in sys.stdin:
    command, *args = line.split()
    if command == "try":
        candidate = store.lock("run", timeout=0.0)
        try:
            candidate.acquire()
            lock = candidate
            print("won", flush=True)
        except StoreLocked:
            print("lost", flush=True)
    elif command == "release":
        if lock is not None:
            lock.release()
            lock = None
        print("ok", flush=True)
    elif command == "write":
        writer = store.writer(args[0], kind="stats")
        writer.__enter__()
        writers.append(writer)
        print("writing", flush=True)
