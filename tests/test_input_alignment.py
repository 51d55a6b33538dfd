"""Edit-aligned LoRA input projections (``lora_init: edit_inputs``)."""

from __future__ import annotations

import pytest
import torch

from icelora import ICELoRAEditor
from icelora.errors import InvalidConfigError
from icelora.input_alignment import align_rows, leading_input_rows
from icelora.input_projection import leading_directions, module_inputs
from icelora.lora_utils import ADAPTER_NAME, lora_layers
from icelora.losses import build_plan
from icelora.methods import method_config
from tests.test_input_projection import REQUEST
from tests.test_input_projection import SETTINGS as PROJECTION_SETTINGS

SETTINGS = {**PROJECTION_SETTINGS, "max_steps": 3}


def test_leading_input_rows_are_orthonormal_signed_and_off_the_protected_directions():
    torch.manual_seed(0)
    inputs = torch.randn(6, 20) @ torch.randn(20, 20)
    rows = leading_input_rows(inputs, rank=4)
    assert rows.shape == (4, 20) and rows.dtype == torch.float64
    assert torch.allclose(rows @ rows.T, torch.eye(4, dtype=torch.float64), atol=1e-10)
    _, _, vh = torch.linalg.svd(inputs.double(), full_matrices=False)
    assert torch.allclose((rows @ vh[:4].T).abs(), torch.eye(4, dtype=torch.float64), atol=1e-8)  # the leading ones
    assert ((inputs.double() @ rows.T).sum(0) > 0).all()
    # more rows asked than the inputs have directions: only theirs
    assert leading_input_rows(inputs, rank=16).shape == (6, 20)
    protected = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64)).Q
    off = leading_input_rows(inputs, rank=16, protected=protected)
    assert (off @ protected).abs().max() < 1e-10
    assert off.shape == (6, 20)
    assert leading_input_rows(torch.zeros(3, 20), rank=4).shape == (0, 20)


def test_align_rows_keeps_each_rows_norm_and_the_rest_of_the_matrix():
    torch.manual_seed(1)
    weight = torch.randn(5, 8)
    before = weight.clone()
    rows = torch.linalg.qr(torch.randn(8, 2)).Q.T.double()
    align_rows(weight, rows)
    assert torch.allclose(weight[:2].norm(dim=1), before[:2].norm(dim=1))
    assert torch.allclose(weight[:2] / weight[:2].norm(dim=1, keepdim=True), rows.float(), atol=1e-6)
    assert torch.equal(weight[2:], before[2:])


@pytest.mark.parametrize("energy", [None, 0.9])
def test_an_edit_starts_its_adapters_on_its_own_inputs(tiny, energy):
    """The aligned rows span the prompt-and-target inputs' leading directions (off the protected
    ones under the constraint), the model is unchanged by them (``B = 0``), and an adapter that
    has learned something is left alone."""
    editor = ICELoRAEditor(tiny, method="ice-lora", **SETTINGS, lora_projection_energy=energy,
                           lora_init="edit_inputs")
    probe = torch.tensor([editor.tokenizer(REQUEST.prompt)["input_ids"]])
    plain = editor.model(probe).logits
    (encoded,) = build_plan(editor.tokenizer, [REQUEST], editor.config).encoded
    row = list(encoded.ids)
    inputs = module_inputs(editor.model, editor.params.base_modules(), [row], editor.tokenizer.pad_token_id)
    random_a = {n: m.lora_A[ADAPTER_NAME].weight.detach().clone() for n, m in lora_layers(editor.model).items()}
    editor.align_inputs([[row]], [ADAPTER_NAME])
    assert torch.equal(editor.model(probe).logits, plain)
    for name, module in lora_layers(editor.model).items():
        a = module.lora_A[ADAPTER_NAME].weight.detach()
        expected = leading_input_rows(inputs[name], a.shape[0])
        m = expected.shape[0]
        assert 0 < m <= a.shape[0]
        assert torch.allclose(a[:m].norm(dim=1), random_a[name][:m].norm(dim=1))
        direction = a[:m] / a[:m].norm(dim=1, keepdim=True)
        assert torch.allclose(direction.double(), expected, atol=1e-5), name
        assert torch.equal(a[m:], random_a[name][m:])
    editor.edit(REQUEST, progress=False)  # aligned again (off the protected directions), then trained
    if energy is not None:
        anchors_inputs = editor._anchor_inputs(editor.anchor_teachers(build_plan(editor.tokenizer, [REQUEST],
                                                                                 editor.config)),
                                               [ADAPTER_NAME], on_unedited=True)
        for name, (x,) in anchors_inputs.items():
            a = lora_layers(editor.model)[name].lora_A[ADAPTER_NAME].weight.detach()
            assert (a @ leading_directions(x, energy)).abs().max() < 1e-5, name
    trained = {n: m.lora_A[ADAPTER_NAME].weight.detach().clone() for n, m in lora_layers(editor.model).items()}
    editor.align_inputs([[row]], [ADAPTER_NAME])  # every B has learned: nothing moves
    for name, module in lora_layers(editor.model).items():
        assert torch.equal(module.lora_A[ADAPTER_NAME].weight, trained[name]), name


def test_config_checks_lora_init():
    with pytest.raises(InvalidConfigError, match="lora_init must be one of"):
        method_config("ice-lora", lora_init="pissa")
    with pytest.raises(InvalidConfigError, match="lora_init 'edit_inputs' needs parameterization lora"):
        method_config("ice", lora_init="edit_inputs")
