"""``loaq zoo``: models x settings as one parent flow whose children share one store.

    loaq-zoo                       holds the store's run lock; ends with the zoo report
      loaq-zoo-model  model A      A x setting 1, A x setting 2, ... (loaq-quantize each, in order)
      loaq-zoo-model  model B      ... side by side with A
    zoo report: model x setting -> perplexity, accuracy, time, size; the flow fails naming failures

Why one child per model: the members of a model share its calibration, embeddings, clean stream and
FP evaluation (their keys hold the model and calibration, not the setting). Run in order, the first
member computes them and the others reuse them, so every shared record has one writer. Different
models share no record, so their children run at the same time: in this process on a thread pool
(``concurrency`` of the zoo config), or, with ``member_deployment``, as flow runs of that deployment
on its work pool, taken by whichever workers (hosts) are free, all writing the same store URL.

Outcomes travel through the store, not through Prefect results: each member logs one ``zoo-member``
event under the run id the parent gave it (``computed`` with its wall time and the keys of its
weights and evaluations, or ``failed`` with its one-line reason). So the parent reports members
that ran on other hosts without shared result storage, and without the models themselves (it
never opens a checkpoint). One member failing does not stop the others: its child goes on with
the next setting.

Locking: the parent holds the store's ``run`` lock for the whole zoo, so no ``loaq run`` or
``loaq gc`` writes or deletes on that store meanwhile; children started by the zoo are its
delegates and do not take it (a ``loaq-zoo-model`` run started by hand takes it itself).
"""

from __future__ import annotations

import contextlib
import time
import uuid

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.deployments import run_deployment
from prefect.exceptions import TerminationSignal
from prefect.task_runners import ThreadPoolTaskRunner

from loaq.configs.schema import RunConfig
from loaq.configs.zoo import load_zoo
from loaq.flows.quantize import open_context, open_store, quantize_flow
from loaq.stages import interrupt
from loaq.stages.report import variant_label
from loaq.stages.zoo_report import ZOO_MEMBER_STAGE, zoo_report_stage

#: Seconds between checks of a member deployment's flow run.
DEPLOYMENT_POLL_SECONDS = 2


class ZooFailed(RuntimeError):
    """Some members failed; the others finished and the report covers all of them."""

    def __init__(self, report: str, failures: list[tuple[str, str]]):
        self.report, self.failures = report, failures
        super().__init__(f"{len(failures)} zoo member(s) failed: "
                         + "; ".join(f"{name} ({reason})" for name, reason in failures) + f"; report: {report}")


def failure_reason(exc: BaseException) -> str:
    """One line: the user-facing message of a user error, else the exception's type and first line."""
    from loaq.errors import describe

    line = describe(exc) or f"{type(exc).__name__}: {exc}"
    return line.strip().splitlines()[0] if line.strip() else type(exc).__name__


@flow(name="loaq-zoo-model")
def zoo_model_flow(configs: list[RunConfig], run_ids: list[str], parent_holds_lock: bool = False) -> list[str]:
    """Run one model's members in order, each to its end or its failure; returns their names.

    The flow run fails (after every member had its turn) when a member failed, so the UI shows it."""
    log = get_run_logger()
    store = open_store(configs[0].store.url)
    failed = []
    with contextlib.nullcontext() if parent_holds_lock else store.lock("run", timeout=0.0):
        for config, run_id in zip(configs, run_ids, strict=True):
            started = time.perf_counter()
            try:
                result = quantize_flow.with_options(flow_run_name=config.name)(config, run_id=run_id, take_lock=False)
            except Exception as e:  # noqa: BLE001 - a member's failure is recorded; the next member runs
                reason = failure_reason(e)
                log.error("zoo member %s failed: %s", config.name, reason)
                store.log_event(run_id, ZOO_MEMBER_STAGE, config.name, "failed",
                                seconds=time.perf_counter() - started, detail=reason)
                failed.append(config.name)
            else:
                store.log_event(run_id, ZOO_MEMBER_STAGE, config.name, "computed",
                                seconds=time.perf_counter() - started,
                                result={k: result[k] for k in ("weights", "evals", "zero_shot")})
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(configs)} members failed: {', '.join(failed)}")
    return [config.name for config in configs]


@task(name="zoo-model", cache_policy=NONE)
def run_model_group(label: str, configs: list[RunConfig], run_ids: list[str], deployment: str | None) -> None:
    """One model's child: a subflow here, or a flow run of ``deployment`` on its work pool."""
    if deployment is None:
        zoo_model_flow.with_options(flow_run_name=label)(configs, run_ids, parent_holds_lock=True)
        return
    run = run_deployment(deployment, parameters={"configs": [c.model_dump(mode="json") for c in configs],
                                                 "run_ids": run_ids, "parent_holds_lock": True},
                         flow_run_name=label, timeout=0)
    state = wait_or_cancel(run.id).state
    if state is None or not state.is_completed():
        raise RuntimeError(f"flow run {run.name} of {deployment} ended {state.name if state else 'without a state'}"
                           + (f": {state.message}" if state and state.message else ""))


def wait_or_cancel(flow_run_id):
    """The flow run once it has ended. A stop of this process (SIGTERM, Ctrl-C: see
    ``stages.interrupt``) cancels it first: the members it runs work under this zoo's run lock,
    which goes with this process."""
    from prefect import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            if interrupt.requested():
                client.set_flow_run_state(flow_run_id, Cancelling(message="the zoo was stopped"))
                interrupt.check()
            time.sleep(DEPLOYMENT_POLL_SECONDS)


def member_outcome(store, run_id: str, name: str) -> dict | None:
    """The member's ``zoo-member`` event, or None if it never finished."""
    events = [e for e in store.events(run_id) if e["stage"] == ZOO_MEMBER_STAGE and e["key"] == name]
    return events[-1] if events else None


@flow(name="loaq-zoo")
def zoo_flow(config: str = "zoo", overrides: list[str] | None = None, member_deployment: str | None = None) -> dict:
    """Quantize every model x setting of zoo config ``config`` (a file or zoo preset) on one store,
    then write the zoo report; fails, after the report, naming the members that failed.

    ``member_deployment`` ("loaq-zoo-model/<name>"): run each model's members as a flow run of that
    deployment (on its work pool's workers) instead of in this process."""
    log = get_run_logger()
    zoo = load_zoo(config, overrides or [])
    zoo_id = uuid.uuid4().hex[:12]
    groups = zoo.groups()
    run_ids = [[f"{zoo_id}-{g}-{s}" for s in range(len(members))] for g, (_, members) in enumerate(groups)]
    ctx = open_context(groups[0][1][0], zoo_id)
    group_errors = {}
    with ctx.store.lock("run", timeout=0.0):
        # In this process at most `concurrency` models at once; on a work pool, the pool decides.
        workers = len(groups) if member_deployment else min(zoo.concurrency, len(groups))
        try:
            with ThreadPoolTaskRunner(max_workers=workers) as runner:
                futures = [runner.submit(run_model_group, {"label": f"{zoo.name}-{label}", "configs": members,
                                                           "run_ids": ids, "deployment": member_deployment})
                           for (label, members), ids in zip(groups, run_ids)]
                try:
                    for (label, _), future in zip(groups, futures):
                        future.wait()
                        if not future.state.is_completed():
                            group_errors[label] = future.state.message or future.state.name
                except (KeyboardInterrupt, TerminationSignal) as e:
                    # A signal unwinds this thread only, and leaving the pool waits for its threads:
                    # the members there stop at their next check instead of running to their end.
                    terminated = isinstance(e, (TerminationSignal, interrupt.Terminated))
                    interrupt.request(interrupt.Terminated if terminated else interrupt.Interrupted)
                    raise
        finally:
            interrupt.clear()

    entries, failures = [], []
    for (label, members), ids in zip(groups, run_ids):
        for member, run_id in zip(members, ids):
            event = member_outcome(ctx.store, run_id, member.name)
            entry = {"model": label, "setting": variant_label(member.quantize, True), "name": member.name,
                     "run_id": run_id, "status": "failed", "error": None, "seconds": None}
            if event is not None and event["action"] == "computed":
                entry.update(status="completed", seconds=event["seconds"], **event["result"])
            else:
                entry["error"] = (event["detail"] if event is not None else
                                  f"did not finish ({group_errors.get(label, 'no outcome recorded')})")
                entry["seconds"] = event["seconds"] if event is not None else None
                failures.append((member.name, entry["error"]))
            entries.append(entry)
    report = zoo_report_stage(ctx, zoo.name, zoo.report_dir, entries)
    log.info("zoo report: %s/report.md", report)
    if failures:
        raise ZooFailed(report, failures)
    return {"zoo_run_id": zoo_id, "report": report, "members": entries}
