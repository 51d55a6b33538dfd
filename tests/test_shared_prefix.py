"""The ICE training pass with each request's prompt and target encoded once: the same loss and
gradients as the pass over whole student rows."""

from __future__ import annotations

import pytest
import torch

from icelora import EditConfig, ICELoRAEditor
from icelora.anchors import anchor_teachers
from icelora.losses import Objective, build_plan
from icelora.request import EditRequest
from tests.conftest import moved_editor_and_plan

REQUESTS = [
    EditRequest(prompt="The Eiffel Tower is located in the city of", target="Rome", subject="The Eiffel Tower",
                contexts=("The Eiffel Tower is in Rome.", "Rome is home to the Eiffel Tower.")),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", target="Italian language",
                subject="Danielle Darrieux", contexts=("Danielle Darrieux speaks Italian.",)),
    EditRequest(prompt="Which family does Epaspidoceras belong to?", target="Geometridae",
                contexts=("Epaspidoceras is a moth of the family Geometridae.",)),
]


def loss_and_grads(editor: ICELoRAEditor, objective: Objective, step: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   dict[str, torch.Tensor]]:
    """One step's loss, reported numbers and the gradients of every trainable tensor."""
    params = {name: p for name, p in editor.model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    parts = objective(editor.model, step)
    parts.loss.backward()
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    return parts.loss.detach(), parts.numbers.clone(), grads


@pytest.mark.parametrize("independent", [False, True], ids=["joint", "independent"])
@pytest.mark.parametrize("main_pass_anchors", [False, True], ids=["own-pass-anchors", "riding-anchors"])
@pytest.mark.parametrize("completion_length", [1, 3])
def test_prefix_encoded_once_gives_the_whole_row_loss_and_gradients(tiny, independent, main_pass_anchors,
                                                                     completion_length):
    tiny.model.double()
    config = EditConfig(num_contexts=2, samples_per_context=2, completion_length=completion_length, seed=5,
                        lambda_locality=1.5, locality_anchors=2, locality_anchor_kind="subject",
                        target_modules=["attn_qv", "mlp_in", "mlp_out"])
    editor, plan = moved_editor_and_plan(tiny, config, REQUESTS, independent)
    assert len({len(e.ids) for e in plan.encoded}) > 1  # prefixes of different lengths, padded
    with editor.unedited():
        teachers = anchor_teachers(editor.model, editor.tokenizer, plan.pad_id, "subject", REQUESTS, independent)
    editor.params.training(True)
    results = {}
    for shared in (False, True):
        objective = Objective(plan, config, torch.device("cpu"), teachers)
        objective.shared_prefix, objective.main_pass_anchors = shared, main_pass_anchors
        results[shared] = loss_and_grads(editor, objective, step=3)
    (loss, numbers, grads), (loss_shared, numbers_shared, grads_shared) = results[False], results[True]
    assert loss.item() > 0.1
    # float64 model; the cross-entropy and KL terms are taken in float32 (as in training), whose
    # rounding differs with the number of rows averaged
    assert loss_shared.item() == pytest.approx(loss.item(), rel=1e-6)
    # the parts per request (the wrong-token count is counted once per request, not once per row)
    assert torch.allclose(numbers_shared[:3], numbers[:3], rtol=1e-6, atol=1e-9)
    assert torch.equal(numbers_shared[3] == 0, numbers[3] == 0)
    assert grads.keys() == grads_shared.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert (grads_shared[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_shared_prefix_is_the_cpu_default(tiny):
    config = EditConfig(num_contexts=2)
    plan = build_plan(tiny.tokenizer, REQUESTS[:1], config)
    objective = Objective(plan, config, torch.device("cpu"))
    assert objective.encodes_prefix_once(torch.device("cpu"))
    assert not objective.encodes_prefix_once(torch.device("cuda"))
    objective.shared_prefix = False
    assert not objective.encodes_prefix_once(torch.device("cpu"))
