"""Inter-process locks on a store, and the store's consistency model.

``store.lock("run")`` is taken by ``loaq run`` for its whole duration, so two runs on one
store never write at the same time; the second one waits up to its timeout, then fails with
``StoreLocked`` naming the holder (pid, host, since, command line), read from the lock's info
file ``<root>/locks/<name>.json`` which the holder writes right after acquiring.

Consistency model
-----------------
* Records are immutable once complete, and a record is complete exactly when its group's
  ``zarr.json`` carries the completion mark, written last in one write: an atomic rename on a
  local filesystem, a single PUT on an object store. Readers never look at unmarked records,
  so a crash at any point leaves either a complete record or an ignored, overwritable one.
* Two writers never share a directory: the key is the directory. Within a process a second
  writer of the same key fails fast (``RecordBusy``); across processes the run lock keeps
  runs apart. No per-record file locks are used: records of distinct keys are independent,
  and within a run the orchestrator decides who computes what. A zoo (``loaq.flows.zoo``) is
  one such orchestrator over several processes or hosts: it holds the run lock for all its
  members, which do not take it, and gives each record one writer (a model's members run in
  order in one child; different models share no key).
* Local stores: the lock is a real ``flock`` (via ``filelock``) on ``<root>/locks/<name>.lock``;
  the kernel releases it when the holder dies, so there are no stale locks. ``flock`` is
  reliable on local disks; on NFS/Lustre it depends on the mount (use a local store, or accept
  the lock as advisory there).
* S3 and ``memory://`` stores: the lock is an object, ``<root>/locks/<name>.json``, created with
  a conditional PUT (``If-None-Match: *``; see ``conditional``), so of any number of processes
  on any number of hosts exactly one gets it. It holds a lease (``LOAQ_LOCK_LEASE_SECONDS``,
  default 60 s) that the holder renews every third of it with a compare-and-swap PUT
  (``If-Match``); a holder that died stops blocking when its lease runs out (at once when it ran
  on this host and its pid is gone), and the next one takes the lock over with the same
  compare-and-swap, so two waiters never both take it over. A holder that could not renew in
  time has lost the lock: ``check()`` then raises ``StoreLocked``, and a record writer holding a
  lost record lock does not mark its record complete. Releasing is a compare-and-swap too (the
  object is marked released, not deleted), so it never removes a lock taken over meanwhile. This
  needs a server that honours conditional writes (AWS S3, and S3-compatible servers that implement them); leases compare
  the holder's clock with the reader's, so hosts' clocks must agree to well within a lease.
* Other fsspec URLs: no create-if-absent is used, so the lock is *advisory*: the info file
  itself is the lock, checked then written (two processes starting within one round trip may
  both get it); a stale one is taken over when its pid is known dead on this same host.
  Where runs on such a store are started by a scheduler, let it serialise them (the
  deployments in prefect.yaml have a concurrency limit of 1, enforced by the Prefect server).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import filelock

from .conditional import Lost, conditional_ops
from .errors import StoreLocked
from .layout import LOCKS_DIR, check_name

#: How often a waiting advisory (object-store) lock looks again.
ADVISORY_POLL_SECONDS = 0.1
#: Lease of a lock on object storage, in seconds, unless ``LOAQ_LOCK_LEASE_SECONDS`` says otherwise.
DEFAULT_LEASE_SECONDS = 60.0
LEASE_ENV = "LOAQ_LOCK_LEASE_SECONDS"
#: The field of a lease object that its holder released (``StoreLock.release``).
RELEASED = "released"


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV) or DEFAULT_LEASE_SECONDS)


class StoreLock:
    """An exclusive lock named ``name`` on a store; a context manager (not re-entrant)."""

    def __init__(self, fs, root: str, name: str, *, timeout: float | None, native: bool) -> None:
        self.name = check_name(name, "lock name")
        self.timeout = timeout
        directory = f"{root.rstrip('/')}/{LOCKS_DIR}"
        self.lock_path = f"{directory}/{name}.lock"
        self.info_path = f"{directory}/{name}.json"
        self._fs = fs
        self._native = native
        self._directory = directory
        self._file_lock: filelock.BaseFileLock | None = None
        self._token: str | None = None  # identifies our info file (advisory locks)
        self._ops = None if native else conditional_ops(fs)
        self._version: str | None = None  # the lease object's version we wrote last
        self._lease = lease_seconds()
        self._lost = False
        self._renewed_at = 0.0  # monotonic time of the last write of the lease that succeeded
        self._renewer: threading.Thread | None = None
        self._stop_renewing = threading.Event()

    @property
    def held(self) -> bool:
        return self._token is not None

    def holder(self) -> dict[str, Any] | None:
        """The holder's info (pid, host, since, argv), or None if none is recorded."""
        try:
            info = json.loads(self._fs.cat_file(self.info_path))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and not _released(info) else None

    def acquire(self) -> StoreLock:
        if self.held:
            raise RuntimeError(f"store lock {self.name!r} is already held by this object")
        self._fs.makedirs(self._directory, exist_ok=True)
        if self._native:
            self._acquire_native()
        elif self._ops is not None:
            self._acquire_lease()
        else:
            self._acquire_advisory()
        return self

    def check(self) -> None:
        """Raise ``StoreLocked`` if a lease was lost (not renewed in time, taken over)."""
        lapsed = self._renewer is not None and time.monotonic() - self._renewed_at > self._lease
        if self._lost or lapsed:
            raise StoreLocked(f"store lock {self.name!r} at {self.info_path}: its lease of {self._lease:g} s "
                              f"ran out before it was renewed, and another process may hold it now")

    def release(self) -> None:
        if not self.held:
            return
        if self._renewer is not None:
            self._stop_renewing.set()
            self._renewer.join(timeout=10)
            self._renewer = None
        try:
            if self._ops is not None:
                self._release_lease()
            elif self.holder_token() == self._token:
                self._fs.rm_file(self.info_path)
        except OSError:
            pass  # the next holder overwrites it anyway
        finally:
            self._token = None
            if self._file_lock is not None:
                self._file_lock.release()
                self._file_lock = None

    def held_elsewhere(self) -> bool:
        """True while a holder other than this object has the lock and its lease has not run out."""
        holder = self.holder()
        return not self.held and holder is not None and not _lease_expired(holder)

    def _release_lease(self) -> None:
        """Mark the lease released by a compare-and-swap on the version this holder wrote last, so a
        lock taken over since (its lease ran out) stays its new holder's. Reading the token and then
        deleting would delete the new holder's lock if the takeover fell between the two."""
        try:
            self._ops.replace(self.info_path, json.dumps({"name": self.name, RELEASED: True}).encode(),
                              self._version)
        except Lost:
            pass

    def holder_token(self) -> str | None:
        return (self.holder() or {}).get("token")

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    # -- internals --------------------------------------------------------------------------

    def _acquire_native(self) -> None:
        file_lock = filelock.FileLock(self.lock_path, thread_local=False)
        wait = -1 if self.timeout is None else max(0.0, self.timeout)
        try:
            file_lock.acquire(timeout=wait)
        except filelock.Timeout:
            raise StoreLocked(self._held_message()) from None
        self._file_lock = file_lock
        try:
            self._write_info()
        except BaseException:
            self._token = None
            file_lock.release()
            self._file_lock = None
            raise

    def _acquire_advisory(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + max(0.0, self.timeout)
        while True:
            holder = self.holder()
            if holder is None or _is_dead_local_process(holder):
                self._write_info()
                if self.holder_token() == self._token:  # re-read: the last writer wins
                    return
                self._token = None
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreLocked(self._held_message())
            time.sleep(ADVISORY_POLL_SECONDS)

    def _acquire_lease(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + max(0.0, self.timeout)
        while True:
            current = self._ops.read(self.info_path)
            try:
                if current is None:
                    self._version = self._ops.create(self.info_path, self._new_info())
                    break
                data, version = current
                if _lease_expired(_parse(data)):
                    self._version = self._ops.replace(self.info_path, self._new_info(), version)
                    break
            except Lost:
                pass  # someone else wrote first
            self._token = None
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreLocked(self._held_message())
            time.sleep(ADVISORY_POLL_SECONDS)
        self._lost = False
        self._renewed_at = time.monotonic()
        self._stop_renewing.clear()
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop_renewing.wait(self._lease / 3):
            try:
                started = time.monotonic()
                self._version = self._ops.replace(self.info_path, self._info_bytes(), self._version)
                self._renewed_at = started
            except Lost:
                self._lost = True
                return
            except Exception:  # a transient store error: the next tick tries again within the lease
                continue

    def _new_info(self) -> bytes:
        self._token = uuid.uuid4().hex
        self._since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return self._info_bytes()

    def _info_bytes(self) -> bytes:
        info = {
            "name": self.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": self._since,
            "argv": sys.argv,
            "token": self._token,
            "lease_s": self._lease,
            "expires": time.time() + self._lease,
        }
        return json.dumps(info).encode()

    def _write_info(self) -> None:
        self._token = uuid.uuid4().hex
        info = {
            "name": self.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv,
            "token": self._token,
        }
        self._fs.pipe_file(self.info_path, json.dumps(info).encode())

    def _held_message(self) -> str:
        holder = self.holder()
        waited = "not waiting" if not self.timeout else f"waited {self.timeout:g} s"
        if holder is None:
            who = "another process (it recorded no holder info yet)"
        else:
            command = " ".join(holder.get("argv") or [])
            who = (
                f"pid {holder.get('pid')} on host {holder.get('host')} "
                f"since {holder.get('since')}" + (f" ({command})" if command else "")
            )
        where = (self.lock_path if self._native else self.info_path if self._ops is not None
                 else f"{self.info_path} (advisory)")
        if self._ops is not None and holder is not None and isinstance(holder.get("expires"), (int, float)):
            who += f", lease ending in {max(0.0, holder['expires'] - time.time()):.0f} s"
        return f"store lock {self.name!r} at {where} is held by {who}; {waited}"


def remove_released(fs, root: str) -> None:
    """Delete the objects of released leases under ``root``'s locks folder (an object store marks a
    lease released instead of deleting it, one small object per record ever written). Call with the
    run lock held: every record writer works under it, so none is taking one of these over meanwhile."""
    directory = f"{root.rstrip('/')}/{LOCKS_DIR}"
    try:
        paths = [p for p in fs.ls(directory, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return
    for path in paths:
        try:
            if _released(_parse(fs.cat_file(path)) or {}):
                fs.rm_file(path)
        except FileNotFoundError:
            continue


def _released(info: dict[str, Any]) -> bool:
    return info.get(RELEASED) is True


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(data)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _lease_expired(holder: dict[str, Any] | None) -> bool:
    """An unreadable lock, a lease past its end, or a holder known dead on this host."""
    if holder is None or not isinstance(holder.get("expires"), (int, float)):
        return True
    return time.time() > holder["expires"] or _is_dead_local_process(holder)


def _is_dead_local_process(holder: dict[str, Any]) -> bool:
    """True if the holder ran on this host and its pid no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists but not ours (EPERM)
    return False
