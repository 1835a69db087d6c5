"""The raw evaluation and calibration text, exactly as GPTQ-style code builds it.

``data_dir=None`` loads from the Hugging Face hub with ``datasets`` (the loaders GPTQ, SparseGPT
and AWQ use); a path reads the verified local copies described in ``shared/data/README.md``.
Both give the same strings where the local copy is complete (WikiText-2 test); the local C4
files are prefixes of the hub shards, so C4 figures from them carry their own label
(:func:`c4_validation_label`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache

from loaq.data.checksums import verified_file

WIKITEXT2_TEST_FILE = ("wikitext-2-raw", "wiki.test.raw")
C4_VALIDATION_FILE = ("c4", "c4-validation.00000-of-00008.first-1025.text-only.jsonl")
C4_TRAIN_FILE = ("c4", "c4-train.00000-of-01024.first-1041.text-only.jsonl")

# GPTQ's `c4_new` evaluation joins the first 1,100 documents of validation shard 00000.
C4_EVAL_DOCS = 1100

_C4_HUB_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"
_C4_HUB_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"


@lru_cache(maxsize=4)
def wikitext2_test_text(data_dir: str | None) -> str:
    """The WikiText-2 (raw) test split as one string: ``"\\n\\n".join(rows)``.

    Rows are the HF loader's: one per line of ``wiki.test.raw``, kept verbatim (leading space and
    trailing ``"\\n"`` included) unless whitespace-only, which becomes ``""``. 4,358 rows,
    1,294,336 characters. Never strip rows, drop empty ones or read the file as one string:
    each changes the token stream and hence the perplexity.
    """
    if data_dir is None:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    else:
        path = verified_file(data_dir, *WIKITEXT2_TEST_FILE)
        with path.open(encoding="utf-8") as f:  # line iteration, exactly like the HF loader
            rows = [line if line.strip() else "" for line in f]
    return "\n\n".join(rows)


def _read_jsonl_texts(path, limit: int | None = None) -> tuple[str, ...]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(texts) >= limit:
                break
            texts.append(json.loads(line)["text"])
    return tuple(texts)


@lru_cache(maxsize=4)
def _c4_validation_docs(data_dir: str | None) -> tuple[str, ...]:
    if data_dir is None:
        from datasets import load_dataset

        shard = load_dataset(
            "allenai/c4", data_files={"validation": _C4_HUB_VALIDATION_SHARD}, split="validation"
        )
        return tuple(shard[:C4_EVAL_DOCS]["text"])
    return _read_jsonl_texts(verified_file(data_dir, *C4_VALIDATION_FILE), C4_EVAL_DOCS)


def c4_validation_docs(data_dir: str | None) -> list[str]:
    """The first ``C4_EVAL_DOCS`` (1,100) docs of C4 ``en`` validation shard 00000, in shard order.

    The local file holds only the first 1,025, so locally this returns 1,025 docs.
    """
    return list(_c4_validation_docs(data_dir))


def c4_validation_doc_count(data_dir: str | None) -> int:
    """How many documents :func:`c4_validation_text` joins (1,100 from the hub, 1,025 locally)."""
    return len(_c4_validation_docs(data_dir))


def c4_validation_label(data_dir: str | None) -> str:
    """How a report must name a C4 perplexity computed from this text.

    ``"C4"`` only for GPTQ's full 1,100-doc protocol; otherwise e.g. ``"C4 (first 1,025 val docs)"``,
    because fewer docs can mean a different (shorter) token stream than the standard figure.
    """
    n = c4_validation_doc_count(data_dir)
    return "C4" if n >= C4_EVAL_DOCS else f"C4 (first {n:,} val docs)"


def c4_validation_text(data_dir: str | None) -> str:
    """GPTQ ``c4_new`` evaluation text: ``' '.join`` of the first 1,100 validation docs (1,025 locally)."""
    return " ".join(_c4_validation_docs(data_dir))


class _HubTextColumn(Sequence[str]):
    """A lazy ``text`` column of a hub dataset: the 356k-doc train shard stays memory-mapped."""

    def __init__(self, dataset) -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._dataset[j]["text"] for j in range(*i.indices(len(self)))]
        return self._dataset[i]["text"]


@lru_cache(maxsize=4)
def _c4_train_docs(data_dir: str | None) -> Sequence[str]:
    if data_dir is None:
        from datasets import load_dataset

        shard = load_dataset("allenai/c4", data_files={"train": _C4_HUB_TRAIN_SHARD}, split="train")
        return _HubTextColumn(shard)
    return _read_jsonl_texts(verified_file(data_dir, *C4_TRAIN_FILE))


def c4_train_docs(data_dir: str | None) -> Sequence[str]:
    """The calibration pool: C4 ``en`` train shard 00000, in shard order.

    From the hub: all 356,317 docs as a lazy, read-only sequence (memory-mapped, like GPTQ's
    ``traindata``). Locally: a list of its first 1,041 docs.
    """
    docs = _c4_train_docs(data_dir)
    return docs if isinstance(docs, _HubTextColumn) else list(docs)


WIKITEXT2_TRAIN_FILE = ("wikitext-2-raw", "wiki.train.raw")
# The canonical wiki.train.raw of wikitext-2-raw-v1.zip (shared/data/README.md): a local copy must be it.
WIKITEXT2_TRAIN_SHA256 = "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57"


@lru_cache(maxsize=2)
def wikitext2_train_text(data_dir: str | None) -> str:
    """The WikiText-2 (raw) train split as one string, rows built like :func:`wikitext2_test_text`.

    Locally ``<data_dir>/wikitext-2-raw/wiki.train.raw``, which must hash to the canonical
    ``WIKITEXT2_TRAIN_SHA256``; with ``data_dir=None`` the hub's ``wikitext-2-raw-v1`` train split.
    """
    if data_dir is None:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
        return "\n\n".join(rows)
    from pathlib import Path

    from loaq.data.checksums import DataFileError, DataFileMissing, _sha256_of

    path = Path(data_dir).expanduser().joinpath(*WIKITEXT2_TRAIN_FILE)
    if not path.is_file():
        raise DataFileMissing(f"calibration.dataset=wikitext2 needs {path} (wiki.train.raw of wikitext-2-raw-v1, "
                              f"sha256 {WIKITEXT2_TRAIN_SHA256}); place it there, or set data_dir: null for the hub")
    actual = _sha256_of(path)
    if actual != WIKITEXT2_TRAIN_SHA256:
        raise DataFileError(f"checksum mismatch for {path}: sha256 {actual}, expected the canonical "
                            f"{WIKITEXT2_TRAIN_SHA256} (calibration.dataset=wikitext2)")
    with path.open(encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    return "\n\n".join(rows)
