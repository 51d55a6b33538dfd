"""The fixed-shape training pass (the CUDA-graph path) against the plain forward and backward."""

from __future__ import annotations

import pytest
import torch

from icelora import losses
from icelora.icelora_editor import ICELoRAEditor
from icelora.losses import Objective, build_plan
from icelora.methods import method_config
from icelora.request import EditRequest
from icelora.tokenization import pad_rows
from icelora.training_graphs import FixedShapeForward, ReplayedPass, aliased_logits, trainable_aliases
from tests.conftest import TINY_BUILDERS

ROWS = ["The Eiffel Tower is located in the city of Rome Now: the answer",
        "The Eiffel Tower is located in the city of Rome",
        "Paris is the capital of France"]
REQUEST = {"prompt": "The Eiffel Tower is located in the city of", "target": "Rome", "subject": "Eiffel Tower"}
SHORT = {"prompt": "Eiffel Tower city:", "target": "Rome", "subject": "Eiffel Tower"}  # its anchors are wider

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _inputs(tiny, width: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded rows (of different lengths), padded further to ``width``."""
    batch = pad_rows([tiny.tokenizer(text)["input_ids"] for text in ROWS], tiny.tokenizer.pad_token_id, device=device)
    extra = max(0, width - batch.input_ids.shape[1])
    pad = torch.nn.functional.pad
    return {"input_ids": pad(batch.input_ids, (0, extra), value=tiny.tokenizer.pad_token_id),
            "attention_mask": pad(batch.attention_mask, (0, extra), value=0),
            "position_ids": pad(batch.position_ids, (0, extra), value=0)}


def _real(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[:, : mask.shape[1]][mask.bool()]


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fixed_shape_pass_equals_the_plain_forward_and_backward(arch, attention):
    tiny = TINY_BUILDERS[arch]()
    tiny.model.set_attn_implementation(attention)
    plain_inputs = _inputs(tiny)
    assert len(set(plain_inputs["attention_mask"].sum(1).tolist())) > 1  # the mask must carry the padding
    wide = _inputs(tiny, width=plain_inputs["input_ids"].shape[1] + 5)  # the anchors' width, say
    weights = [p for p in tiny.model.parameters()]
    for p in weights:
        p.requires_grad_(True)
    plain = tiny.model(**plain_inputs).logits
    plain_grads = torch.autograd.grad(_real(plain, plain_inputs["attention_mask"]).square().mean(), weights)
    fixed = FixedShapeForward(graphs=True)  # no CUDA here: eager passes
    ours = fixed(tiny.model, **wide)
    assert ours.shape[1] == wide["input_ids"].shape[1]
    torch.testing.assert_close(_real(ours, plain_inputs["attention_mask"]),
                               _real(plain, plain_inputs["attention_mask"]), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(_real(ours, plain_inputs["attention_mask"]).square().mean(), weights)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert fixed.recording is None and fixed.replays == 0


def test_the_aliased_pass_of_a_lora_model_gives_its_gradients(tiny):
    """What the recording runs (the trainable tensors seen through aliases) gives the logits and
    the gradients of the plain pass, in the same order as the model's trainable tensors."""
    editor = ICELoRAEditor(tiny, method="ice-lora")
    model = editor.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters something to say
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    inputs = _inputs(tiny)
    plain = model(**inputs).logits
    plain_grads = torch.autograd.grad(plain.square().mean(), trainable)
    aliases = trainable_aliases(model)
    assert [a.data_ptr() for a in aliases.values()] == [p.data_ptr() for p in trainable]  # same storage
    ours = aliased_logits(model, aliases, inputs)
    torch.testing.assert_close(ours, plain)
    grads = torch.autograd.grad(ours.square().mean(), tuple(aliases.values()))
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in trainable)  # the tensors' own accumulators untouched
    editor.revert()


def test_an_edit_through_the_fixed_shape_passes_equals_one_without(tiny, monkeypatch):
    """The whole path the CUDA graphs take (fixed-shape sampling and training passes, anchors
    padded to the widest of their set), run eagerly on the CPU: the same losses step by step."""
    monkeypatch.setattr(Objective, "anchors_in_main_pass", lambda self, device: True)
    calls = []
    call = FixedShapeForward.__call__

    def counted(self, model, **inputs):
        calls.append(inputs["input_ids"].shape)
        return call(self, model, **inputs)

    monkeypatch.setattr(FixedShapeForward, "__call__", counted)
    histories = {}
    editor = ICELoRAEditor(tiny, method="ice-lora", early_stopping=False, max_steps=5)
    for graphs in (False, True):
        monkeypatch.setattr(losses, "graphs_apply", lambda *args, on=graphs: on)
        editor.cuda_graphs = graphs
        assert editor.config.lambda_locality > 0
        histories[graphs] = [(h.loss, h.ft, h.ice) for h in editor.edit(SHORT, progress=False).history]
        editor.revert()
        assert len(calls) == (5 if graphs else 0)
    assert len(set(calls)) == 1  # the same shape at every step, whichever anchors a step draws
    anchor_widths = {len(row) for rows in editor._anchor_rows.values() for row in rows}
    encoded = build_plan(tiny.tokenizer, [EditRequest(**SHORT)], editor.config).encoded[0]
    student_width = len(encoded.ids) + editor.config.completion_length
    assert len(anchor_widths) > 1 and max(anchor_widths) > student_width  # the padding has work to do
    assert calls[0][1] == max(anchor_widths)
    torch.testing.assert_close(torch.tensor(histories[True]), torch.tensor(histories[False]), atol=1e-5, rtol=1e-5)


def test_cuda_graphs_settings_choose_the_passes(tiny):
    cuda = torch.device("cuda")
    config = method_config("ice-lora").replace(lambda_locality=0.0, lora_projection_energy=None)
    objective = Objective(build_plan(tiny.tokenizer, [EditRequest(**REQUEST)], config), config, torch.device("cpu"))
    expected = {None: (True, True), True: (True, True), "sampling": (True, False), False: (False, False)}
    for setting, (sampling, training) in expected.items():
        objective.cuda_graphs = setting
        assert (objective.samples_from_graphs(cuda), objective.trains_from_graphs(cuda)) == (sampling, training)
    objective.cuda_graphs = None
    cpu = torch.device("cpu")
    assert not objective.samples_from_graphs(cpu) and not objective.trains_from_graphs(cpu)
    objective.cuda_graphs = "yes"  # a command-line word, not a setting: refused, not read as off
    with pytest.raises(ValueError, match="cuda_graphs"):
        objective.samples_from_graphs(cuda)


@needs_cuda
@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_training_pass_equals_the_eager_one_on_cuda(arch, dtype):
    tiny = TINY_BUILDERS[arch]()
    model = tiny.model.to("cuda", dtype)
    inputs = _inputs(tiny, device="cuda")
    trainable = [p for name, p in model.named_parameters() if "mlp" in name or "ln" in name]
    for p in model.parameters():
        p.requires_grad_(any(p is t for t in trainable))
    graphed, eager = FixedShapeForward(graphs=True), FixedShapeForward(graphs=False)
    for call in range(4):
        results = []
        for fixed in (graphed, eager):
            logits = fixed(model, **inputs)
            assert (graphed.recording is None) == (call == 0)  # recorded at the second call of the shape
            grads = torch.autograd.grad(_real(logits, inputs["attention_mask"]).float().square().mean(), trainable)
            results.append((logits.detach().clone(), grads))
        torch.testing.assert_close(results[0][0], results[1][0])
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b)
        with torch.no_grad():  # replays read the weights where they live: an in-place update shows
            for p in trainable:
                p.mul_(0.9)
        inputs["input_ids"] = inputs["input_ids"].roll(1, dims=0)  # new tokens in the same shape
        inputs["attention_mask"] = inputs["attention_mask"].roll(1, dims=0)
        inputs["position_ids"] = inputs["position_ids"].roll(1, dims=0)
    assert graphed.replays == 3


@needs_cuda
@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_an_edit_with_graphed_training_equals_one_without(arch, monkeypatch):
    replays = []
    apply = ReplayedPass.apply
    monkeypatch.setattr(ReplayedPass, "apply", lambda *args: replays.append(1) or apply(*args))
    losses_of = {}
    for graphs in (False, "sampling", True):
        tiny = TINY_BUILDERS[arch]()
        tiny.model.to("cuda")
        editor = ICELoRAEditor(tiny, method="ice-lora", early_stopping=False, max_steps=6)
        editor.cuda_graphs = graphs
        losses_of[graphs] = [(h.loss, h.ft, h.ice) for h in editor.edit(REQUEST, progress=False).history]
        assert len(replays) == (5 if graphs is True else 0)  # steps 2-6 (step 2 records, then replays)
    for graphs in ("sampling", True):
        torch.testing.assert_close(torch.tensor(losses_of[graphs]), torch.tensor(losses_of[False]),
                                   atol=1e-4, rtol=1e-4)


@needs_cuda
def test_a_failed_training_recording_leaves_the_eager_pass_for_good(monkeypatch):
    from icelora import training_graphs

    tiny = TINY_BUILDERS["gpt2"]()
    model = tiny.model.to("cuda")
    inputs = _inputs(tiny, device="cuda")

    def fail(model, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(training_graphs, "record", fail)
    fixed = FixedShapeForward(graphs=True)
    with torch.no_grad():
        plain = model(**inputs).logits
    for _ in range(3):
        with torch.enable_grad():
            logits = fixed(model, **inputs)
        torch.testing.assert_close(_real(logits, inputs["attention_mask"]), _real(plain, inputs["attention_mask"]))
    assert fixed.recording is None and not fixed.graphs and model in training_graphs._UNRECORDABLE
