"""Evaluation stages in the pipeline: zero-shot via lm-eval, cached by the model they evaluate."""

from __future__ import annotations

from flowkit import make_checkpoint, write_config
from loaq.cli import main
from loaq.store import Store


def test_zero_shot_is_stored_reported_and_cached(tmp_path, capsys, shared_data):
    checkpoint = make_checkpoint(tmp_path / "model", layers=2)
    config = write_config(tmp_path / "c.yaml", checkpoint, tmp_path / "store", shared_data)
    args = ["run", str(config), "--set", "evaluation.zero_shot_tasks=[arc_easy, winogrande]",
            "--set", "evaluation.zero_shot_limit=3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "zero-shot fp: arc_easy" in out and "zero-shot quantized: arc_easy" in out
    report = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "| zero-shot (lm-eval) | arc_easy | winogrande |" in report
    store = Store(str(tmp_path / "store"))
    results = [i.attrs["zero_shot"] for i in store.list(kind="eval") if "zero_shot" in i.attrs]
    assert len(results) == 2 and all(r["arc_easy"]["n"] == 3 and 0 <= r["arc_easy"]["acc"] <= 1 for r in results)

    # Evaluating the same models again computes nothing.
    assert main(args) == 0
    run_id = capsys.readouterr().out.split("run id: ")[1].split()[0]
    events = store.events(run_id)
    assert events and {e["action"] for e in events} == {"reused"}
    assert sum(e["stage"] == "zero-shot" for e in events) == 2
