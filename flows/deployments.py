"""Entry points for Prefect deployments (prefect.yaml): flows that take their config by name.

A deployment's parameters are JSON stored on the Prefect server; naming a config (a preset of the
installed package, or a file on the worker) keeps the YAML files the single source of a run's
settings, so a scheduled run and ``loaq run`` of the same config compute the same keys and share
every record. The zoo flow (``loaq.flows.zoo.zoo_flow``) takes its config the same way.
"""

from __future__ import annotations

from prefect import flow

from loaq.configs.load import load_config
from loaq.flows.quantize import quantize_flow


@flow(name="loaq-run")
def run_flow(config: str = "default", overrides: list[str] | None = None) -> dict:
    """``loaq run CONFIG --set ...`` as a flow: load the config on the worker, then the pipeline."""
    result = quantize_flow(load_config(config, overrides or []))
    return {"run_id": result["run_id"], "report": result["report"], "exports": result["exports"]}
