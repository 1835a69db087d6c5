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


def test_sigkill_mid_run_on_s3_then_rerun_matches_a_local_run(tmp_path, checkpoint, shared_data, s3_server,
                                                              local_reference):
    config, url = _s3_config(tmp_path, checkpoint, shared_data, s3_server)
    killed = run_cli("run", str(config), env={"LOAQ_FAILPOINT": "quantize-layer:1:mid"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = run_cli("run", str(config))  # the dead run's lock is taken over: same host, pid gone
    assert done.returncode == 0, done.stderr[-3000:]
    got = weights_snapshot(url)
    assert got.keys() == local_reference.keys() and got
    for key, expected in local_reference.items():
        assert torch.equal(got[key], expected), key
    store = Store(url)
    assert all(store.verify(info.key) for info in store.list(kind="weights"))


def test_transient_store_faults_are_retried_and_persistent_ones_fail_in_one_line(tmp_path, checkpoint, shared_data,
                                                                                  s3_server, local_reference):
    config, url = _s3_config(tmp_path, checkpoint, shared_data, s3_server)
    # Every record write fails twice (a reset connection) before it lands.
    flaky = run_cli("run", str(config), env={"LOAQ_STORE_FAULTS": "2"})
    assert flaky.returncode == 0, flaky.stderr[-3000:]
    got = weights_snapshot(url)
    assert got.keys() == local_reference.keys()
    assert all(torch.equal(got[k], v) for k, v in local_reference.items())

    config2, url2 = _s3_config(tmp_path / "down", checkpoint, shared_data, s3_server) if (tmp_path / "down").mkdir() \
        is None else None
    down = run_cli("run", str(config2), env={"LOAQ_STORE_FAULTS": "1000"})
    assert down.returncode != 0
    assert "Traceback" not in down.stderr, down.stderr[-3000:]
    lines = [line for line in down.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loaq: error:") and "failed 5 times" in lines[0], lines
    assert not [info.key for info in Store(url2).list() if info.complete]
