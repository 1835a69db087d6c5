"""``loaq zoo`` in one process: the zoo config, failures by name, shared stages once, the lock."""

from __future__ import annotations

import json

import pytest

from flowkit import computed_stages, make_checkpoint, run_cli, write_zoo
from loaq.termination import TERMINATED_STATUS
from loaq.configs.load import ConfigError
from loaq.configs.zoo import load_zoo
from loaq.store import Store


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("zoo-models")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(root / "tiny-gpt2")
    return {"llama": make_checkpoint(root / "tiny-llama", "llama", layers=3), "gpt2": root / "tiny-gpt2"}


SETTINGS = [{"method": "gptq", "bits": 4}, {"method": "loaq", "bits": 3}]


def test_failing_member_is_named_and_the_others_finish(tmp_path, models, shared_data):
    # gpt2 first, so the failing model's group is the one that starts first.
    zoo = write_zoo(tmp_path / "zoo.yaml", {"gpt2": models["gpt2"], "llama": models["llama"]}, tmp_path / "store",
                    shared_data, SETTINGS)
    proc = run_cli("zoo", str(zoo))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("  tinyzoo-")]
    assert [line.split(":")[0].strip() for line in failed] == ["tinyzoo-gpt2-gptq-w4", "tinyzoo-gpt2-loaq-w3-a0.5-b0.25"]
    assert all("unsupported architecture 'gpt2'" in line for line in failed)
    assert "loaq: zoo: 2 member(s) failed:" in proc.stderr

    report = json.loads((tmp_path / "runs" / "tinyzoo-zoo" / "report.json").read_text())
    assert [(m["name"], m["status"]) for m in report["members"]] == [
        ("tinyzoo-gpt2-gptq-w4", "failed"), ("tinyzoo-gpt2-loaq-w3-a0.5-b0.25", "failed"),
        ("tinyzoo-llama-gptq-w4", "completed"), ("tinyzoo-llama-loaq-w3-a0.5-b0.25", "completed")]
    assert report["failed"] == ["tinyzoo-gpt2-gptq-w4", "tinyzoo-gpt2-loaq-w3-a0.5-b0.25"]
    llama = [m for m in report["members"] if m["model"] == "llama"]
    assert all(m["ppl"]["wikitext2"] > 1 and m["seconds"] > 0 and m["accuracy"] is None for m in llama)
    # W4 codes take a quarter of fp16, W3 less; scales and zero points add a little.
    fp16 = report["fp"]["llama"]["linear_bytes"]
    assert 0.25 < llama[0]["linear_bytes"] / fp16 < 0.3 and 0.1875 < llama[1]["linear_bytes"] / fp16 < 0.25

    md = (tmp_path / "runs" / "tinyzoo-zoo" / "report.md").read_text()
    assert "| gpt2 | gptq W4 | - | - | - | - | failed: unsupported architecture 'gpt2'" in md
    assert "| llama | FP |" in md and md.count("| completed |") == 2
    assert "Zoo run " in md and "4 members, 2 completed, 2 failed" in md

    # The llama members share calibration, embeddings, clean stream and FP evaluation: computed once.
    computed = computed_stages(tmp_path / "store", [m["run_id"] for m in report["members"]])
    assert set(computed.values()) == {1}
    stages = [stage for stage, _ in computed]
    assert (stages.count("calibration"), stages.count("embed"), stages.count("clean-layer")) == (1, 1, 3)
    assert stages.count("perplexity") == 1 + 2 and stages.count("quantize-layer") == 2 * 3


def test_sigterm_stops_the_models_running_beside_the_one_it_interrupted(tmp_path, models, shared_data):
    """A zoo quantizes two models side by side on threads; SIGTERM lands in one model's layer 1. The
    other model's member stops at its next micro-batch instead of running to its end (which the
    process used to wait for, far past a scheduler's grace period), and the zoo exits in one line."""
    deep = make_checkpoint(tmp_path / "deep-llama", "llama", layers=12)
    zoo = write_zoo(tmp_path / "zoo.yaml", {"small": models["llama"], "deep": deep}, tmp_path / "store",
                    shared_data, [{"method": "gptq", "bits": 4}], concurrency=2)
    proc = run_cli("zoo", str(zoo), env={"LOAQ_FAILPOINT": "quantize-layer:1:mid@term"})
    assert proc.returncode == TERMINATED_STATUS, (proc.returncode, proc.stderr[-3000:])
    # Not necessarily the last line: a Prefect service started during the interpreter's shutdown can
    # report "can't register atexit after shutdown" after it, now and then on a loaded machine.
    assert "loaq: terminated; finished records are kept, run again to resume" in proc.stderr.splitlines(), \
        proc.stderr[-3000:]
    assert proc.left_running == []
    store = Store(str(tmp_path / "store"))
    layers = sorted(i.attrs["layer"] for i in store.list(kind="weights") if i.complete)
    assert layers and layers[-1] < 11, layers  # the deep model's last layer was never reached
    assert not list(store.list(kind="eval"))  # neither model got as far as its evaluation


def test_zoo_on_a_locked_store_fails_in_one_line(tmp_path, models, shared_data):
    zoo = write_zoo(tmp_path / "zoo.yaml", {"llama": models["llama"]}, tmp_path / "store", shared_data, SETTINGS)
    with Store(str(tmp_path / "store")).lock("run"):
        proc = run_cli("zoo", str(zoo))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("loaq: error:")]
    assert len(errors) == 1 and "store lock 'run'" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_bad_zoo_field_is_one_line_without_a_traceback(tmp_path):
    bad = tmp_path / "zoo.yaml"
    bad.write_text("models: [{source: x}]\nsettings: [{method: gptq, bitz: 4}]\n")
    proc = run_cli("zoo", str(bad), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "loaq: error: zoo config field 'settings.0.bitz' is not known (misspelled?); value 4"]


@pytest.mark.parametrize("text, message", [
    ("models: [{source: a}]\nsettings: [{}]\nmodls: []", "zoo config field 'modls' is not known"),
    ("models: []\nsettings: [{}]", "zoo config field 'models' = []: Tuple should have at least 1 item"),
    ("settings: [{}]", "zoo config field 'models' is required"),
    ("models: [{source: a, revison: main}]\nsettings: [{}]", "zoo config field 'models.0.revison' is not known"),
    ("models: [{source: a}]\nsettings: [{bits: 9}]", "zoo config field 'settings.0.bits' = 9: must be between 2 and 8"),
    ("models: [{source: a}]\nsettings: [{}]\nconcurrency: 0", "'concurrency' = 0: Input should be greater than"),
    ("models: [{source: org/a}, {source: b/a}]\nsettings: [{}]", "models' names 0 and 1 are the same (a)"),
    ("models: [{source: a, name: x}, {source: a}]\nsettings: [{}]", "models' sources 0 and 1 are the same (a)"),
    ("models: [{source: a}]\nsettings: [{method: gptq, alpha_in: 0.1}, {method: gptq, alpha_in: 0.9}]",
     "settings 0 and 1 are the same (gptq-w3)"),
])
def test_zoo_config_mistakes_name_the_field(tmp_path, text, message):
    path = tmp_path / "zoo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_zoo(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_zoo_preset_members_and_names():
    zoo = load_zoo()  # configs/zoo.yaml
    groups = zoo.groups()
    assert [label for label, _ in groups] == ["smollm2-135m", "qwen3-0.6b"]
    names = [m.name for _, members in groups for m in members]
    assert names[:3] == ["zoo-smollm2-135m-gptq-w4", "zoo-smollm2-135m-loaq-w4-a0.5-b0.25",
                         "zoo-smollm2-135m-loaq-w3-a0.5-b0.25"]
    member = groups[1][1][0]
    assert member.model.source == "Qwen/Qwen3-0.6B" and member.quantize.method == "gptq"
    assert member.calibration == zoo.calibration and member.store == zoo.store
    with pytest.raises(ConfigError, match="presets: zoo"):
        load_zoo("nope")
