"""Runs of the tiny model on a store on an S3 server (moto on loopback): kill and resume, faults."""

from __future__ import annotations

import signal

import pytest
import torch

from flowkit import make_checkpoint, run_cli, write_config
from loaq.store import Store
from test_flow import weights_snapshot


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny-llama", layers=2)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, checkpoint, shared_data):
    """One uninterrupted run on a local store."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "tiny.yaml", checkpoint, root / "store", shared_data)
    done = run_cli("run", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    return weights_snapshot(root / "store")


def _s3_config(tmp_path, checkpoint, shared_data, s3_server):
    url = s3_server.new_bucket() + "/store"
    config = write_config(tmp_path / "tiny.yaml", checkpoint, tmp_path / "store", shared_data)
    config.write_text(config.read_text().replace(str(tmp_path / "store"), url))
    return config, url


def test_sigkill_mid_run_on_s3_then_a_rerun_through_transient_faults_matches_a_local_run(
        tmp_path, checkpoint, shared_data, s3_server, local_reference):
    config, url = _s3_config(tmp_path, checkpoint, shared_data, s3_server)
    killed = run_cli("run", str(config), env={"LOAQ_FAILPOINT": "quantize-layer:1:mid"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # The rerun takes the dead run's lock over (same host, pid gone), and every record write it
    # makes fails once (a reset connection) before it lands.
    done = run_cli("run", str(config), env={"LOAQ_STORE_FAULTS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = weights_snapshot(url)
    assert got.keys() == local_reference.keys() and got
    for key, expected in local_reference.items():
        assert torch.equal(got[key], expected), key
    store = Store(url)
    assert all(store.verify(info.key) for info in store.list(kind="weights"))


def test_a_persistent_store_fault_fails_in_one_line_and_marks_nothing(tmp_path, checkpoint, shared_data, s3_server):
    config, url = _s3_config(tmp_path, checkpoint, shared_data, s3_server)
    down = run_cli("run", str(config), env={"LOAQ_STORE_FAULTS": "1000"})
    assert down.returncode != 0
    assert "Traceback" not in down.stderr, down.stderr[-3000:]
    lines = [line for line in down.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loaq: error:") and "failed 5 times" in lines[0], lines
    assert "writing record" in lines[0]  # the record it was writing, named
    assert not [info.key for info in Store(url).list() if info.complete]


def test_a_zoo_on_s3_shares_its_stages_and_its_run_lock_holds_there(tmp_path, checkpoint, shared_data, s3_server):
    import json

    from flowkit import computed_stages, write_zoo

    url = s3_server.new_bucket() + "/store"
    zoo = write_zoo(tmp_path / "zoo.yaml", {"llama": checkpoint}, tmp_path / "store", shared_data,
                    [{"method": "gptq", "bits": 4}, {"method": "loaq", "bits": 3}])
    zoo.write_text(zoo.read_text().replace(str(tmp_path / "store"), url))
    with Store(url).lock("run"):  # another host's run, as far as the zoo can tell
        locked = run_cli("zoo", str(zoo))
    assert locked.returncode == 2 and "store lock 'run'" in locked.stderr and "Traceback" not in locked.stderr
    proc = run_cli("zoo", str(zoo))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "tinyzoo-zoo" / "report.json").read_text())
    assert [m["status"] for m in report["members"]] == ["completed", "completed"]
    computed = computed_stages(url, [m["run_id"] for m in report["members"]])
    assert set(computed.values()) == {1}  # the second member reused what the first stored on S3
    stages = [stage for stage, _ in computed]
    assert (stages.count("calibration"), stages.count("clean-layer"), stages.count("quantize-layer")) == (1, 2, 4)
