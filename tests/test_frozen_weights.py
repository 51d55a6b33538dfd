"""Frozen weights in bfloat16 while an edit trains (``frozen_dtype``), the model's own weights after."""

from __future__ import annotations

import pytest
import torch

from icelora import ICELoRAEditor
from icelora.errors import InvalidConfigError
from icelora.frozen_weights import FrozenWeights
from icelora.input_projection import gram_directions, svd_directions
from icelora.lora_utils import lora_layers
from icelora.methods import method_config
from tests.conftest import TINY_BUILDERS
from tests.test_input_projection import REQUEST
from tests.test_input_projection import SETTINGS as PROJECTION_SETTINGS
from tests.test_separate_edits import REQUESTS

SETTINGS = {**PROJECTION_SETTINGS, "max_steps": 4, "lora_projection_energy": 0.9}


def outer_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters of the input embeddings and the output layer (kept in float32)."""
    kept = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in kept}


def test_copies_are_swapped_in_kept_and_made_again_after_a_change(tiny):
    """The blocks' weights are bfloat16 copies within the block, kept from one block to the next
    and made again after the weight changes; the embeddings and the output layer stay float32, so
    the logits are float32; after the block the model has its very tensors back."""
    model = tiny.model
    outer = outer_names(model)
    weight = next(p for name, p in model.named_parameters() if name not in outer and p.dim() == 2)
    original = weight.detach().clone()
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    frozen = FrozenWeights(model, torch.bfloat16)
    ids = tiny.tokenizer("The Eiffel Tower is in", return_tensors="pt")["input_ids"]
    reference = model(ids).logits
    with frozen.swapped():
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        assert {dtypes[n] for n in outer} == {torch.float32} and outer
        assert {d for n, d in dtypes.items() if n not in outer} == {torch.bfloat16}
        assert torch.equal(weight, original.to(torch.bfloat16))
        logits = model(ids).logits
        assert logits.dtype == torch.float32 and torch.allclose(logits, reference, atol=0.1, rtol=0.05)
        assert not torch.equal(logits, reference)
        copy = weight.data_ptr()
        with frozen.swapped():  # nested: nothing more happens
            assert weight.data_ptr() == copy
        assert weight.dtype == torch.bfloat16
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert all(p.dtype == torch.float32 for p in model.parameters()) and torch.equal(weight, original)
    assert torch.equal(model(ids).logits, reference)  # no hook left behind
    with frozen.swapped():
        assert weight.data_ptr() == copy  # the copy is kept
    with torch.no_grad():
        weight.add_(1.0)
    with frozen.swapped():  # changed in place: copied again
        assert weight.data_ptr() != copy
        assert torch.equal(weight, (original + 1.0).to(torch.bfloat16))
    with FrozenWeights(model, None).swapped():
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_an_edit_trains_on_bfloat16_weights_and_leaves_the_models_own(tiny):
    """Each step sees the blocks' weights in bfloat16, the embeddings, output layer and adapters in
    float32; after the edit the base weights are the very float32 tensors they were. The loss is
    the float32 edit's up to bfloat16 rounding, not equal to it."""
    base = {name: p.detach().clone() for name, p in tiny.model.named_parameters()}
    pointers = {name: p.data_ptr() for name, p in tiny.model.named_parameters()}
    editor = ICELoRAEditor(tiny, method="ice-lora", frozen_dtype="bfloat16", **SETTINGS)
    seen = []

    outer = {id(p) for m in (tiny.model.get_input_embeddings(), tiny.model.get_output_embeddings())
             for p in m.parameters()}

    def on_step(record) -> None:
        weights = {p.dtype for n, p in editor.model.named_parameters() if "lora_" not in n and id(p) not in outer}
        kept = {p.dtype for n, p in editor.model.named_parameters() if id(p) in outer}
        adapters = {p.dtype for n, p in editor.model.named_parameters() if "lora_" in n}
        seen.append((weights, kept, adapters))

    result = editor.edit(REQUEST, progress=False, on_step=on_step)
    assert seen == [({torch.bfloat16}, {torch.float32}, {torch.float32})] * result.steps
    for name, p in editor.loaded.model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert p.dtype == torch.float32 and torch.equal(p, base[key]) and p.data_ptr() == pointers[key]
    assert all(p.dtype == torch.float32 for p in editor.params.named_trainable().values())
    assert any(m.lora_B["default"].weight.abs().sum() > 0 for m in lora_layers(editor.model).values())
    assert editor.model(**editor.tokenizer(REQUEST.prompt, return_tensors="pt")).logits.dtype == torch.float32

    fresh = TINY_BUILDERS[tiny.name.removeprefix("tiny-")]()  # seeded: the same weights
    assert all(torch.equal(p, base[name]) for name, p in fresh.model.named_parameters())
    plain = ICELoRAEditor(fresh, method="ice-lora", **SETTINGS).edit(REQUEST, progress=False)
    first, reference = result.history[0].loss, plain.history[0].loss
    assert first != reference and first == pytest.approx(reference, rel=0.05)


@pytest.mark.parametrize("together", [True, False])
def test_edits_each_in_their_own_adapter_train_on_bfloat16_weights_too(tiny, together):
    base = {name: p.detach().clone() for name, p in tiny.model.named_parameters()}
    editor = ICELoRAEditor(tiny, method="ice-lora", frozen_dtype="bfloat16", **SETTINGS)
    requests = REQUESTS[:2]
    with editor.edit_each(requests, progress=False, together=together) as edits:
        for adapter in edits.adapters:
            assert any(m.lora_B[adapter].weight.abs().sum() > 0 for m in lora_layers(editor.model).values())
            assert all(m.lora_B[adapter].weight.dtype == torch.float32 for m in lora_layers(editor.model).values())
    assert all(p.dtype == torch.float32 for p in editor.loaded.model.parameters())
    restored = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                for n, p in editor.loaded.model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(restored[name], value) for name, value in base.items())


def test_protected_directions_of_bfloat16_inputs_are_float32():
    """Orthonormal directions rounded to bfloat16 would let their rounding through the projection."""
    torch.manual_seed(0)
    inputs = (torch.randn(12, 16) @ torch.randn(16, 16)).to(torch.bfloat16)
    for directions in (svd_directions(inputs, 0.9), gram_directions(inputs, 0.9)):
        assert directions.dtype == torch.float32
        gram = directions.T @ directions
        assert torch.allclose(gram, torch.eye(len(gram)), atol=1e-5)
    assert svd_directions(inputs.double(), 0.9).dtype == torch.float64


def test_frozen_dtype_is_checked():
    with pytest.raises(InvalidConfigError, match="frozen_dtype must be one of"):
        method_config("ice-lora", frozen_dtype="float8")
    with pytest.raises(InvalidConfigError, match="frozen_dtype needs parameterization lora"):
        method_config("ice", frozen_dtype="bfloat16")
    assert method_config("ice-lora", frozen_dtype="bfloat16").frozen_dtype == "bfloat16"
