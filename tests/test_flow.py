"""The pipeline: caching by input-derived keys, resuming after SIGKILL bit-identically, repairs."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from flowkit import EPHEMERAL, make_checkpoint, run_cli, run_id, run_python, write_config
from loaq.termination import TERMINATED_STATUS
from loaq.store import Store


def weights_snapshot(store_url: Path) -> dict[str, torch.Tensor]:
    """Every stored quantized weight array, keyed by layer and array name."""
    store = Store(str(store_url))
    out = {}
    for info in store.list(kind="weights"):
        record = store.open(info.key)
        for name in record.names:
            out[(info.attrs["layer"], info.attrs["config"]["alpha_in"], name)] = record.read(name)
    return out


def assert_default_weights(reference_store: Path, store_url: Path) -> None:
    """``store_url`` holds, bit for bit, the weights of the reference's uninterrupted default run (alpha 0.5)."""
    expected = {k: v for k, v in weights_snapshot(reference_store).items() if k[1] == 0.5}
    got = weights_snapshot(store_url)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def perplexities(store_url: Path) -> dict[tuple, float]:
    store = Store(str(store_url))
    return {i.key: i.attrs["ppl"] for i in store.list(kind="eval")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint, shared_data):
    """One uninterrupted run, then an identical rerun and an alpha/beta variant on the same store."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "tiny.yaml", checkpoint, root / "store", shared_data)
    cold = run_cli("run", str(config), env=EPHEMERAL)  # a user's first run: Prefect started by loaq
    assert cold.returncode == 0, cold.stderr[-3000:]
    warm = run_cli("run", str(config))
    assert warm.returncode == 0, warm.stderr[-3000:]
    variant = run_cli("run", str(config), "--set", "quantize.alpha_in=0.3", "--set", "quantize.beta=0.1")
    assert variant.returncode == 0, variant.stderr[-3000:]
    return {"config": config, "store": root / "store", "cold": cold, "warm": warm, "variant": variant}


def test_run_prints_perplexities_and_writes_report(reference):
    out = reference["cold"].stdout
    assert "perplexity" in out and "FP" in out and "loaq W3" in out
    report = reference["store"].parent / "runs" / "tiny"
    assert (report / "report.md").is_file() and (report / "divergence.png").stat().st_size > 1000


def test_second_identical_run_recomputes_nothing(reference):
    store = Store(str(reference["store"]))
    events = store.events(run_id(reference["warm"]))
    assert events, "the rerun logged no stage"
    assert {e["action"] for e in events} == {"reused"}, [e for e in events if e["action"] != "reused"]
    cold = store.events(run_id(reference["cold"]))
    computed = Counter(e["stage"] for e in cold if e["action"] == "computed")
    # 3 layers, one clean and one quantized record each; FP and LoaQ evaluated on one dataset
    assert computed == {"calibration": 1, "embed": 1, "clean-layer": 3, "quantize-layer": 3, "perplexity": 2}


def test_variant_reuses_calibration_embedding_and_clean_stream(reference):
    store = Store(str(reference["store"]))
    events = store.events(run_id(reference["variant"]))
    by_stage = {}
    for e in events:
        by_stage.setdefault(e["stage"], set()).add(e["action"])
    for stage in ("calibration", "embed", "clean-layer"):
        assert by_stage[stage] == {"reused"}, (stage, by_stage[stage])
    assert by_stage["quantize-layer"] == {"computed"}
    # The FP evaluation is shared too; only the quantized one is new.
    evals = [e for e in events if e["stage"] == "perplexity"]
    assert sorted(e["action"] for e in evals) == ["computed", "reused"]


@pytest.mark.parametrize("points", [
    ["clean-layer:1:mid", "quantize-layer:1:mid", "perplexity:before"],
    ["quantize-layer:0:after", "quantize-layer:2:mid"],
])
def test_sigkill_then_rerun_is_bit_identical(tmp_path, reference, checkpoint, shared_data, points):
    config = write_config(tmp_path / "tiny.yaml", checkpoint, tmp_path / "store", shared_data)
    for point in points:
        killed = run_cli("run", str(config), env={"LOAQ_FAILPOINT": point})
        assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
    done = run_cli("run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_default_weights(reference["store"], tmp_path / "store")
    # Keys are content-derived, so the same evaluation has the same key in both stores.
    ref_ppl, got_ppl = perplexities(reference["store"]), perplexities(tmp_path / "store")
    assert len(got_ppl) == 2 and got_ppl.keys() <= ref_ppl.keys()
    for key, value in got_ppl.items():
        assert value == ref_ppl[key], key


def test_sigterm_mid_write_stops_prefects_server_and_the_rerun_is_bit_identical(tmp_path, reference, checkpoint,
                                                                                  shared_data):
    """A scheduler's SIGTERM lands while layer 1's record is being written, in a run that started
    Prefect's ephemeral server itself: one line, the shell's status for SIGTERM, no server left on
    the node, and the rerun completes the half-written record to the uninterrupted run's bits."""
    config = write_config(tmp_path / "tiny.yaml", checkpoint, tmp_path / "store", shared_data)
    terminated = run_cli("run", str(config), env={**EPHEMERAL, "LOAQ_FAILPOINT": "quantize-layer:1:mid@term"})
    assert terminated.returncode == TERMINATED_STATUS, (terminated.returncode, terminated.stderr[-3000:])
    assert "loaq: terminated; finished records are kept, run again to resume" in terminated.stderr
    assert "Traceback" not in terminated.stderr, terminated.stderr[-3000:]
    assert terminated.left_running == []
    store = Store(str(tmp_path / "store"))
    finished = sorted(i.attrs["layer"] for i in store.list(kind="weights") if i.complete)
    assert finished == [0]  # layer 1 was cut off
    done = run_cli("run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_default_weights(reference["store"], tmp_path / "store")


def test_sigterm_in_a_python_run_ends_the_process_as_the_default_would_after_unwinding(tmp_path, checkpoint,
                                                                                        shared_data):
    """``loaq.run`` from a script that installed no SIGTERM handler: the run unwinds (layer 1's
    half-written record stays incomplete, the Prefect server it started is stopped), then the process
    ends with the status the default handler gives, and the script's code after the call never runs."""
    config = write_config(tmp_path / "tiny.yaml", checkpoint, tmp_path / "store", shared_data)
    script = f"import loaq; loaq.run({str(config)!r}); print('returned')"
    terminated = run_python("-c", script, env={**EPHEMERAL, "LOAQ_FAILPOINT": "quantize-layer:1:mid@term"})
    assert terminated.returncode == TERMINATED_STATUS, (terminated.returncode, terminated.stderr[-3000:])
    assert "loaq: terminated; finished records are kept, run again to resume" in terminated.stderr
    assert "Traceback" not in terminated.stderr, terminated.stderr[-3000:]
    assert "returned" not in terminated.stdout
    assert terminated.left_running == []
    store = Store(str(tmp_path / "store"))
    finished = sorted(i.attrs["layer"] for i in store.list(kind="weights") if i.complete)
    assert finished == [0]  # layer 1 was cut off


def test_gc_frees_what_a_killed_run_left_unmarked_and_the_rerun_is_bit_identical(tmp_path, reference, checkpoint,
                                                                                   shared_data):
    """A run killed mid-write leaves its record's data without the completion mark; nothing reads it,
    and ``loaq gc`` gives its space back (before, only a rerun of the same chain did)."""
    config = write_config(tmp_path / "tiny.yaml", checkpoint, tmp_path / "store", shared_data)
    killed = run_cli("run", str(config), env={"LOAQ_FAILPOINT": "quantize-layer:1:mid"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    store = Store(str(tmp_path / "store"))
    left = [i for i in store.list() if not i.complete]
    assert left and sum(i.nbytes for i in left) > 0
    collected = run_cli("gc", str(config))
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert [i for i in store.list() if not i.complete] == []
    assert all(store.is_complete(i.key) for i in store.list())
    done = run_cli("run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_default_weights(reference["store"], tmp_path / "store")


def test_corrupt_chunk_and_missing_mark_are_recomputed(tmp_path, reference, checkpoint, shared_data):
    config = write_config(tmp_path / "tiny.yaml", checkpoint, tmp_path / "store", shared_data)
    assert run_cli("run", str(config)).returncode == 0
    store = Store(str(tmp_path / "store"))
    clean = sorted(store.list(kind="clean_state"), key=lambda i: i.attrs["layer"])
    weights = sorted(store.list(kind="weights"), key=lambda i: i.attrs["layer"])
    # Truncate one chunk of the clean stream after layer 0 ...
    record_dir = tmp_path / "store" / "records" / clean[0].key[:2] / clean[0].key
    chunk = next(p for p in sorted(record_dir.rglob("*")) if p.is_file() and "c" in p.relative_to(record_dir).parts)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    # ... and remove the completion marks of layer 1's weights and of the last evaluation.
    store.invalidate(weights[1].key)
    assert not store.is_complete(weights[1].key)
    rerun = run_cli("run", str(config))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    events = store.events(run_id(rerun))
    recomputed = {e["key"] for e in events if e["action"] == "computed"}
    assert clean[0].key in recomputed  # the truncated record was detected when read, and rebuilt
    assert store.is_complete(weights[1].key) and store.verify(clean[0].key)
    assert_default_weights(reference["store"], tmp_path / "store")


def test_second_run_on_a_locked_store_fails_clearly(tmp_path, checkpoint, shared_data):
    config = write_config(tmp_path / "tiny.yaml", checkpoint, tmp_path / "store", shared_data)
    store = Store(str(tmp_path / "store"))
    with store.lock("run"):
        proc = run_cli("run", str(config))
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("loaq: error:")]
    assert len(lines) == 1 and "lock" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
