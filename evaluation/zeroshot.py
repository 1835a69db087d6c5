"""Zero-shot accuracy with lm-evaluation-harness, in-process, on an in-memory model.

Tasks: ``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``, ``winogrande`` (0-shot, metrics
``acc`` and ``acc_norm``; WinoGrande has ``acc`` only).

- ``data_dir=None``: lm-eval's stock task configs, data from the Hugging Face hub.
- ``data_dir=<path>``: the local task files in ``evaluation/tasks/*.yaml`` (mirrors of the stock
  configs: same prompts, choices, targets and metrics) reading ``<data_dir>/zeroshot`` (see its
  README). Data paths are filled in at run time after checksum verification, and the hub is
  switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) for the duration of the call, so a
  local run can never download. A task whose data file is missing is skipped, with one log line
  and an entry under ``"skipped"`` in the result, never replaced by anything else.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loaq.data.checksums import DataFileMissing, verified_file

log = logging.getLogger(__name__)

ZEROSHOT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
# Inside the local data root; the SHA256SUMS there lists every task file.
ZEROSHOT_FOLDER = "zeroshot"
TASKS_DIR = Path(__file__).parent / "tasks"

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


# ---------------------------------------------------------------- document loaders (used by the YAMLs)


def flatten_arc_docs(dataset):
    """AI2's original ARC rows -> the flat ``allenai/ai2_arc`` schema lm-eval's ARC config reads.

    ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`` becomes
    ``{"id", "question": stem, "choices": {"text": [...], "label": [...]}, "answerKey"}``.
    """

    def flatten(doc: dict[str, Any]) -> dict[str, Any]:
        choices = doc["question"]["choices"]
        return {
            "id": doc["id"],
            "question": doc["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": doc["answerKey"],
        }

    return dataset.map(flatten, remove_columns=dataset.column_names)


def load_piqa_with_labels(data_file: str, labels_file: str, **_task_metadata):
    """PIQA dev as the hub schema: ``DatasetDict(validation=(goal, sol1, sol2, label: int))``.

    Line *i* of ``labels_file`` is the label of line *i* of ``data_file`` (0 = sol1, 1 = sol2).
    lm-eval passes the task's metadata as extra keyword arguments; they are not needed here.
    """
    import datasets

    docs = datasets.load_dataset("json", data_files={"validation": data_file})["validation"]
    labels = [int(line) for line in Path(labels_file).read_text(encoding="utf-8").split()]
    if len(labels) != len(docs):
        raise ValueError(f"{labels_file}: {len(labels)} labels for {len(docs)} docs in {data_file}")
    docs = docs.select_columns(["goal", "sol1", "sol2"]).add_column("label", labels)
    return datasets.DatasetDict(validation=docs)


# ---------------------------------------------------------------- local task configs


def _resolve_data_paths(value: Any, data_dir: str) -> Any:
    """Every string leaf of ``dataset_kwargs`` is a data file under ``<data_dir>/zeroshot``."""
    if isinstance(value, dict):
        return {k: _resolve_data_paths(v, data_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_data_paths(v, data_dir) for v in value]
    if isinstance(value, str):
        return str(verified_file(data_dir, ZEROSHOT_FOLDER, value).resolve())
    return value


def local_task_config(task: str, data_dir: str) -> dict[str, Any]:
    """lm-eval config dict of ``task`` reading the verified files under ``<data_dir>/zeroshot``.

    Raises:
        DataFileMissing: one of the task's data files is absent.
        DataFileError: a data file fails its checksum.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    if task not in ZEROSHOT_TASKS:
        raise ValueError(f"unknown zero-shot task {task!r}; known: {', '.join(ZEROSHOT_TASKS)}")
    config = load_yaml(TASKS_DIR / f"{task}.yaml", resolve_func=True)
    config["dataset_kwargs"] = _resolve_data_paths(config.get("dataset_kwargs", {}), data_dir)
    return config


@contextmanager
def hub_offline() -> Iterator[None]:
    """Switch the HF hub off (environment and the already-imported libraries), then restore.

    ``datasets`` and ``huggingface_hub`` read the offline flags once at import, so the module
    constants are patched as well as the environment variables.
    """
    import datasets.config
    import huggingface_hub.constants

    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved_flags = [(module, name, getattr(module, name)) for module, name in flags if hasattr(module, name)]
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    try:
        for name in _OFFLINE_ENV:
            os.environ[name] = "1"
        for module, name, _ in saved_flags:
            setattr(module, name, True)
        yield
    finally:
        for module, name, value in saved_flags:
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------- running lm-eval


def _task_specs(tasks: list[str], data_dir: str | None) -> tuple[list[str | dict], dict[str, str]]:
    """lm-eval task specs to run, and ``{task: reason}`` for tasks skipped for missing data."""
    if data_dir is None:
        return list(tasks), {}
    specs: list[str | dict] = []
    skipped: dict[str, str] = {}
    for task in tasks:
        try:
            specs.append(local_task_config(task, data_dir))
        except DataFileMissing as missing:
            skipped[task] = str(missing)
            log.warning("zero-shot: skipping %s: %s", task, missing)
    return specs, skipped


def _run_lm_eval(model, tokenizer, specs: list[str | dict], hub: bool, limit: int | None, batch_size: int) -> dict:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # HFLM sets a pad token on the tokenizer it is given; keep the caller's tokenizer untouched.
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    # Local specs are complete inline configs: skip indexing lm-eval's thousands of stock YAMLs.
    loaded = TaskManager(include_defaults=hub).load(specs)
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)  # lm-eval's default; unused at 0 shots
    # `evaluate` rather than `simple_evaluate`: the latter reseeds the global RNGs and shells out
    # to collect environment info, neither of which this in-process call wants.
    return evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)


def _summary(results: dict, task: str) -> dict[str, Any]:
    metrics = results["results"][task]
    acc_norm = metrics.get("acc_norm,none")
    return {
        "acc": float(metrics["acc,none"]),
        "acc_norm": None if acc_norm is None else float(acc_norm),
        "n": int(results["n-samples"][task]["effective"]),
    }


def zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str | None,
    limit: int | None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """0-shot lm-eval accuracy of an in-memory ``transformers`` causal LM.

    Args:
        model: a ``transformers.PreTrainedModel`` (kept on its device; set to eval mode by lm-eval).
        tokenizer: its tokenizer (copied, not modified).
        tasks: names from ``ZEROSHOT_TASKS``.
        data_dir: local data root (reads ``<data_dir>/zeroshot``, no network), or None for the hub.
        limit: score only the first ``limit`` documents of each task (None: all).
        batch_size: lm-eval's log-likelihood batch size.

    Returns:
        JSON-able ``{task: {"acc": float, "acc_norm": float | None, "n": int}, ...,
        "skipped": {task: reason}}``; ``acc_norm`` is None for WinoGrande.
    """
    unknown = [t for t in tasks if t not in ZEROSHOT_TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot tasks {unknown}; known: {', '.join(ZEROSHOT_TASKS)}")
    specs, skipped = _task_specs(tasks, data_dir)
    summary: dict[str, Any] = {}
    if specs:
        if data_dir is None:
            results = _run_lm_eval(model, tokenizer, specs, True, limit, batch_size)
        else:
            with hub_offline():
                results = _run_lm_eval(model, tokenizer, specs, False, limit, batch_size)
        summary = {task: _summary(results, task) for task in tasks if task not in skipped}
    summary["skipped"] = skipped
    return summary
