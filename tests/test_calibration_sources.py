"""Calibration on a user's data: chat messages through the chat template, a named column, bad input
in one line, and a key that follows the data's content rather than its path."""

from __future__ import annotations

import json
import shutil

import pytest

from chatkit import MARKERS, add_chat_template, conversations
from flowkit import error_line, make_checkpoint, write_config
from loaq.configs.schema import CalibrationConfig, ModelConfig
from loaq.data import CalibrationSource, CalibrationSpec, sample_calibration
from loaq.stages.model import prepare_model
from loaq.stages.keys import calibration_key


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("model") / "tiny-chat", layers=2)
    return add_chat_template(folder)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def is_sublist(window: list[int], stream: list[int]) -> bool:
    n = len(window)
    return any(stream[i:i + n] == window for i in range(len(stream) - n + 1))


def joined(tokenizer, docs_ids: list[list[int]]) -> list[int]:
    """Documents' tokens joined by the pool's separator, as the pool-stream rule joins them."""
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    out: list[int] = []
    for k, ids in enumerate(docs_ids):
        out += (sep if k else []) + ids
    return out


def test_chat_messages_are_rendered_with_the_chat_template(tmp_path, tokenizer):
    rows = conversations(40)
    source = CalibrationSource(dataset="local", path=str(write_jsonl(tmp_path / "chats.jsonl", rows)),
                               messages="messages")
    tokens = sample_calibration(tokenizer, CalibrationSpec(source=source, n_samples=6, seqlen=48, seed=3), None)
    assert tokens.shape == (6, 48)
    # The template's own tokens, computed by transformers from the messages.
    templated = [tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"] for r in rows]
    stream = joined(tokenizer, templated)
    start, end = (tokenizer.convert_tokens_to_ids(m) for m in MARKERS)
    for window in tokens.tolist():
        assert is_sublist(window, stream)
    assert sum(w.count(start) + w.count(end) for w in tokens.tolist()) >= 6  # the markers are single tokens
    plain = [tokenizer(json.dumps(r["messages"])).input_ids for r in rows]
    assert not any(is_sublist(w, joined(tokenizer, plain)) for w in tokens.tolist())


def test_parquet_file_with_a_named_field(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bodies = [f"document {i} speaks of rivers, bridges and the {i}th mill on the hill." for i in range(50)]
    table = pa.table({"title": [f"t{i}" for i in range(50)], "body": bodies})
    pq.write_table(table, tmp_path / "docs.parquet")
    spec = CalibrationSpec(source=CalibrationSource(dataset="local", path=str(tmp_path / "docs.parquet"),
                                                    field="body"), n_samples=5, seqlen=40, seed=0)
    tokens = sample_calibration(tokenizer, spec, None)
    stream = joined(tokenizer, [tokenizer(b, add_special_tokens=False).input_ids for b in bodies])
    assert tokens.shape == (5, 40)
    assert all(is_sublist(w, stream) for w in tokens.tolist())
    again = sample_calibration(tokenizer, spec, None)
    assert tokens.equal(again)
    titles = CalibrationSpec(source=CalibrationSource(dataset="local", path=str(tmp_path / "docs.parquet"),
                                                      field="title"), n_samples=1, seqlen=8, seed=0)
    assert not is_sublist(sample_calibration(tokenizer, titles, None)[0].tolist(), stream)


def test_calibration_key_follows_content_not_path(tmp_path, checkpoint):
    model = prepare_model.fn(ModelConfig(source=str(checkpoint)), str(tmp_path / "models"))
    (tmp_path / "a").mkdir()
    first = write_jsonl(tmp_path / "a" / "chats.jsonl", conversations(10))

    def key(path):
        cfg = CalibrationConfig(dataset="local", source={"path": str(path), "messages": "messages"},
                                n_samples=2, seqlen=16)
        return calibration_key(model, cfg, None)

    before = key(first)
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.move(first, moved)
    assert key(moved) == before
    write_jsonl(moved, conversations(11))
    assert key(moved) != before
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", conversations(10))
    copy = tmp_path / "folder-copy"
    shutil.copytree(folder, copy)
    assert key(folder) == key(copy) != before
    cfg = CalibrationConfig(n_samples=2, seqlen=16)
    assert calibration_key(model, cfg, "/data") == calibration_key(model, cfg, "/elsewhere")



@pytest.mark.parametrize("make, source, expected", [
    (None, {"path": "missing.jsonl", "field": "text"}, ["calibration.source.path", "does not exist"]),
    ("empty", {"path": "data.jsonl"}, ["calibration.source.path", "is empty"]),
    ("chats", {"path": "data.jsonl", "field": "body"}, ["calibration.source.field='body'", "columns: id, messages"]),
    ("chats", {"path": "data.jsonl", "messages": "turns"}, ["calibration.source.messages='turns'"]),
    ("few", {"path": "data.jsonl", "messages": "messages"}, ["calibration.n_samples x calibration.seqlen", "4 x 64"]),
    (None, {"id": "org/set"}, ["calibration.dataset=local needs calibration.source.path"]),
    ("hub", {"id": "no-such-org/no-such-set"}, ["calibration.source.id 'no-such-org/no-such-set'", "cannot be loaded"]),
])
def test_bad_calibration_source_is_one_line(tmp_path, capsys, checkpoint, shared_data, make, source, expected):
    rows = {"empty": [], "chats": conversations(30), "few": conversations(2)}
    if make in rows:
        write_jsonl(tmp_path / "data.jsonl", rows[make])
    source = {k: (str(tmp_path / v) if k == "path" else v) for k, v in source.items()}
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    dataset = "hub" if make == "hub" else "local"
    line = error_line(capsys, ["run", str(config), "--set", f"calibration.dataset={dataset}",
                               "--set", f"calibration.source={json.dumps(source)}"])
    for part in expected:
        assert part in line, line


def test_local_dataset_needs_a_path(tmp_path, capsys, checkpoint, shared_data):
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    line = error_line(capsys, ["run", str(config), "--set", "calibration.dataset=local"])
    assert "calibration.source.path" in line


def test_wikitext2_train_is_gptq_sampling(tmp_path, tokenizer, monkeypatch):
    import hashlib
    import random

    from loaq.data import text

    lines = [f" = Section {i} = \n" if i % 7 == 0 else (" \n" if i % 5 == 0 else f" line {i} of the article . \n")
             for i in range(400)]
    raw = "".join(lines).encode()
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.train.raw").write_bytes(raw)
    monkeypatch.setattr(text, "WIKITEXT2_TRAIN_SHA256", hashlib.sha256(raw).hexdigest())
    text.wikitext2_train_text.cache_clear()
    spec = CalibrationSpec(source=CalibrationSource(dataset="wikitext2"), n_samples=4, seqlen=32, seed=7)
    tokens = sample_calibration(tokenizer, spec, str(tmp_path))
    # GPTQ get_wikitext2: one tokenization of "\n\n".join(rows), random.randint(0, n - seqlen - 1) starts.
    ids = tokenizer("\n\n".join(l if l.strip() else "" for l in lines)).input_ids
    rng = random.Random(7)
    expected = [ids[i:i + 32] for i in (rng.randint(0, len(ids) - 33) for _ in range(4))]
    assert tokens.tolist() == expected
    text.wikitext2_train_text.cache_clear()
    monkeypatch.setattr(text, "WIKITEXT2_TRAIN_SHA256", "0" * 64)
    with pytest.raises(Exception, match="checksum mismatch"):
        sample_calibration(tokenizer, spec, str(tmp_path))
    text.wikitext2_train_text.cache_clear()
