"""Bad input: each mistake gives one clear line and a non-zero exit, and the store keeps what it had."""

from __future__ import annotations

import errno
import shutil

import pytest
import zarr

from flowkit import error_line, make_checkpoint, write_config
from loaq.cli import main
from loaq.store import Store


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny-llama", layers=2)



def test_misspelled_field(tmp_path, capsys, checkpoint, shared_data):
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    line = error_line(capsys, ["run", str(config), "--set", "quantize.alhpa_in=0.3"])
    assert "'quantize.alhpa_in' is not known" in line


def test_unknown_top_level_field_in_yaml(tmp_path, capsys, checkpoint, shared_data):
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    config.write_text(config.read_text() + "calibraton: {n_samples: 3}\n")
    assert "'calibraton' is not known" in error_line(capsys, ["run", str(config)])


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bits_outside_2_to_8(tmp_path, capsys, checkpoint, shared_data, bits):
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    line = error_line(capsys, ["run", str(config), "--set", f"quantize.bits={bits}"])
    assert f"'quantize.bits' = {bits}" in line and "between 2 and 8" in line


@pytest.mark.parametrize("overrides, expected", [
    (["quantize.act_bits=1"], ("'quantize.act_bits' = 1", "between 2 and 8")),
    (["quantize.act_bits=16"], ("'quantize.act_bits' = 16", "between 2 and 8")),
    (["quantize.grid_init=nequi"], ("'quantize.grid_init' = 'nequi'", "minmax", "neuqi")),
    (["quantize.mse_clip=true", "quantize.grid_init=neuqi"], ("'quantize.grid_init' = 'neuqi'", "quantize.mse_clip")),
])
def test_activation_bits_and_grid_init(tmp_path, capsys, checkpoint, shared_data, overrides, expected):
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    args = ["run", str(config)]
    for o in overrides:
        args += ["--set", o]
    line = error_line(capsys, args)
    assert all(part in line for part in expected), line


def test_model_path_that_does_not_exist(tmp_path, capsys, checkpoint, shared_data):
    config = write_config(tmp_path / "c.yaml", tmp_path / "no-such-model", tmp_path / "store", shared_data)
    assert "does not exist" in error_line(capsys, ["run", str(config)])


def test_truncated_safetensors(tmp_path, capsys, checkpoint, shared_data):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = write_config(tmp_path / "c.yaml", broken, tmp_path / "store", shared_data)
    assert "truncated" in error_line(capsys, ["run", str(config)])


def test_truncated_gguf(tmp_path, capsys, checkpoint, shared_data):
    from loaq.models.sources import embedded_gguf

    gguf = tmp_path / "model.gguf"
    with open(embedded_gguf("embedded:smollm2"), "rb") as f:
        gguf.write_bytes(f.read(3_000_000))
    config = write_config(tmp_path / "c.yaml", gguf, tmp_path / "store", shared_data)
    line = error_line(capsys, ["run", str(config)])
    assert "GGUF" in line and "truncated" in line


def test_unsupported_architecture(tmp_path, capsys, shared_data):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    config = write_config(tmp_path / "c.yaml", tmp_path / "gpt2", tmp_path / "store", shared_data)
    line = error_line(capsys, ["run", str(config)])
    assert "unsupported architecture 'gpt2'" in line and "llama, mistral, qwen2, qwen3" in line


def test_store_path_not_writable(tmp_path, capsys, checkpoint, shared_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = write_config(tmp_path / "c.yaml", checkpoint, blocker / "store", shared_data)
    line = error_line(capsys, ["run", str(config)])
    assert "store.url" in line and "not a writable directory" in line


def test_disk_full_while_writing_keeps_complete_records(tmp_path, capsys, checkpoint, shared_data, monkeypatch):
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    assert main(["run", str(config)]) == 0
    capsys.readouterr()
    store = Store(str(tmp_path / "store"))
    before = {i.key: (i.kind, i.nbytes) for i in store.list()}
    snapshot = {k: store.open(k).read(n) for k in before for n in store.open(k).names[:1]}

    # A variant (new quantized chain) runs out of space in the middle of its first record.
    real_set = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def failing_set(self, key, value):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    line = error_line(capsys, ["run", str(config), "--set", "quantize.beta=0.05"])
    assert "No space left on device" in line
    monkeypatch.undo()

    after = {i.key: (i.kind, i.nbytes) for i in store.list() if i.complete}
    assert after == before  # nothing complete was lost or altered, nothing half-written is complete
    for key, tensor in snapshot.items():
        record = store.open(key)
        assert record.read(record.names[0]).equal(tensor) and store.verify(key)
