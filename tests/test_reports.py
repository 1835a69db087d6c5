"""Reports: a sweep's perplexity table, alpha x beta heatmap and drift lines, rebuilt from the store alone."""

from __future__ import annotations

import json

import pytest

from flowkit import make_checkpoint, run_cli, write_config
from loaq.store import Store

SWEEP = ("--methods", "gptq", "loaq", "--alpha", "0.25", "0.5", "--beta", "0", "0.25")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("sweep")
    checkpoint = make_checkpoint(root / "tiny-llama", layers=2)
    config = write_config(root / "tiny.yaml", checkpoint, root / "store", shared_data)
    proc = run_cli("sweep", str(config), *SWEEP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "config": config, "proc": proc, "report": root / "runs" / "tiny-sweep"}


def test_sweep_runs_each_distinct_variant_once(swept):
    lines = [l for l in swept["proc"].stdout.splitlines() if l.startswith("tiny-")]
    # gptq ignores alpha and beta: one GPTQ variant, four LoaQ variants.
    assert [l.split()[0] for l in lines] == ["tiny-gptq-w3", "tiny-loaq-w3-a0.25-b0", "tiny-loaq-w3-a0.25-b0.25",
                                             "tiny-loaq-w3-a0.5-b0", "tiny-loaq-w3-a0.5-b0.25"]
    store = Store(str(swept["root"] / "store"))
    chains = {i.attrs["config"]["method"] + str(i.attrs["config"]["alpha_in"]) + str(i.attrs["config"]["beta"])
              for i in store.list(kind="weights")}
    assert len(chains) == 5


def test_sweep_report_has_table_heatmap_and_one_line_per_variant(swept):
    report = swept["report"]
    md = (report / "report.md").read_text()
    data = json.loads((report / "report.json").read_text())
    assert len(data["variants"]) == 5 and set(data["layers"]) == {v["label"] for v in data["variants"]}
    for v in data["variants"]:
        assert f"| {v['label']} | " in md and f"{v['ppl']['wikitext2']:.3f}" in md
        assert len(data["layers"][v["label"]]) == 2
    assert "| FP | " in md and "![alpha x beta heatmap](heatmap.png)" in md
    assert (report / "heatmap.png").stat().st_size > 5000 and (report / "divergence.png").stat().st_size > 5000
    # The best variant is marked, and it is the lowest perplexity in the table.
    best = min(data["variants"], key=lambda v: v["ppl"]["wikitext2"])
    assert f"**{best['ppl']['wikitext2']:.3f}**" in md


def test_run_report_draws_baselines_found_in_the_store(swept):
    data = json.loads((swept["root"] / "runs" / "tiny-loaq-w3-a0.5-b0.25" / "report.json").read_text())
    assert list(data["baselines"]) == ["gptq W3"]
    gptq = json.loads((swept["report"] / "report.json").read_text())["layers"]["gptq W3"]
    assert [r["mse"] for r in data["baselines"]["gptq W3"]] == [r["mse"] for r in gptq]


def test_report_rebuilds_the_sweep_from_the_store_alone(swept):
    store = Store(str(swept["root"] / "store"))
    before = sorted(i.key for i in store.list())
    first = (swept["report"] / "report.json").read_text()
    (swept["report"] / "report.json").unlink()
    proc = run_cli("report", str(swept["config"]), *SWEEP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (swept["report"] / "report.json").read_text() == first
    assert sorted(i.key for i in store.list()) == before


def test_report_of_a_sweep_not_run_names_the_variant(swept):
    proc = run_cli("report", str(swept["config"]), "--methods", "rtn")
    assert proc.returncode == 2
    assert "no complete run for sweep variant 'tiny-rtn-w3'" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_value_out_of_range_names_the_field(swept):
    proc = run_cli("sweep", str(swept["config"]), "--alpha", "1.5")
    assert proc.returncode == 2
    assert "quantize.alpha_in" in proc.stderr and "1.5" in proc.stderr and "Traceback" not in proc.stderr
