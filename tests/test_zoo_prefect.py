"""The zoo on a real Prefect server: the deployments of prefect.yaml on a process work pool.

One server on a free loopback port (temporary PREFECT_HOME, so nothing touches the user's Prefect),
the ``loaq`` process pool, ``prefect deploy --all`` of the repository's prefect.yaml, one worker;
the fixtures stop the worker and the server (their whole process groups) whatever happens.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from flowkit import REPO, computed_stages, make_checkpoint, write_zoo
from prefectkit import PREFECT, Api, free_port, prefect_env, run_prefect, start, stop, tail, wait_healthy

pytestmark = pytest.mark.timeout(420)

POOL = "loaq"  # the work pool prefect.yaml names


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # The scheduler looks every 2 s (default 60) so the schedule test need not wait a minute; the
    # worker polls every second (default 10) to keep the zoo test short.
    env = prefect_env(home, api_url, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
                      PREFECT_WORKER_QUERY_SECONDS="1")
    log = home / "server.log"
    proc = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"], env, log)
    try:
        wait_healthy(api_url, proc, log, timeout=120)
        yield {"env": env, "api": Api(api_url), "home": home, "log": log}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def deployed(server):
    """The pool, every deployment of prefect.yaml, and a worker on the pool."""
    env = server["env"]
    run_prefect("work-pool", "create", POOL, "--type", "process", env=env)
    run_prefect("deploy", "--all", env=env, cwd=REPO)
    log = server["home"] / "worker.log"
    worker = start([PREFECT, "worker", "start", "--pool", POOL, "--type", "process"], env, log, cwd=REPO)
    try:
        yield {**server, "worker_log": log}
    finally:
        stop(worker)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-models")
    return {"llama": make_checkpoint(root / "tiny-llama", "llama", layers=3),
            "qwen2": make_checkpoint(root / "tiny-qwen2", "qwen2", layers=2)}


def test_deployments_list_their_next_scheduled_runs(deployed):
    api = deployed["api"]
    for name, cron, check in (("loaq-zoo/nightly", "0 2 * * *", lambda t: (t.hour, t.minute) == (2, 0)),
                              ("loaq-run/weekly", "0 3 * * 0", lambda t: (t.weekday(), t.hour) == (6, 3))):
        deployment = api.deployment(name)
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [cron]
        deadline = time.monotonic() + 60
        while not (runs := api.flow_runs(deployment["id"], ["SCHEDULED"])) and time.monotonic() < deadline:
            time.sleep(1)
        assert runs, f"no scheduled run of {name} after 60 s:\n{tail(deployed['log'])}"
        starts = [datetime.fromisoformat(r["expected_start_time"]).astimezone(timezone.utc) for r in runs]
        assert all(t > datetime.now(timezone.utc) for t in starts)
        assert all(check(t) for t in starts), (name, starts[:3])
        assert starts == sorted(starts) and len(set(starts)) == len(starts)


def test_zoo_deployment_runs_every_member_on_the_pool_computing_shared_stages_once(
        deployed, checkpoints, tmp_path, shared_data):
    api = deployed["api"]
    settings = [{"method": "gptq", "bits": 4}, {"method": "loaq", "bits": 3}]
    zoo = write_zoo(tmp_path / "zoo.yaml", checkpoints, tmp_path / "store", shared_data, settings)
    nightly = api.deployment("loaq-zoo/nightly")
    # The deployment's own parameters (member_deployment) stay; only the config is this test's.
    run = api.post(f"/deployments/{nightly['id']}/create_flow_run", {"parameters": {"config": str(zoo)}})
    final = api.wait_final(run["id"], timeout=300)
    assert final["state"]["type"] == "COMPLETED", (final["state"], tail(deployed["worker_log"], 8000))

    # Each model's members ran as one flow run of the member deployment, taken by the pool's worker.
    members_deployment = api.deployment("loaq-zoo-model/members")
    children = api.flow_runs(members_deployment["id"])
    assert sorted((c["name"], c["state"]["type"]) for c in children) == [
        ("tinyzoo-llama", "COMPLETED"), ("tinyzoo-qwen2", "COMPLETED")]
    assert all(c["work_pool_name"] == POOL for c in children)
    (a_start, a_end), (b_start, b_end) = [(datetime.fromisoformat(c["start_time"]), datetime.fromisoformat(c["end_time"]))
                                          for c in children]
    assert a_start < b_end and b_start < a_end, "the two models did not run at the same time"

    report_dir = tmp_path / "runs" / "tinyzoo-zoo"
    report = json.loads((report_dir / "report.json").read_text())
    assert [(m["model"], m["status"]) for m in report["members"]] == [
        ("llama", "completed"), ("llama", "completed"), ("qwen2", "completed"), ("qwen2", "completed")]
    assert report["failed"] == []

    # Shared upstream stages: once per model over the whole zoo, however many settings use them.
    computed = computed_stages(tmp_path / "store", [m["run_id"] for m in report["members"]])
    assert set(computed.values()) == {1}, {k: n for k, n in computed.items() if n != 1}
    per_stage = Counter(stage for stage, _ in computed)
    layers = 3 + 2
    assert per_stage["calibration"] == 2 and per_stage["embed"] == 2 and per_stage["clean-layer"] == layers
    assert per_stage["quantize-layer"] == 2 * layers
    assert per_stage["perplexity"] == 2 + 4  # FP once per model, then each member's quantized model

    table = [line for line in (report_dir / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 1 + 2 + 4  # header, its rule, an FP row per model, a row per member
    assert sum(line.endswith("| completed |") for line in table) == 4


def test_a_stopped_zoo_cancels_the_member_run_it_was_waiting_for(deployed, tmp_path):
    """The zoo's wait for a member's flow run on the pool: once the process is asked to stop (SIGTERM,
    Ctrl-C), it cancels that run instead of waiting for it (the members work under the zoo's run
    lock, which goes with the zoo's process), then stops itself."""
    import subprocess
    import sys
    from datetime import timedelta

    api = deployed["api"]
    members = api.deployment("loaq-zoo-model/members")
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()  # no worker takes it meanwhile
    run = api.post(f"/deployments/{members['id']}/create_flow_run",
                   {"parameters": {"configs": [], "run_ids": []},
                    "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}})
    script = ("import sys\n"
              "from loaq.flows.zoo import wait_or_cancel\n"
              "from loaq.stages import interrupt\n"
              "interrupt.request(interrupt.Terminated)\n"
              "try:\n"
              "    wait_or_cancel(sys.argv[1])\n"
              "except interrupt.Terminated:\n"
              "    print('stopped')\n")
    done = subprocess.run([sys.executable, "-c", script, run["id"]], env=deployed["env"], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == "stopped", done.stderr[-3000:]
    assert api.get(f"/flow_runs/{run['id']}")["state"]["type"] in ("CANCELLING", "CANCELLED")
