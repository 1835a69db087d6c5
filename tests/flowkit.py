"""Helpers for pipeline tests: a tiny checkpoint, a config file, and running the CLI."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import tempfile
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
#: ``run_cli(..., env=EPHEMERAL)``: the run starts Prefect's ephemeral API server itself, as a run
#: without PREFECT_API_URL does, instead of using :func:`shared_prefect_api`.
EPHEMERAL = {"PREFECT_API_URL": None}


def make_checkpoint(path: Path, family: str = "llama", layers: int = 3, hidden: int = 64) -> Path:
    from conftest import tiny_model
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_model(family, layers=layers, hidden=hidden, vocab=512)
    model.save_pretrained(path)
    # A small word-level tokenizer over printable text, so calibration and evaluation run on real data.
    vocab = {f"<{i}>": i for i in range(4)}
    for ch in (chr(c) for c in range(32, 127)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", bos_token="<1>", eos_token="<2>")
    fast.save_pretrained(path)
    return path


def tiny_protocol(store: Path, data_dir: str) -> dict:
    """The sections every tiny run shares: few short calibration samples and evaluation windows."""
    return {
        "data_dir": data_dir,
        "calibration": {"n_samples": 4, "seqlen": 64},
        "evaluation": {"seqlen": 64, "max_windows": 3},
        "runtime": {"threads": 1, "micro_batch": 2},
        "store": {"url": str(store), "keep_quant_states": "last"},
        "report_dir": str(store.parent / "runs"),
    }


def write_config(path: Path, checkpoint: Path, store: Path, data_dir: str, **quantize) -> Path:
    config = {
        "name": "tiny",
        "model": {"source": str(checkpoint)},
        "quantize": {"method": "loaq", "bits": 3, **quantize},
        **tiny_protocol(store, data_dir),
    }
    path.write_text(yaml.safe_dump(config))
    return path


def write_zoo(path: Path, models: dict[str, Path], store: Path, data_dir: str, settings: list[dict],
              **extra) -> Path:
    """A zoo of the tiny checkpoints ``models`` (name -> folder) with the run config's tiny protocol."""
    config = {
        "name": "tinyzoo",
        "models": [{"name": name, "source": str(folder)} for name, folder in models.items()],
        "settings": settings,
        **tiny_protocol(store, data_dir),
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def computed_stages(store_url: Path, run_ids: list[str]) -> dict[tuple[str, str], int]:
    """How many times each (stage, key) was computed over the runs ``run_ids`` of one store."""
    from loaq.store import Store

    store = Store(str(store_url))
    counts: dict[tuple[str, str], int] = {}
    for run in run_ids:
        for e in store.events(run):
            if e["action"] == "computed":
                counts[(e["stage"], e["key"])] = counts.get((e["stage"], e["key"]), 0) + 1
    return counts


@functools.cache
def shared_prefect_api() -> str | None:
    """One Prefect API server for every ``loaq`` run this test process starts, as a user with a
    long-lived server has (it stops when the process exits): each run then skips starting an
    ephemeral server of its own. None where the environment names a server already."""
    from loaq.prefect_startup import ensure_prefect_api

    return ensure_prefect_api()


def session_processes(session: int) -> list[str]:
    """The live processes of a session (Linux /proc), each as ``pid command line``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == session and fields[0] != "Z":
                command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{stat.parent.name} {command.strip()}")
        except (OSError, IndexError, ValueError):
            continue  # the process ended while it was read
    return found


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``loaq`` in its own session (see :func:`run_python`)."""
    return run_python("-m", "loaq", *args, env=env, timeout=timeout)


def run_python(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in its own session; afterwards end whatever it left behind (a SIGKILLed run
    leaves Prefect's ephemeral API server orphaned, holding the output pipes open). The result's
    ``left_running`` lists what was still running in the session when the process had exited."""
    env = env or {}
    shared = None if "PREFECT_API_URL" in env else shared_prefect_api()
    api = {"PREFECT_API_URL": shared} if shared else {}
    full_env = {**os.environ, **api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None in ``env`` unsets a variable
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, env=full_env,
                                cwd=REPO, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
            left_running = session_processes(proc.pid)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(proc.args, returncode, out.read(), err.read())
        done.left_running = left_running
        return done


def run_id(proc: subprocess.CompletedProcess) -> str:
    for line in proc.stdout.splitlines():
        if line.startswith("run id: "):
            return line.split(": ", 1)[1].strip()
    raise AssertionError(f"no run id in output:\n{proc.stdout}\n{proc.stderr[-3000:]}")


def error_line(capsys, argv: list[str]) -> str:
    """The one ``loaq: error:`` line a user mistake gives (exit 2, no traceback)."""
    from loaq.cli import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.startswith("loaq: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]
