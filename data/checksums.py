"""Integrity of the local data files: every file is checked against its folder's SHA256SUMS.

The local copies under ``data_dir`` (see ``shared/data/README.md``) were rebuilt by hand from
several sources; a silently different byte changes every perplexity and accuracy we report, so a
file is only ever read through :func:`verified_file`. Each file is hashed once per process.

Layout: ``<data_dir>/<folder>/SHA256SUMS`` lists ``<sha256>  <path relative to folder>`` lines
(the ``sha256sum`` format), e.g. ``c4/SHA256SUMS`` or ``zeroshot/SHA256SUMS``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path

SUMS_FILE = "SHA256SUMS"
_SUMS_LINE = re.compile(r"^(?P<digest>[0-9a-fA-F]{64}) [ *](?P<name>.+)$")

_verified: set[Path] = set()
_lock = threading.Lock()


class DataFileError(RuntimeError):
    """A local data file is missing, unlisted in SHA256SUMS, or has the wrong content.

    The message is a single line that names the file, so a failed run says what to fix.
    """


class DataFileMissing(DataFileError, FileNotFoundError):
    """The data file (or its folder's SHA256SUMS) does not exist."""


def _expected_sha256(folder: Path, name: str) -> str:
    sums = folder / SUMS_FILE
    if not sums.is_file():
        raise DataFileMissing(f"checksum list missing: {sums} (needed to verify {folder / name})")
    for line in sums.read_text(encoding="utf-8").splitlines():
        # `sha256sum` lines: "<64 hex>  <name>" (text mode) or "<64 hex> *<name>" (binary mode).
        listed = _SUMS_LINE.match(line.rstrip("\r\n"))
        if listed and listed["name"] == name:
            return listed["digest"].lower()
    raise DataFileError(f"{folder / name} is not listed in {sums}")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_file(data_dir: str | Path, folder: str, name: str) -> Path:
    """Path of ``<data_dir>/<folder>/<name>`` after checking it against ``<folder>/SHA256SUMS``.

    Args:
        data_dir: the local data root (e.g. ``../shared/data``).
        folder: the top-level data folder that owns the SHA256SUMS list (``"c4"``, ``"zeroshot"``…).
        name: the file's path relative to ``folder``, exactly as SHA256SUMS lists it.

    Raises:
        DataFileMissing: the file or the SHA256SUMS list does not exist.
        DataFileError: the file is not listed, or its SHA-256 differs from the listed one.
    """
    base = Path(data_dir).expanduser() / folder
    path = base / name
    if not path.is_file():
        raise DataFileMissing(f"data file missing: {path}")
    key = path.resolve()
    with _lock:
        if key in _verified:
            return path
    expected = _expected_sha256(base, name)
    actual = _sha256_of(path)
    if actual != expected:
        raise DataFileError(
            f"checksum mismatch for {path}: sha256 {actual}, expected {expected} (from {base / SUMS_FILE})"
        )
    with _lock:
        _verified.add(key)
    return path
