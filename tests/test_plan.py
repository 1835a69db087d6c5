"""The plan: its figures against what a run really writes, planning from a config.json alone, and a
store whose filesystem is too small (a real tmpfs): refused up front, or filled mid-run and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
import torch

from flowkit import error_line, make_checkpoint, write_config
from loaq.cli import main
from loaq.configs.load import load_config
from loaq.stages.keys import weights_key as stage_weights_key
from loaq.store import Store

LLAMA3_70B = {  # config.json of Meta-Llama-3-70B (shapes only: no weights are needed to plan)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny-llama")


def store_bytes(url) -> int:
    """Every file of the store (records, event log, locks), as their sizes add up."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(url) for f in files)


def weights_of(url) -> dict:
    store = Store(str(url))
    return {(i.attrs["layer"], name): store.open(i.key).read(name)
            for i in store.list(kind="weights") if i.complete for name in store.open(i.key).names}


def plan_of(config_path, overrides=()):
    from loaq.flows.plan import plan
    from loaq.flows.quantize import open_context

    config = load_config(str(config_path), list(overrides))
    return plan(open_context(config), config)


@pytest.mark.parametrize("keep", ["all", "last"])
def test_plan_bytes_kept_match_the_store_after_a_run(tmp_path, checkpoint, shared_data, capsys, keep):
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    overrides = ["--set", f"store.keep_clean_states={keep}"]
    assert main(["plan", str(config), *overrides]) == 0
    assert "does NOT fit" not in capsys.readouterr().out
    assert main(["run", str(config), *overrides]) == 0
    capsys.readouterr()
    from loaq.flows.plan import plan
    from loaq.flows.quantize import open_context

    cfg = load_config(str(config), [f"store.keep_clean_states={keep}"])
    p = plan(open_context(cfg), cfg)
    assert all(s.complete for s in p.stages) and p.bytes_to_add() == 0
    real = store_bytes(tmp_path / "store")
    assert abs(p.kept_bytes() - real) <= 0.05 * real, (p.kept_bytes(), real)
    clean_kept = [s for s in p.stages if s.kind == "clean-layer" and s.kept]
    assert len(clean_kept) == (p.shape.layers if keep == "all" else 1)
    store = Store(str(tmp_path / "store"))
    assert sum(store.is_complete(k) for k in p.clean) == len(clean_kept)


def test_plan_counts_a_search_runs_held_out_streams(tmp_path, checkpoint, shared_data, capsys):
    """The search's held-out windows are carried through every layer in both streams: the plan counts
    their records, kept by the same retention as the calibration's, and matches the store after the run."""
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data,
                          search={"alpha": [0.25, 0.75], "beta": [0.0]})
    last = ["store.keep_clean_states=last"]
    before = plan_of(config, last)
    kinds = [s.kind for s in before.stages]
    assert kinds.count("holdout-clean") == kinds.count("holdout-layer") == before.shape.layers
    assert main(["run", str(config), "--set", last[0]]) == 0
    capsys.readouterr()
    p = plan_of(config, last)
    assert all(s.complete for s in p.stages) and p.bytes_to_add() == 0
    real = store_bytes(tmp_path / "store")
    assert abs(p.kept_bytes() - real) <= 0.05 * real, (p.kept_bytes(), real)
    held = sum(s.kept for s in p.stages if s.kind.startswith("holdout"))
    assert held > 0.05 * real  # without them the plan would fall short by more than its tolerance
    store = Store(str(tmp_path / "store"))
    assert [store.is_complete(k) for k in p.held_clean] == [False] * (p.shape.layers - 1) + [True]


def test_keep_clean_states_last_gives_the_same_weights_and_recomputes_for_a_variant(tmp_path, checkpoint,
                                                                                   shared_data, capsys):
    """The variant finds no clean states but the last: it recomputes the clean stream, and its weights
    equal those of the same variant on a store that kept every clean state."""
    runs = {}
    for keep in ("all", "last"):
        config = write_config(tmp_path / f"{keep}.yaml", checkpoint, tmp_path / keep / "store", shared_data)
        for beta in ("0.25", "0.1"):
            assert main(["run", str(config), "--set", f"store.keep_clean_states={keep}",
                         "--set", f"quantize.beta={beta}"]) == 0
        runs[keep] = weights_of(tmp_path / keep / "store")
    capsys.readouterr()
    assert runs["all"].keys() == runs["last"].keys() and len(runs["all"]) > 0
    assert all(torch.equal(runs["all"][k], runs["last"][k]) for k in runs["all"])


def test_plan_from_a_config_json_alone(tmp_path, capsys):
    folder = tmp_path / "llama-3-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_70B))
    args = ["plan", "paper", "--set", f"model.source={folder}", "--set", "runtime.dtype=bfloat16",
            "--set", f"store.url={tmp_path / 'store'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "80 layers, hidden 8192" in out and "| clean-layer    |    80 |" in out
    from loaq.flows.plan import shape_plan

    config = load_config("paper", ["runtime.dtype=bfloat16"])
    p = shape_plan(config, folder / "config.json")
    clean = [s for s in p.stages if s.kind == "clean-layer"]
    # 128 x 2048 tokens x 8192 x 3 arrays x 2 bytes per layer (the 12.9 GB), plus metadata.
    assert abs(clean[0].cost.written - 262144 * 8192 * 3 * 2) < 1e5
    last = shape_plan(config.model_copy(update={"store": config.store.model_copy(
        update={"keep_clean_states": "last"})}), folder / "config.json")
    assert last.kept_bytes() < p.kept_bytes() - 79 * clean[0].cost.written + 1e6
    # Packed W3 codes: 3/8 byte per weight, with float32 scales and zeros per row.
    weights = sum(s.kept for s in p.stages if s.kind == "quantize-layer") - clean[0].cost.written / 3
    assert weights < 80 * p.shape.layer_params() * 0.4


# -- a real small filesystem ------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs mount of 64 KiB (grown by the test with ``remount``); skipped where mounting is refused."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def resize(mount, nbytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={nbytes // 4096 * 4096}", str(mount)], check=True)


def disk_usage(url) -> int:
    """Bytes the files take in pages (what a tmpfs counts), not their sizes."""
    return sum(-(-os.path.getsize(os.path.join(d, f)) // 4096) * 4096 for d, _, fs in os.walk(url) for f in fs)



def test_a_run_that_cannot_fit_is_refused_before_any_work(tmpfs, tmp_path, checkpoint, shared_data, capsys):
    config = write_config(tmp_path / "c.yaml", checkpoint, tmpfs / "store", shared_data)
    line = error_line(capsys, ["run", str(config)])
    assert f"store {tmpfs / 'store'}" in line and "short" in line and "store.keep_clean_states=last" in line
    store = Store(str(tmpfs / "store"))
    assert not [i for i in store.list()]  # nothing was computed


def test_a_full_disk_mid_run_stops_in_one_line_and_resumes_bit_identically(tmpfs, tmp_path, checkpoint,
                                                                           shared_data, capsys):
    reference = write_config(tmp_path / "ref.yaml", checkpoint, tmp_path / "ref-store", shared_data)
    assert main(["run", str(reference)]) == 0
    capsys.readouterr()
    need = disk_usage(tmp_path / "ref-store")

    # Quotas and page rounding are invisible to the up-front check: this run starts and fills the disk.
    config = write_config(tmp_path / "c.yaml", checkpoint, tmpfs / "store", shared_data)
    resize(tmpfs, need // 2)
    line = error_line(capsys, ["run", str(config), "--set", "store.check_space=false"])
    assert f"store {tmpfs / 'store'} is full" in line and "No space left on device" in line
    assert "run `loaq run` again to resume" in line
    store = Store(str(tmpfs / "store"))
    infos = store.list()
    for info in infos:
        if info.complete:
            assert store.verify(info.key), info.key  # no record is marked complete that is not
    done = {i.attrs["layer"] for i in infos if i.kind == "weights" and i.complete}
    assert len(done) < 3  # the run stopped inside the decoder layers

    resize(tmpfs, 4 * need)
    assert main(["run", str(config)]) == 0
    run_id = capsys.readouterr().out.split("run id: ")[1].split()[0]
    computed = {e["key"] for e in store.events(run_id) if e["stage"] == "quantize-layer" and e["action"] == "computed"}
    layers = {i.attrs["layer"] for i in store.list(kind="weights") if i.key in
              {stage_weights_key(k) for k in computed}}
    assert layers == set(range(3)) - done  # resumed at the first unfinished layer
    got, want = weights_of(tmpfs / "store"), weights_of(tmp_path / "ref-store")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
