"""Perplexity evaluation windows: the token stream cut into non-overlapping ``seqlen`` rows.

Tokenization follows the GPTQ reference verbatim: ``tokenizer(text, return_tensors="pt")`` on
the whole text at once, i.e. *with* the tokenizer's default special tokens. A LLaMA-style
tokenizer therefore puts one BOS at the very start of the stream (so only window 0 begins with
BOS); tokenizers that add nothing (GPT-2 / SmolLM2 style) give the bare text tokens. Keeping this
call identical is what makes our WikiText-2 / C4 perplexities comparable to published ones.
"""

from __future__ import annotations

from typing import Literal

import torch

from loaq.data.text import c4_validation_text, wikitext2_test_text

EvalDataset = Literal["wikitext2", "c4"]

# GPTQ's `c4_new` scores at most 256 windows of the joined validation text.
C4_EVAL_WINDOWS = 256


def _token_stream(tokenizer, text: str) -> torch.LongTensor:
    """``(1, numel)`` token ids of ``text``, exactly as GPTQ tokenizes evaluation text."""
    return tokenizer(text, return_tensors="pt").input_ids


def eval_windows(
    tokenizer,
    dataset: EvalDataset,
    seqlen: int,
    max_windows: int | None,
    data_dir: str | None,
) -> torch.LongTensor:
    """Non-overlapping evaluation windows, shape ``(n, seqlen)``, int64.

    - ``"wikitext2"``: the whole test text tokenized once; ``n = numel // seqlen`` consecutive
      windows, the tail dropped.
    - ``"c4"``: the joined validation text (:func:`loaq.data.text.c4_validation_text`) tokenized
      once and cut to its first ``256 * seqlen`` tokens; ``n = min(256, numel // seqlen)``.

    Then, if ``max_windows`` is given, only the first ``max_windows`` windows are kept.
    """
    if seqlen <= 0:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    if dataset == "wikitext2":
        ids = _token_stream(tokenizer, wikitext2_test_text(data_dir))
    elif dataset == "c4":
        ids = _token_stream(tokenizer, c4_validation_text(data_dir))[:, : C4_EVAL_WINDOWS * seqlen]
    else:
        raise ValueError(f"unknown evaluation dataset {dataset!r}; expected 'wikitext2' or 'c4'")
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"{dataset}: {ids.numel()} tokens give no full window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[0, : n * seqlen].reshape(n, seqlen).to(torch.long)
