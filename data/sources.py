"""Where calibration text comes from: the C4 pool, WikiText-2 train, a user's files, a hub dataset.

A source yields a *pool* of documents; :mod:`loaq.data.calibration` draws the windows from it.
User data is read with the ``datasets`` library (jsonl, json, parquet, csv, txt, or a folder of
them); a ``messages`` column (lists of ``{role, content}``) is rendered with the model's own chat
template, so a chat model is calibrated on the token layout it sees when it serves.

A local source is identified by its content (:func:`content_digest`), never by its path: moving
a file keeps its calibration records, editing it makes new ones.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CalibrationDataset = Literal["c4", "wikitext2", "local", "hub"]

#: ``datasets`` builders by file suffix; a folder is handed to ``load_dataset`` whole.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}

_digests: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


class CalibrationDataError(ValueError):
    """A calibration source the user must fix; the message is one line naming the field."""


@dataclass(frozen=True)
class CalibrationSource:
    """Which documents to calibrate on (``dataset``), and for user data where and which column.

    ``path``: a local file or folder (``dataset="local"``); ``id``/``subset``/``split``/``revision``:
    a hub dataset (``dataset="hub"``). ``field`` names the text column; ``messages`` instead names a
    column of chat messages, rendered with the tokenizer's chat template.
    """

    dataset: CalibrationDataset = "c4"
    path: str | None = None
    id: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    field: str = "text"
    messages: str | None = None

    def __post_init__(self) -> None:
        if self.dataset == "local" and not self.path:
            raise CalibrationDataError("calibration.source.path is required for calibration.dataset=local")
        if self.dataset == "hub" and not self.id:
            raise CalibrationDataError("calibration.source.id (a hub dataset id) is required for "
                                       "calibration.dataset=hub")

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def column(self) -> str:
        return self.messages if self.messages is not None else self.field

    @property
    def column_field(self) -> str:
        return "calibration.source." + ("messages" if self.chat else "field")


@dataclass(frozen=True)
class Pool:
    """Documents to sample from; ``chat`` documents are rendered templates (their specials are text)."""

    docs: Sequence[str]
    label: str
    chat: bool = False


def _data_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)


def _existing(source: CalibrationSource) -> Path:
    path = Path(source.path).expanduser()
    if not path.exists():
        raise CalibrationDataError(f"calibration.source.path {source.path!r} does not exist (give a jsonl, json, "
                                   f"parquet, csv or txt file, or a folder of them)")
    if path.is_file() and path.suffix not in BUILDERS:
        raise CalibrationDataError(f"calibration.source.path {source.path!r}: {path.suffix or 'no suffix'} is not a "
                                   f"readable format; use one of {', '.join(BUILDERS)}")
    if path.is_dir() and not _data_files(path):
        raise CalibrationDataError(f"calibration.source.path {source.path!r} is a folder without "
                                   f"{'/'.join(BUILDERS)} files")
    return path


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if memo in _digests:
            return _digests[memo]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    with _lock:
        _digests[memo] = digest.hexdigest()
    return _digests[memo]


def content_digest(source: CalibrationSource) -> str:
    """sha256 of a local file, or of a folder's data files (their names relative to it, and contents)."""
    path = _existing(source)
    if path.is_file():
        return _file_sha256(path)
    digest = hashlib.sha256()
    for file in _data_files(path):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _load_local(source: CalibrationSource):
    from datasets import load_dataset

    path = _existing(source)
    if path.is_file():
        if path.stat().st_size == 0:
            raise CalibrationDataError(f"calibration.source.path {source.path!r} is empty")
        return load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train")
    return load_dataset(str(path), split=source.split)


def _load_hub(source: CalibrationSource):
    from datasets import load_dataset

    try:
        return load_dataset(source.id, source.subset, split=source.split, revision=source.revision)
    except Exception as e:  # noqa: BLE001 - offline, unknown id or split: the user's to fix
        raise CalibrationDataError(f"calibration.source.id {source.id!r} (split {source.split!r}) cannot be "
                                   f"loaded: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _render(tokenizer, source: CalibrationSource, rows: list) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationDataError(f"calibration.source.messages={source.messages!r}: the model's tokenizer has no "
                                   f"chat template; name a text column with calibration.source.field instead")
    docs = []
    for i, messages in enumerate(rows):
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise CalibrationDataError(f"calibration.source.messages={source.messages!r}: row {i} is not a list of "
                                       f"{{role, content}} messages")
        if messages:
            docs.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return docs


def user_documents(tokenizer, source: CalibrationSource) -> Pool:
    """The documents of a local or hub source: the named text column, or rendered chat messages."""
    dataset = _load_local(source) if source.dataset == "local" else _load_hub(source)
    where = repr(source.path) if source.dataset == "local" else f"{source.id!r} ({source.split})"
    if len(dataset) == 0:
        raise CalibrationDataError(f"calibration.source: {where} holds no rows")
    if source.column not in dataset.column_names:
        raise CalibrationDataError(f"{source.column_field}={source.column!r} is not a column of {where} "
                                   f"(columns: {', '.join(dataset.column_names)})")
    rows = dataset[source.column]
    if source.chat:
        docs = _render(tokenizer, source, rows)
    else:
        bad = next((i for i, r in enumerate(rows) if r is not None and not isinstance(r, str)), None)
        if bad is not None:
            raise CalibrationDataError(f"{source.column_field}={source.column!r}: row {bad} is "
                                       f"{type(rows[bad]).__name__}, not text (a chat column? name it with "
                                       f"calibration.source.messages)")
        docs = [r for r in rows if r and r.strip()]
    if not docs:
        raise CalibrationDataError(f"{source.column_field}={source.column!r}: {where} has no non-empty text")
    return Pool(docs, f"{Path(source.path).name if source.dataset == 'local' else source.id}", chat=source.chat)
