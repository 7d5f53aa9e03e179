"""Run configs: TOML onto typed dataclasses, errors naming the key, --set overrides, --help."""
from __future__ import annotations

import subprocess
import sys

import pytest

from minift.cli import main
from minift.config import RunConfigError, describe, load_config

from conftest import REPO


@pytest.mark.parametrize("name", ["offline-default", "openai-gpt-tweets", "seed-recipe", "trainer-trace"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.toml")
    assert cfg.train.batch_size > 0


def test_overrides_parse_as_toml_values():
    cfg = load_config(None, ["train.lr=1e-4", "data.sampler=random", "model.config.n_layer=2",
                             "data.labels=['bad', 'good']", "train.progress=false"])
    assert cfg.train.lr == 1e-4 and cfg.data.sampler == "random" and cfg.model.config == {"n_layer": 2}
    assert cfg.data.labels == ["bad", "good"] and cfg.train.progress is False


@pytest.mark.parametrize("text,message", [
    ("[train]\nbatchsize = 4\n", "unknown key [train] batchsize"),
    ("[training]\nlr = 1\n", "unknown section [training]"),
    ("[train]\nlr = \"fast\"\n", "[train] lr must be a number, got the string 'fast'"),
    ("[train]\nbatch_size = 2.5\n", "[train] batch_size must be int, got float 2.5"),
    ("[train]\nprogress = 1\n", "[train] progress must be bool"),
    ("[train]\nbatch_size = 0\n", "train.batch_size must be positive"),
    ("[train]\ngrad_accum = -1\n", "train.grad_accum must be positive"),
    ("[train]\nlr = -1.0\n", "train.lr must be a finite number >= 0"),
    ("[train]\nlr = nan\n", "[train] lr must be a finite number, got nan"),
    ("[data]\nmax_length = 0\n", "data.max_length must be positive"),
    ("[data]\nobjective = \"label\"\n", "data.objective 'label'"),
    ("[train\n", "invalid TOML"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RunConfigError) as err:
        load_config(path)
    assert message in str(err.value)


def test_set_needs_section_key_value():
    with pytest.raises(RunConfigError, match="expected section.key=value"):
        load_config(None, ["lr=1"])


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlearning_rate = 1\n")
    assert main(["train", str(path)]) == 2
    assert "unknown key [train] learning_rate" in capsys.readouterr().err


def test_train_help_lists_every_option_with_its_default():
    result = subprocess.run([sys.executable, "-m", "minift", "train", "--help"], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0
    for line in describe().splitlines():
        assert line.strip() in result.stdout
    assert "train.lr = 5e-05" in result.stdout and "train.schedule = 'linear'" in result.stdout


@pytest.mark.parametrize("command", ["train", "dpo"])
def test_help_explains_every_option_in_one_line_grouped_by_section(command):
    import dataclasses

    from minift.config import RunConfig
    from minift.preference.config import PreferenceConfig

    result = subprocess.run([sys.executable, "-m", "minift", command, "--help"], capture_output=True,
                            text=True, cwd=REPO)
    lines = result.stdout.splitlines()
    sections = [f for f in dataclasses.fields(RunConfig) if f.name != "stage"]
    if command == "dpo":  # the stage's own sections too
        sections += dataclasses.fields(PreferenceConfig)
    for section in sections:
        for option in dataclasses.fields(section.default_factory()):
            text = option.metadata.get("help", "")
            assert text and "\n" not in text, f"{section.name}.{option.name} has no one-line help"
            line = next(x for x in lines if x.strip().startswith(f"{section.name}.{option.name} = "))
            headers_above = [x for x in lines[:lines.index(line)] if x.startswith("[")]
            assert line.endswith(text) and headers_above[-1] == f"[{section.name}]"


def test_compile_mode_reaches_torch_compile_and_bad_modes_are_refused(monkeypatch):
    import torch

    from minift.components import wrap_for_training
    from minift.distributed import SINGLE_PROCESS

    with pytest.raises(RunConfigError, match="model.compile_mode 'fast'"):
        load_config(None, ["model.compile=true", "model.compile_mode=fast"])
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.setdefault("mode", mode) and model)
    cfg = load_config(None, ["model.compile=true", "model.compile_mode=reduce-overhead"])
    wrap_for_training(cfg, torch.nn.Linear(2, 2), SINGLE_PROCESS)
    assert seen == {"mode": "reduce-overhead"}
