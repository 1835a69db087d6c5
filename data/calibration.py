"""Calibration samples: ``n_samples`` random ``seqlen``-token windows of a pool of documents.

The sampling rule below is part of a calibration set's identity (together with the pool, the
tokenizer and the spec): change it and every downstream quantized weight changes.

Rule (``rng = random.Random(spec.seed)``, a private generator; global RNG state is never touched):

0. **WikiText-2** (``dataset="wikitext2"``) is GPTQ's ``get_wikitext2`` verbatim: the train text
   (:func:`loaq.data.text.wikitext2_train_text`) tokenized once with default special tokens; each
   sample is ``ids[i : i + seqlen]`` with ``i = rng.randint(0, len(ids) - seqlen - 1)``. The other
   sources follow rules 1-4 on their pool.
1. **Pool** = :func:`loaq.data.text.c4_train_docs` for ``c4`` (hub: the 356,317 docs of train shard
   00000; local: its first 1,041 docs), or a user's documents (:mod:`loaq.data.sources`). A doc is
   *long* if its GPTQ tokenization ``tokenizer(doc).input_ids`` (default special tokens) has more
   than ``seqlen`` tokens. Rendered chat documents carry their template's special tokens as text, so
   they are tokenized with ``add_special_tokens=False`` throughout (no second BOS).
2. **Choice of mode.** Pools of more than ``FULL_SCAN_MAX_DOCS`` (10,000) docs always use mode A:
   counting their long docs would mean tokenizing the whole shard, and the C4 shard has far
   more than any ``n_samples`` long docs. Smaller pools are tokenized once in full; mode A is used
   if they hold at least ``n_samples`` long docs, otherwise mode B.
3. **Mode A, "long docs" (GPTQ ``get_c4``, verbatim).** For each sample: repeat
   ``i = rng.randint(0, len(pool) - 1)`` until doc ``i`` is long; then
   ``start = rng.randint(0, L - seqlen - 1)`` with ``L`` its token count; the sample is
   ``ids[start : start + seqlen]``. Docs may repeat. With the hub pool and the same tokenizer
   this reproduces GPTQ's own calibration set for the same seed (same ``random`` call sequence).
4. **Mode B, "pool stream"** (the local 1,041-doc prefix has only ~33 long docs at 2048 tokens
   for a 49k-vocab tokenizer, too few for 128 distinct-doc samples). The stream is
   ``t(doc_0) + t("\\n\\n") + t(doc_1) + t("\\n\\n") + ... + t(doc_last)`` with
   ``t(x) = tokenizer(x, add_special_tokens=False).input_ids`` (documents in pool order; the
   text separator GPTQ uses for WikiText, never a model-specific EOS/chat token). For each
   sample: ``start = rng.randint(0, len(stream) - seqlen)``; the sample is
   ``stream[start : start + seqlen]``. Windows may overlap and may span document boundaries.

5. **Held-out windows** (``sample_holdout``, for the per-layer search): the draws continue the same
   rng after the ``n_samples`` calibration windows, by the same mode; a draw that shares a token
   position with an earlier window (same doc or stream, starts closer than ``seqlen``) is skipped.

Mode A tokenizes lazily (only the docs it draws) on large pools; small pools cost one batched
tokenization of ~2.3 MB of text (about half a second).

A pool that holds fewer than ``n_samples * seqlen`` tokens is refused (one line): its windows would
mostly repeat the same text.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from loaq.data.sources import CalibrationDataError, CalibrationSource, Pool, user_documents
from loaq.data.text import c4_train_docs, wikitext2_train_text

log = logging.getLogger(__name__)

SamplingMode = Literal["long-docs", "pool-stream", "gptq-wikitext2"]

# Above this many docs a pool is sampled GPTQ-style without counting its long docs (rule 2).
FULL_SCAN_MAX_DOCS = 10_000
# Mode A on a large pool gives up after this many draws in a row without a long doc.
_MAX_REJECTED_DRAWS = 100_000
_STREAM_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CalibrationSpec:
    """What calibration set to draw: ``n_samples`` windows of ``seqlen`` tokens from ``source``."""

    source: CalibrationSource = CalibrationSource()
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_samples <= 0 or self.seqlen <= 0:
            raise ValueError(f"n_samples and seqlen must be positive, got {self.n_samples}, {self.seqlen}")


class _LazyDocTokens:
    """GPTQ tokenization (``tokenizer(doc).input_ids``, specials included) of pool docs, memoized."""

    def __init__(self, tokenizer, pool: Sequence[str], add_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._pool = pool
        self._specials = add_special_tokens
        self._ids: dict[int, list[int]] = {}

    def tokenize_all(self) -> None:
        missing = [i for i in range(len(self._pool)) if i not in self._ids]
        encoded = self._tokenizer([self._pool[i] for i in missing], add_special_tokens=self._specials).input_ids
        self._ids.update(zip(missing, encoded))

    def __getitem__(self, i: int) -> list[int]:
        if i not in self._ids:
            self._ids[i] = self._tokenizer(self._pool[i], add_special_tokens=self._specials).input_ids
        return self._ids[i]

    def count_longer_than(self, seqlen: int) -> int:
        self.tokenize_all()
        return sum(len(ids) > seqlen for ids in self._ids.values())


def _choose_mode(doc_tokens: _LazyDocTokens, pool_size: int, spec: CalibrationSpec) -> SamplingMode:
    if pool_size > FULL_SCAN_MAX_DOCS:
        return "long-docs"
    return "long-docs" if doc_tokens.count_longer_than(spec.seqlen) >= spec.n_samples else "pool-stream"


Span = tuple[int, int]  # where a window lies: (doc index, start token); doc -1 for a single token stream


def _long_doc_window(doc_tokens: _LazyDocTokens, pool_size: int, seqlen: int,
                     rng: random.Random) -> tuple[Span, list[int]]:
    for _draw in range(_MAX_REJECTED_DRAWS):
        doc = rng.randint(0, pool_size - 1)
        ids = doc_tokens[doc]
        if len(ids) > seqlen:
            break
    else:
        raise RuntimeError(f"no calibration doc longer than {seqlen} tokens in {_MAX_REJECTED_DRAWS} draws")
    start = rng.randint(0, len(ids) - seqlen - 1)
    return (doc, start), ids[start : start + seqlen]


def _adds_special_tokens(tokenizer) -> bool:
    probe = "a"
    return tokenizer(probe).input_ids != tokenizer(probe, add_special_tokens=False).input_ids


def _pool_stream(tokenizer, pool: Sequence[str], doc_tokens: _LazyDocTokens, chat: bool) -> list[int]:
    separator = tokenizer(_STREAM_SEPARATOR, add_special_tokens=False).input_ids
    if not chat and _adds_special_tokens(tokenizer):
        docs_ids = tokenizer(list(pool), add_special_tokens=False).input_ids
    else:  # the GPTQ tokenization already computed to choose the mode is the same: reuse it
        docs_ids = [doc_tokens[i] for i in range(len(pool))]
    stream: list[int] = []
    for k, ids in enumerate(docs_ids):
        if k:
            stream.extend(separator)
        stream.extend(ids)
    return stream


def _check_enough(n_tokens: int, spec: CalibrationSpec, label: str) -> None:
    if n_tokens < spec.n_samples * spec.seqlen:
        raise CalibrationDataError(
            f"calibration: {label} holds {n_tokens:,} tokens, fewer than calibration.n_samples x calibration.seqlen "
            f"= {spec.n_samples} x {spec.seqlen} = {spec.n_samples * spec.seqlen:,}; give more data or lower them")


def _pool_stream_windows(tokenizer, pool: Pool, doc_tokens: _LazyDocTokens, spec: CalibrationSpec):
    stream = _pool_stream(tokenizer, pool.docs, doc_tokens, pool.chat)
    _check_enough(len(stream), spec, pool.label)

    def window(rng: random.Random) -> tuple[Span, list[int]]:
        start = rng.randint(0, len(stream) - spec.seqlen)
        return (-1, start), stream[start : start + spec.seqlen]
    return window


def _wikitext2_windows(tokenizer, spec: CalibrationSpec, data_dir: str | None):
    ids = tokenizer(wikitext2_train_text(data_dir)).input_ids
    _check_enough(len(ids), spec, "WikiText-2 train")

    def window(rng: random.Random) -> tuple[Span, list[int]]:
        start = rng.randint(0, len(ids) - spec.seqlen - 1)
        return (-1, start), ids[start : start + spec.seqlen]
    return window


def calibration_pool(tokenizer, source: CalibrationSource, data_dir: str | None) -> Pool:
    """The documents rules 1-4 sample from (not for WikiText-2, which is one stream)."""
    if source.dataset == "c4":
        return Pool(c4_train_docs(data_dir), "C4 train")
    return user_documents(tokenizer, source)


def _window_rule(tokenizer, spec: CalibrationSpec, data_dir: str | None):
    """(draw one window from an rng -> (span, ids), mode, pool label, pool size)."""
    if spec.source.dataset == "wikitext2":
        return _wikitext2_windows(tokenizer, spec, data_dir), "gptq-wikitext2", "WikiText-2 train", 1
    pool = calibration_pool(tokenizer, spec.source, data_dir)
    doc_tokens = _LazyDocTokens(tokenizer, pool.docs, add_special_tokens=not pool.chat)
    mode = _choose_mode(doc_tokens, len(pool.docs), spec)
    if mode == "long-docs":
        window = lambda rng: _long_doc_window(doc_tokens, len(pool.docs), spec.seqlen, rng)  # noqa: E731
    else:
        window = _pool_stream_windows(tokenizer, pool, doc_tokens, spec)
    return window, mode, pool.label, len(pool.docs)


def _draw(tokenizer, spec: CalibrationSpec, data_dir: str | None, n_held: int = 0):
    """The calibration windows, their mode, and ``n_held`` further windows of the same rule that
    overlap none of them (the draws continue the same rng; an overlapping draw is skipped)."""
    rng = random.Random(spec.seed)
    window, mode, label, size = _window_rule(tokenizer, spec, data_dir)
    drawn = [window(rng) for _ in range(spec.n_samples)]
    log.info("calibration: %d x %d tokens of %s (%d-doc pool, mode %s, seed %d)",
             spec.n_samples, spec.seqlen, label, size, mode, spec.seed)
    taken = [span for span, _ in drawn]
    held = []
    for _attempt in range(_MAX_REJECTED_DRAWS):
        if len(held) == n_held:
            break
        (doc, start), ids = window(rng)
        if any(doc == d and abs(start - s) < spec.seqlen for d, s in taken):
            continue
        taken.append((doc, start))
        held.append(ids)
    else:
        raise CalibrationDataError(
            f"calibration: {label} has no room for {n_held} held-out windows of {spec.seqlen} tokens beside the "
            f"{spec.n_samples} calibration windows; lower quantize.search.holdout or calibration.n_samples")
    return [ids for _, ids in drawn], mode, held


def sample_calibration_with_mode(
    tokenizer, spec: CalibrationSpec, data_dir: str | None
) -> tuple[torch.LongTensor, SamplingMode]:
    """Like :func:`sample_calibration`, also returning which mode of the rule drew the samples."""
    samples, mode, _ = _draw(tokenizer, spec, data_dir)
    return torch.tensor(samples, dtype=torch.long), mode


def sample_holdout(tokenizer, spec: CalibrationSpec, n_held: int, data_dir: str | None) -> torch.LongTensor:
    """``n_held`` windows, shape ``(n_held, spec.seqlen)``, drawn by the calibration's rule after its
    ``n_samples`` windows (the same rng, continued) and sharing no token position with any of them."""
    return torch.tensor(_draw(tokenizer, spec, data_dir, n_held)[2], dtype=torch.long).reshape(n_held, spec.seqlen)


def sample_calibration(tokenizer, spec: CalibrationSpec, data_dir: str | None) -> torch.LongTensor:
    """Calibration token windows, shape ``(spec.n_samples, spec.seqlen)``, int64.

    Deterministic for (pool, tokenizer, spec); the rule is given in this module's docstring.
    """
    return sample_calibration_with_mode(tokenizer, spec, data_dir)[0]
