"""ICELoRAEditor on tiny models: what changes, revert, save/load, export, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from icelora import EditConfig, ICELoRAEditor
from icelora.editing_loop import StepRecord, should_stop
from icelora.errors import AdapterFolderError, InvalidConfigError, InvalidRequestError
from tests.conftest import TINY_BUILDERS

REQUEST = {"prompt": "The Eiffel Tower is located in the city of", "target": "Rome",
           "contexts": ["The Eiffel Tower is in Rome.", "Rome is home to the Eiffel Tower."]}
PROBE = "Which family does Epaspidoceras belong to? Noctuidae."
FAST = {"max_steps": 3, "layers": [1, 2]}


def editor_for(tiny, method: str, **overrides) -> ICELoRAEditor:
    return ICELoRAEditor(tiny, method=method, **{**FAST, **overrides})


@pytest.mark.parametrize("method", ["ice-lora", "lora"])
def test_only_adapter_parameters_change(tiny, method):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    editor = editor_for(tiny, method, learning_rate=1e-2)
    result = editor.edit(REQUEST, progress=False)
    assert result.steps == 3
    after = editor.model.get_base_model().state_dict()
    changed = set()
    for key, value in after.items():
        base_key = key.replace(".base_layer.", ".")
        if ".lora_" in key:
            continue
        assert torch.equal(value, before[base_key]), f"base weight {key} changed"
    for name, param in editor.model.named_parameters():
        if param.requires_grad:
            assert ".lora_" in name
            changed.add(name)
    lora_b = [p for n, p in editor.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    trainable, _total = editor.parameter_counts()
    assert trainable == sum(editor.model.get_parameter(n).numel() for n in changed)


@pytest.mark.parametrize("method", ["ft-m", "ice", "ft-l"])
def test_full_matrix_methods_change_only_the_selected_matrices(tiny, method):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    editor = editor_for(tiny, method, learning_rate=1e-2)
    editor.edit(REQUEST, progress=False)
    selected = {f"{n}.weight" for n in editor.params.module_names}
    assert selected
    for key, value in tiny.model.state_dict().items():
        if key in selected:
            assert not torch.equal(value, before[key]), f"{key} did not move"
            if editor.config.clamp is not None:
                assert (value - before[key]).abs().max() <= editor.config.clamp + 1e-7
        else:
            assert torch.equal(value, before[key]), f"{key} changed"


@pytest.mark.parametrize("method", ["ice-lora", "ft-m", "ice"])
def test_revert_restores_logits_exactly(tiny, method):
    editor = editor_for(tiny, method, learning_rate=1e-2)
    original = editor.logits(PROBE)
    original_edit = editor.logits(REQUEST["prompt"])
    editor.edit(REQUEST, progress=False)
    assert not torch.equal(editor.logits(REQUEST["prompt"]), original_edit)
    editor.revert()
    assert torch.equal(editor.logits(PROBE), original)
    assert torch.equal(editor.logits(REQUEST["prompt"]), original_edit)
    assert editor.ledger == []


def test_unedited_lora_model_equals_the_plain_model(tiny):
    plain = tiny.model(torch.tensor([tiny.tokenizer(PROBE)["input_ids"]])).logits[0].detach()
    editor = editor_for(tiny, "ice-lora")
    assert torch.equal(editor.logits(PROBE), plain)


@pytest.mark.parametrize("method", ["ice-lora", "ft-m"])
def test_save_load_round_trip(tiny, tmp_path, method):
    kind = tiny.name.removeprefix("tiny-")
    editor = editor_for(tiny, method, learning_rate=1e-2)
    editor.edit(REQUEST, progress=False)
    edited = editor.logits(PROBE)
    editor.save(tmp_path / "edit")
    ledger = json.loads((tmp_path / "edit" / "icelora_ledger.json").read_text())
    assert ledger["method"] == method and ledger["requests"][0]["target"] == "Rome"
    assert not list(tmp_path.glob("*.bin")) and not list((tmp_path / "edit").glob("*.bin"))

    fresh = TINY_BUILDERS[kind]()  # same seed: the same random base model
    loaded = ICELoRAEditor.load(tmp_path / "edit", model=fresh)
    assert torch.equal(loaded.logits(PROBE), edited)
    assert loaded.ledger[0].target == "Rome"
    loaded.revert()
    assert not torch.equal(loaded.logits(PROBE), edited)


def test_adapter_loads_with_plain_peft(tiny, tmp_path):
    kind = tiny.name.removeprefix("tiny-")
    editor = editor_for(tiny, "ice-lora", learning_rate=1e-2)
    editor.edit(REQUEST, progress=False)
    editor.save(tmp_path / "edit")
    assert (tmp_path / "edit" / "adapter_model.safetensors").exists()
    fresh = TINY_BUILDERS[kind]()
    peft_model = PeftModel.from_pretrained(fresh.model, str(tmp_path / "edit"))
    ids = torch.tensor([tiny.tokenizer(PROBE)["input_ids"]])
    assert torch.equal(peft_model(input_ids=ids).logits[0], editor.logits(PROBE))


@pytest.mark.parametrize("method", ["ice-lora", "ft-m"])
def test_export_merged_is_a_plain_model_folder(tiny, tmp_path, method):
    editor = editor_for(tiny, method, learning_rate=1e-2)
    editor.edit(REQUEST, progress=False)
    editor.export_merged(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([tiny.tokenizer(PROBE)["input_ids"]])
    torch.testing.assert_close(merged(input_ids=ids).logits[0], editor.logits(PROBE), atol=1e-4, rtol=1e-4)
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
    # editing can go on after the export
    assert editor.edit(REQUEST, progress=False).steps == 3


def test_same_seed_same_edit(tiny):
    kind = tiny.name.removeprefix("tiny-")
    a = editor_for(tiny, "ice-lora", learning_rate=1e-2)
    a.edit(REQUEST, progress=False)
    b = editor_for(TINY_BUILDERS[kind](), "ice-lora", learning_rate=1e-2)
    b.edit(REQUEST, progress=False)
    assert torch.equal(a.logits(PROBE), b.logits(PROBE))
    c = editor_for(TINY_BUILDERS[kind](), "ice-lora", learning_rate=1e-2, seed=1)
    c.edit(REQUEST, progress=False)
    assert not torch.equal(a.logits(PROBE), c.logits(PROBE))


def test_loraplus_ratio_scales_the_learning_rate_of_b(tiny):
    """LoRA+: with ``loraplus_lr_ratio`` 4, ``B``'s first Adam step (``lr * g / |g|`` elementwise,
    ``B`` starting at zero so ``A`` gets no gradient yet) is 4 times the one-rate step; ``A`` ends
    the same either way (moved by the preset's projection alone), and the optimizer has one group
    per rate."""
    kind = tiny.name.removeprefix("tiny-")
    steps = {}
    for ratio in (1.0, 4.0):
        editor = editor_for(TINY_BUILDERS[kind](), "ice-lora", learning_rate=1e-3, max_steps=1,
                            loraplus_lr_ratio=ratio)
        before = {n: p.detach().clone() for n, p in editor.params.named_trainable().items()}
        editor.edit(REQUEST, progress=False)
        steps[ratio] = {n: p.detach() - before[n] for n, p in editor.params.named_trainable().items()}
    b_names = [n for n in steps[1.0] if ".lora_B." in n]
    assert b_names and len(b_names) < len(steps[1.0])
    for name, change in steps[1.0].items():
        if ".lora_B." in name:
            assert change.abs().max() > 0
            assert torch.allclose(steps[4.0][name], 4 * change, rtol=1e-4, atol=1e-9), name
        else:
            assert torch.equal(change, steps[4.0][name]), name
    from icelora.editing_loop import make_optimizer

    groups = make_optimizer(editor.params, editor.config).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 4e-3]
    assert sum(len(g["params"]) for g in groups) == len(steps[1.0])
    assert len(make_optimizer(editor.params, editor.config.replace(loraplus_lr_ratio=1.0)).param_groups) == 1


def test_saving_over_a_foreign_folder_is_refused(tiny, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    editor = editor_for(tiny, "ice-lora")
    with pytest.raises(AdapterFolderError, match="not an icelora edit folder"):
        editor.save(folder)
    assert [p.name for p in folder.iterdir()] == ["todo.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]


def test_bad_requests(tiny):
    editor = editor_for(tiny, "ice-lora")
    with pytest.raises(InvalidRequestError, match="target is empty"):
        editor.edit({"prompt": "The city of", "target": "  "}, progress=False)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        editor.edit({"prompt": "", "target": "Rome"}, progress=False)
    with pytest.raises(InvalidRequestError, match="'prompt' is missing"):
        editor.edit({"target_new": "Rome"}, progress=False)


def test_batch_of_requests_is_one_update(tiny):
    editor = editor_for(tiny, "ice-lora", learning_rate=1e-2)
    second = {"prompt": "The mother tongue of Danielle Darrieux is", "target": "English"}
    result = editor.edit([REQUEST, second], progress=False)
    assert len(result.requests) == 2 and len(editor.ledger) == 2


def _history(*items: tuple[float, bool]) -> list[StepRecord]:
    return [StepRecord(i, ft, ft, 0.0, learned) for i, (ft, learned) in enumerate(items)]


def test_early_stopping_rule():
    config = EditConfig(early_stopping=True, early_stop_patience=2, early_stop_tolerance=0.05)
    assert not should_stop(_history((3.0, False), (0.5, True), (0.45, True)), config)  # 0.5 -> 0.45 ok, 3->0.5 not
    assert should_stop(_history((0.6, True), (0.58, True), (0.55, True)), config)
    assert not should_stop(_history((0.6, True), (0.58, False), (0.57, True)), config)  # not learned throughout
    assert not should_stop(_history((0.6, True), (0.5, True), (0.49, True)), config)  # still dropping
    at_once = config.replace(early_stop_patience=0)
    assert should_stop(_history((3.0, False), (1.2, True)), at_once)  # learned: stop, however it moves
    assert not should_stop(_history((0.6, True), (0.5, False)), at_once)
    assert not should_stop([], at_once)


def test_early_stopping_with_a_bound_on_the_target_loss():
    config = EditConfig(early_stopping=True, early_stop_patience=2, early_stop_tolerance=0.05,
                        early_stop_target_loss=0.1)
    assert not should_stop(_history((0.6, True), (0.58, True), (0.55, True)), config)  # flat, learned, too high
    assert should_stop(_history((0.12, True), (0.09, True), (0.08, True)), config)  # flat, and the window all low
    assert not should_stop(_history((0.1, True), (0.13, True), (0.09, True)), config)  # flat, one step too high
    at_once = config.replace(early_stop_patience=0)
    assert not should_stop(_history((3.0, False), (1.2, True)), at_once)
    assert should_stop(_history((3.0, False), (0.05, True)), at_once)
    assert not should_stop(_history((0.05, False)), at_once)  # low on average, a token still wrong
    for bad in (0, -0.1, True, "0.1"):
        with pytest.raises(InvalidConfigError, match="early_stop_target_loss"):
            config.replace(early_stop_target_loss=bad)


def test_early_stopping_ends_the_loop(tiny):
    editor = editor_for(tiny, "ice-lora", learning_rate=5e-2, max_steps=40, early_stop_tolerance=10.0,
                        lambda_ice=0.0)
    result = editor.edit(REQUEST, progress=False)
    assert result.stopped_early and result.steps < 40
    assert all(r.target_learned for r in result.history[-2:])
