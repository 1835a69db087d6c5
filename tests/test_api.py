"""The Python API: the README's example runs as written and shares the store with `loaq run`."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

import loaq
from flowkit import REPO, computed_stages, make_checkpoint, run_cli, run_id, write_config


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny", layers=2)


def test_readme_example_matches_loaq_run_and_recomputes_nothing(tmp_path, monkeypatch, checkpoint, shared_data):
    config = write_config(tmp_path / "my-run.yaml", checkpoint, tmp_path / "store", shared_data)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, loaq.Result)
    assert (result.config.quantize.method, result.config.quantize.bits, result.config.quantize.group_size) == \
        ("loaq", 4, 32)
    ppl = result.perplexity["wikitext2"]
    assert 1 < ppl["quantized"] < 1e4 and ppl["fp"] != ppl["quantized"]
    assert str(result.perplexity) in printed.getvalue()
    assert (result.report / "report.md").is_file()
    assert len(result.weights) == 2 and all(len(k) == 32 for k in result.weights)
    first = computed_stages(tmp_path / "store", [result.run_id])
    assert any(stage == "quantize-layer" for stage, _ in first)

    proc = run_cli("run", str(config), "--set", "quantize.method=loaq", "--set", "quantize.bits=4",
                   "--set", "quantize.group_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert computed_stages(tmp_path / "store", [run_id(proc)]) == {}
    line = next(l for l in proc.stdout.splitlines() if "perplexity" in l and "WikiText" in l)
    assert line.endswith(f"loaq W4 {ppl['quantized']:.3f}"), line

    again = loaq.run(namespace["config"])
    assert again.perplexity == result.perplexity
    assert computed_stages(tmp_path / "store", [again.run_id]) == {}


def test_quantize_takes_quantize_fields_and_sections(tmp_path, checkpoint, shared_data):
    base = write_config(tmp_path / "base.yaml", checkpoint, tmp_path / "store", shared_data)
    result = loaq.quantize(str(checkpoint), method="rtn", bits=4, group_size=32, config=base,
                           calibration={"n_samples": 2}, name="api-rtn")
    assert result.config.name == "api-rtn"
    assert (result.config.quantize.method, result.config.quantize.group_size) == ("rtn", 32)
    assert result.config.calibration.n_samples == 2 and result.config.calibration.seqlen == 64
    assert result.perplexity["wikitext2"]["quantized"] > 1
    same = loaq.run(result.config)
    assert same.perplexity == result.perplexity and computed_stages(tmp_path / "store", [same.run_id]) == {}


def test_mistakes_raise_the_cli_line(tmp_path, checkpoint, shared_data):
    from loaq.configs.load import ConfigError

    base = write_config(tmp_path / "base.yaml", checkpoint, tmp_path / "store", shared_data)
    with pytest.raises(ConfigError, match="'quantize.bits' = 9"):
        loaq.load_config(base, quantize={"bits": 9})
    with pytest.raises(ConfigError, match="grup_size is neither a quantize field nor a config section"):
        loaq.quantize(str(checkpoint), grup_size=32, config=base)
