"""The command line and the config files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loaq.configs.load import ConfigError, load_config
from loaq.stages.keys import chain_keys, config_identity


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "loaq", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("run", "sweep", "plan", "status", "gc", "report", "export", "zoo"):
        assert command in out


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_presets_load(preset):
    config = load_config(preset)
    assert config.model.source == "embedded:smollm2" and config.quantize.method == "loaq"
    if preset == "paper":
        assert (config.calibration.n_samples, config.calibration.seqlen) == (128, 2048)
        assert config.evaluation.max_windows is None


def test_overrides_are_typed_and_nested():
    config = load_config("default", ["quantize.bits=4", "quantize.group_size=128", "evaluation.datasets=[wikitext2, c4]"])
    assert config.quantize.bits == 4 and config.quantize.group_size == 128
    assert config.evaluation.datasets == ("wikitext2", "c4")


@pytest.mark.parametrize("override, message", [
    ("quantize.method=awq", "'quantize.method' = 'awq'"),
    ("quantize.alpha_in=1.5", "less than or equal to 1"),
    ("calibration.n_samples=0", "greater than or equal to 1"),
    ("quantize", "expected FIELD=VALUE"),
    ("runtime.devise=cuda", "'runtime.devise' is not known"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("default", [override])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: default, paper"):
        load_config("nope")


def test_chain_key_ignores_fields_a_method_does_not_use():
    gptq_a = load_config("default", ["quantize.method=gptq", "quantize.alpha_in=0.1"]).quantize
    gptq_b = load_config("default", ["quantize.method=gptq", "quantize.alpha_in=0.9"]).quantize
    loaq_a = load_config("default", ["quantize.alpha_in=0.1"]).quantize
    loaq_b = load_config("default", ["quantize.alpha_in=0.9"]).quantize
    assert config_identity(gptq_a) == config_identity(gptq_b)
    assert chain_keys("root", gptq_a, 3) == chain_keys("root", gptq_b, 3)
    assert chain_keys("root", loaq_a, 3) != chain_keys("root", loaq_b, 3)
    assert chain_keys("root", loaq_a, 3)[0] != chain_keys("other-root", loaq_a, 3)[0]


def test_the_sigterm_handler_lives_only_while_a_command_runs():
    """``main`` turns SIGTERM into an orderly exit while it runs, and gives the caller its own
    handler back afterwards (a process that calls it, such as a test runner, keeps its own)."""
    import signal

    from loaq.cli import main

    def own_handler(signum, frame):
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGTERM, own_handler)
    try:
        assert main(["run", "--set", "quantize.bits=1"]) == 2  # a config error (capsys left out: its
        # stream would be closed under the logging handlers that Prefect's first import binds to stderr)
        assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_unwinds_only_over_the_default_when_asked():
    """The Python API's rule: a SIGTERM handler of the caller's own stays in force; over the default,
    SIGTERM raises ``Terminated`` where the run is, once (a repeat while it unwinds is ignored), and
    the default is back afterwards."""
    import os
    import signal

    import pytest

    from loaq.termination import Terminated, sigterm_unwinds

    def own_handler(signum, frame):
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGTERM, own_handler)
    try:
        with sigterm_unwinds(only_over_default=True) as active:
            assert not active and signal.getsignal(signal.SIGTERM) is own_handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        unwound = False
        with pytest.raises(Terminated), sigterm_unwinds(only_over_default=True) as active:
            assert active
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises before the next line
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # a second one while the first unwinds is ignored
                unwound = True
        assert unwound
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_python_run_ended_by_sigterm_exits_143_ignoring_further_sigterms():
    """What ``loaq.run`` does with a SIGTERM over the default handler: once the run has unwound it
    ends the process with 143, and the exit (its handlers stop Prefect's server) ignores more of them."""
    import os
    import signal

    import pytest

    from loaq.api import _ends_on_sigterm

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as exited, _ends_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
        assert exited.value.code == 143
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
