"""Calibration sampling and evaluation text, from verified local files or the hub.

    text         the raw strings (WikiText-2 test, C4 validation / train) exactly as GPTQ builds them
    windows      perplexity windows: the tokenized text cut into (n, seqlen) rows
    calibration  the calibration set: (n_samples, seqlen) random windows of a pool of documents
    sources      the pools: C4 train, WikiText-2 train, a user's files or a hub dataset (chat rendered)
    checksums    every local file is checked against its folder's SHA256SUMS before use
"""

from loaq.data.calibration import CalibrationSpec, sample_calibration
from loaq.data.checksums import DataFileError, DataFileMissing, verified_file
from loaq.data.sources import CalibrationDataError, CalibrationSource
from loaq.data.text import (
    c4_train_docs,
    c4_validation_doc_count,
    c4_validation_label,
    c4_validation_text,
    wikitext2_test_text,
)
from loaq.data.windows import eval_windows

__all__ = [
    "CalibrationDataError",
    "CalibrationSource",
    "CalibrationSpec",
    "DataFileError",
    "DataFileMissing",
    "c4_train_docs",
    "c4_validation_doc_count",
    "c4_validation_label",
    "c4_validation_text",
    "eval_windows",
    "sample_calibration",
    "verified_file",
    "wikitext2_test_text",
]
