"""Configuration and method presets refuse bad values with the field named."""

from __future__ import annotations

import pytest

from icelora.config import EditConfig
from icelora.errors import InvalidConfigError
from icelora.methods import METHODS, method_config


def test_every_method_is_a_valid_preset():
    assert set(METHODS) == {"ft-l", "ft-m", "lora", "ice", "ice-lora"}
    combos = {m: (method_config(m).objective, method_config(m).parameterization) for m in METHODS}
    assert combos == {"ft-l": ("ft-last", "full"), "ft-m": ("ft", "full"), "lora": ("ft", "lora"),
                      "ice": ("ice-reference", "full"), "ice-lora": ("ice", "lora")}
    assert method_config("ice").clamp == 5e-4
    assert method_config("ice-lora").early_stopping and not method_config("ice").early_stopping


@pytest.mark.parametrize(("overrides", "field"), [
    ({"lora_rank": 0}, "lora_rank"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"lambda_ice": -0.5}, "lambda_ice"),
    ({"target_modules": ["attn_k"]}, "target_modules"),
    ({"layers": []}, "layers"),
    ({"clamp": 0.0}, "clamp"),
    ({"contexts_per_step": 0}, "contexts_per_step"),
    ({"contexts_per_step": 2.5}, "contexts_per_step"),
    ({"sample_every": 0}, "sample_every"),
    ({"sample_every": 1.5}, "sample_every"),
    ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(InvalidConfigError, match=field):
        method_config("ice-lora", **overrides)


def test_contexts_per_step_is_refused_outside_the_ice_objective():
    with pytest.raises(InvalidConfigError, match="contexts_per_step applies to objective ice only"):
        method_config("ice", contexts_per_step=2)
    assert method_config("ice-lora", contexts_per_step=2).contexts_per_step == 2


def test_sample_every_is_refused_outside_the_ice_objective():
    with pytest.raises(InvalidConfigError, match="sample_every applies to objective ice only"):
        method_config("lora", sample_every=2)
    assert method_config("ice", sample_every=1).sample_every == 1  # every step: allowed for any objective
    assert method_config("ice-lora", sample_every=3).sample_every == 3


def test_loraplus_ratio_is_refused_on_full_matrices():
    with pytest.raises(InvalidConfigError, match="loraplus_lr_ratio needs parameterization lora"):
        method_config("ice", loraplus_lr_ratio=4.0)
    assert method_config("ice", loraplus_lr_ratio=1.0).loraplus_lr_ratio == 1.0


def test_unknown_method_and_key():
    with pytest.raises(InvalidConfigError, match="unknown method 'rome'"):
        method_config("rome")
    with pytest.raises(InvalidConfigError, match="lora_rnak"):
        EditConfig.from_dict({"lora_rnak": 8})
    with pytest.raises(InvalidConfigError, match="lora_rnak"):
        EditConfig().replace(lora_rnak=8)


def test_round_trip():
    config = method_config("ice-lora", layers=[1, 2], seed=7)
    assert EditConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("method", METHODS)
def test_each_method_config_file_is_its_preset(method):
    from pathlib import Path

    from icelora.config import read_config_file

    settings = read_config_file(Path(__file__).parents[1] / "configs" / "methods" / f"{method}.yaml")
    assert settings.pop("method") == method
    assert EditConfig.from_dict(settings) == method_config(method)
    assert list(settings) == list(method_config(method).to_dict())  # every key, in the dataclass's order


def test_config_file_errors_name_the_file_and_key(tmp_path):
    from icelora.config import read_config_file

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.001\nlamda_ice: 0.5\n")
    with pytest.raises(InvalidConfigError, match=r"bad\.yaml.*lamda_ice"):
        read_config_file(bad)
    with pytest.raises(InvalidConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InvalidConfigError, match="must be a mapping"):
        read_config_file(tmp_path / "list.yaml")


def test_a_config_file_can_turn_off_a_preset_setting_with_null(tmp_path):
    """``null`` in a config file sets the key to ``None`` (the ``ice-lora`` preset's projection off);
    a flag left unset on the command line leaves the key alone."""
    from icelora.cli import build_parser, resolve_config

    assert method_config("ice-lora").lora_projection_energy == 0.98
    assert method_config("ice-lora", lora_projection_energy=None).lora_projection_energy is None
    file = tmp_path / "v14.yaml"
    file.write_text("method: ice-lora\nlora_projection_energy: null\n")
    args = build_parser().parse_args(["eval", "--config", str(file), "--dataset", "zsre-ice", "--output", "x"])
    config = resolve_config(args)
    assert config.lora_projection_energy is None and config.lambda_locality == 4.0
    args = build_parser().parse_args(["eval", "--dataset", "zsre-ice", "--output", "x"])
    assert resolve_config(args).lora_projection_energy == 0.98


def test_autocast_dtype_is_checked():
    assert EditConfig(autocast_dtype="bfloat16").autocast_dtype == "bfloat16"
    with pytest.raises(InvalidConfigError, match="autocast_dtype"):
        EditConfig(autocast_dtype="int8")


# A key a run folder's run.json lacks did not exist when the run was made: its feature was off.
_OFF_WHEN_ABSENT = {"lambda_locality": 0.0, "replay_edits": 0, "replay_anchors": 0,
                    "lora_projection_gradients": False, "early_stop_target_loss": None}
# Trajectory runs (benchmarks/stopping_trajectories.py) edit with early stopping off, whatever the file says.
_OFF_IN_TRAJECTORIES = {"early_stopping"}
_SEQUENTIAL_ONLY = {"replay_edits", "lambda_replay", "replay_anchors"}


def _side_run_configs():
    from pathlib import Path

    root = Path(__file__).parents[1]
    files = sorted((root / "configs").glob("ice-lora-*.yaml")) + sorted((root / "configs" / "tuned").glob("*.yaml"))
    for file in files:
        name = f"{file.stem}-tuned" if file.parent.name == "tuned" else file.stem
        runs = sorted((root / "reports" / "runs").glob(f"*/{name}/run.json"))
        yield pytest.param(file, runs, id=name)
    for file in sorted((root / "configs" / "validation").glob("*.yaml")):
        runs = sorted((root / "reports" / "validation").glob(f"*/{file.stem}/run.json"))
        yield pytest.param(file, runs, id=f"validation-{file.stem}")


@pytest.mark.parametrize(("config_file", "runs"), list(_side_run_configs()))
def test_side_run_config_files_reproduce_their_runs(config_file, runs):
    """Each configs/ice-lora-*.yaml and configs/tuned/*.yaml gives the configuration its reported
    runs (reports/runs/*/<name>/) were made with, and each configs/validation/*.yaml that of its
    validation runs (reports/validation/*/<name>/), so the command in its comment reproduces them."""
    import json

    from icelora.config import read_config_file

    settings = read_config_file(config_file)
    config = method_config(settings.pop("method"), **settings).to_dict()
    assert runs, f"{config_file}: no run folder named after it under reports/"
    for run in runs:
        recorded = json.loads(run.read_text())
        sequential = recorded["protocol"] == "sequential"
        for key, value in config.items():
            if key in _SEQUENTIAL_ONLY and not sequential:
                continue
            if key in _OFF_IN_TRAJECTORIES and recorded["protocol"] == "trajectory":
                assert recorded["config"][key] is False
                continue
            expected = recorded["config"].get(key, _OFF_WHEN_ABSENT.get(key, value))
            if key in recorded["config"] or key in _OFF_WHEN_ABSENT:
                assert value == expected, f"{config_file}: {key} is {value!r}, {run} ran with {expected!r}"
