"""``icelora train`` (batch and sequential) and ``icelora eval --checkpoint`` on tiny local models."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from icelora.cli import main
from icelora.errors import InvalidConfigError
from icelora.training import read_train_config, train
from tests.conftest import tiny_gpt2, tiny_llama
from tests.test_dataset import KNOWEDIT_ZSRE, RECENT


@pytest.fixture
def setup(tmp_path):
    folders = {}
    for name, build in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        loaded = build()
        folders[name] = tmp_path / f"tiny-{name}"
        loaded.model.save_pretrained(folders[name])
        loaded.tokenizer.save_pretrained(folders[name])
    data = tmp_path / "data.json"
    data.write_text(json.dumps([KNOWEDIT_ZSRE[0], RECENT[0], {**KNOWEDIT_ZSRE[0], "target_new": "Geometridae"}]))
    return tmp_path, folders, data


def write_config(tmp_path, folder, data, **extra):
    config = {"model": str(folder), "method": "ice-lora", "dataset": str(data), "protocol": "batch",
              "batch_size": 2, "num_epochs": 2, "learning_rate": 0.01, "num_contexts": 2, "layers": [0, 1],
              "seed": 0, **extra}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("method: ice-lora\nlearning_rat: 0.1\n")
    with pytest.raises(InvalidConfigError, match=r"t\.yaml.*learning_rat"):
        read_train_config(path)
    path.write_text("protocol: online\n")
    with pytest.raises(InvalidConfigError, match="protocol"):
        read_train_config(path)


def test_shipped_train_config_is_valid():
    from pathlib import Path

    config = read_train_config(Path(__file__).parents[1] / "configs" / "train_config.yaml")
    assert config.protocol == "batch" and config.edit["lora_rank"] == 16


def test_batch_training_writes_everything_and_resumes_exactly(setup):
    tmp_path, folders, data = setup
    config = read_train_config(write_config(tmp_path, folders["llama"], data))
    out = tmp_path / "run"
    summary = train(config, out)
    assert summary["records"] == 3
    for name in ("adapter_model.safetensors", "adapter_config.json", "icelora_ledger.json", "config.yaml",
                 "train_log.jsonl", "checkpoints/step-2/adapter_model.safetensors",
                 "checkpoints/step-4/optimizer.safetensors"):
        assert (out / name).exists(), name
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and [e["epoch"] for e in log] == [1, 1, 2, 2]
    ledger = json.loads((out / "icelora_ledger.json").read_text())
    assert len(ledger["requests"]) == 3
    final = load_file(str(out / "adapter_model.safetensors"))

    # Simulate a run killed after epoch 1: only the first checkpoint and log lines survive.
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-4")
    for name in ("adapter_model.safetensors", "icelora_ledger.json"):
        (out / name).unlink()
    (out / "train_log.jsonl").write_text("".join(line + "\n" for line in
                                                 (out / "train_log.jsonl").read_text().splitlines()[:2]))
    with pytest.raises(Exception, match="--resume"):
        train(config, out)
    train(config, out, resume=True)
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert resumed.keys() == final.keys()
    assert all((resumed[k] == final[k]).all() for k in final)


def test_sequential_training_and_checkpoint_eval(setup, capsys):
    tmp_path, folders, data = setup
    path = write_config(tmp_path, folders["llama"], data, protocol="sequential", max_steps=2)
    out = tmp_path / "seq"
    assert main(["train", "--config", str(path), "--output-dir", str(out), "-q"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["index"] for e in log] == [0, 1, 2]
    capsys.readouterr()

    code = main(["eval", "--checkpoint", str(out), "--model", str(folders["llama"]), "--dataset", str(data),
                 "--output", str(tmp_path / "eval_seq.json"), "-q"])
    assert code == 0
    metrics = json.loads((tmp_path / "eval_seq.json").read_text())
    assert metrics["n_cases"] == 3 and metrics["run"]["protocol"] == "checkpoint"
    assert (tmp_path / "eval_seq" / "cases.jsonl").exists()
    capsys.readouterr()

    # without --model, the checkpoint is evaluated on the model its edit was made on
    code = main(["eval", "--checkpoint", str(out), "--dataset", str(data), "--output", str(tmp_path / "own"), "-q"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["n_cases"] == 3
    capsys.readouterr()
    # a model named on the command line is the one used, the embedded default included
    code = main(["eval", "--checkpoint", str(out), "--model", "smollm2-135m", "--dataset", str(data),
                 "--output", str(tmp_path / "named"), "-q"])
    assert code == 2 and "holds an edit of another model" in capsys.readouterr().err

    code = main(["eval", "--checkpoint", str(out), "--model", str(folders["gpt2"]), "--dataset", str(data),
                 "--output", str(tmp_path / "wrong"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "holds an edit of another model" in err


def test_sequential_training_resumes_exactly_with_replay(setup, monkeypatch):
    """A resumed sequential run replays the edits made before the interruption, as the
    uninterrupted run does (``ice-lora`` replays earlier edits)."""
    from icelora.icelora_editor import ICELoRAEditor

    tmp_path, folders, data = setup
    config = read_train_config(write_config(tmp_path, folders["gpt2"], data, protocol="sequential", max_steps=3))
    assert config.validate().replay_edits > 0
    train(config, tmp_path / "full")
    final = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))

    real_edit, calls = ICELoRAEditor.edit, {"n": 0}

    def dying_edit(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_edit(self, *args, **kwargs)

    monkeypatch.setattr(ICELoRAEditor, "edit", dying_edit)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed")
    monkeypatch.setattr(ICELoRAEditor, "edit", real_edit)
    train(config, tmp_path / "resumed", resume=True)
    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert resumed.keys() == final.keys()
    for key, value in final.items():
        assert (resumed[key] == value).all(), key


def test_batch_training_keeps_the_adapter_blind_to_every_minibatchs_anchors(setup, monkeypatch):
    """Under ``lora_projection_energy`` the trained ``A`` of every module is orthogonal to the
    leading input directions of the anchors of all minibatches, and the constraint is lifted after."""
    from icelora.parameterization import LoraParameterization

    calls = []
    protect = LoraParameterization.protect

    def spy(self, directions, adapter="default", **options):
        calls.append(directions)
        return protect(self, directions, adapter, **options)

    monkeypatch.setattr(LoraParameterization, "protect", spy)
    tmp_path, folders, data = setup
    config = read_train_config(write_config(tmp_path, folders["gpt2"], data, lora_projection_energy=0.8))
    train(config, tmp_path / "run")
    assert len(calls) == 2 and calls[1] is None
    adapter = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    for name, directions in calls[0].items():
        (a,) = [v for k, v in adapter.items() if k.endswith(f"{name}.lora_A.weight")]
        assert a.abs().max() > 0 and (a @ directions).abs().max() < 1e-5, name


def test_batch_training_with_frozen_weights_in_bfloat16(setup):
    """``frozen_dtype: bfloat16``: the minibatches train on bfloat16 weights (the first step's loss
    is the float32 run's up to rounding, not equal to it), the adapters are saved in float32."""
    tmp_path, folders, data = setup
    logs = {}
    for frozen in (None, "bfloat16"):
        config = read_train_config(write_config(tmp_path, folders["llama"], data, frozen_dtype=frozen))
        out = tmp_path / f"run-{frozen}"
        train(config, out)
        logs[frozen] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        adapters = load_file(str(out / "adapter_model.safetensors"))
        assert all(t.dtype == torch.float32 and t.isfinite().all() for t in adapters.values())
    first, reference = logs["bfloat16"][0]["loss"], logs[None][0]["loss"]
    assert first != reference and first == pytest.approx(reference, rel=0.05)
