"""The locality term: KL to the pre-edit model on unrelated anchor texts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icelora import EditConfig, ICELoRAEditor
from icelora.anchors import ANCHOR_TEXTS, AnchorTeacher, anchor_kl_from_logits, anchor_rows, anchor_teacher
from icelora.losses import Objective, build_plan
from icelora.request import EditRequest
from icelora.tokenization import pad_rows

REQUEST = EditRequest(prompt="The Eiffel Tower is located in the city of", target="Rome",
                      contexts=("The Eiffel Tower is in Rome.", "Rome is home to the Eiffel Tower."))


def anchor_kl(model: nn.Module, teacher: AnchorTeacher, chosen: list[int], pad_id: int, owners: int,
              forward_kwargs: dict | None = None) -> torch.Tensor:
    """Reference: ``KL(p0 || q)`` per owner in a forward pass of its own (the objectives instead
    add the anchor rows to their main pass).

    Owner k's copy of the anchors goes through the forward call with ``forward_kwargs`` routing row
    ``k * len(chosen) + j`` (independent edits route each copy to its own adapter).
    """
    device = next(model.parameters()).device
    batch = pad_rows(anchor_rows(teacher, chosen, owners), pad_id, device=device)
    logits = model(**batch.forward_kwargs(), **(forward_kwargs or {})).logits
    return anchor_kl_from_logits(teacher, chosen, owners, logits)


def test_anchor_kl_is_zero_before_the_edit_and_grows_after(tiny):
    editor = ICELoRAEditor(tiny, method="lora", max_steps=8, learning_rate=5e-2, layers=[0, 1])
    pad = editor.tokenizer.pad_token_id
    teacher = anchor_teacher(editor.model, editor.tokenizer, pad)
    assert len(teacher.rows) == len(ANCHOR_TEXTS)
    chosen = teacher.choose(3, seed=0, step=5)
    assert chosen == teacher.choose(3, seed=0, step=5) and len(set(chosen)) == 3
    with torch.no_grad():
        assert anchor_kl(editor.model, teacher, chosen, pad, owners=2).abs().max() < 1e-5
    editor.edit(REQUEST, progress=False)
    with torch.no_grad():
        kl = anchor_kl(editor.model, teacher, chosen, pad, owners=2)
    assert kl.shape == (2,) and kl[0] > 1e-4 and kl[0] == pytest.approx(kl[1].item())


def test_objective_adds_the_weighted_locality_term(tiny):
    base = EditConfig(num_contexts=2, completion_length=2, seed=1)
    anchored = base.replace(lambda_locality=2.0, locality_anchors=3)
    plan = build_plan(tiny.tokenizer, [REQUEST], base)
    teacher = anchor_teacher(tiny.model, tiny.tokenizer, plan.pad_id)
    with pytest.raises(ValueError, match="anchors"):
        Objective(plan, anchored, torch.device("cpu"))
    # move the model a little so the term is not zero
    with torch.no_grad():
        next(p for p in tiny.model.parameters() if p.dim() == 2).add_(0.05)
    plain = Objective(plan, base, torch.device("cpu"))(tiny.model, 3)
    parts = Objective(plan, anchored, torch.device("cpu"), teacher)(tiny.model, 3)
    kl = anchor_kl(tiny.model, teacher, teacher.choose(3, 1, 3), plan.pad_id, 1)
    assert parts.loss.item() == pytest.approx(plain.loss.item() + 2.0 * kl.item(), rel=1e-5)
    assert parts.per_request[0].loss == pytest.approx(parts.loss.item(), rel=1e-5)


def test_an_edit_with_the_locality_term_moves_the_anchors_less(tiny):
    settings = {"max_steps": 10, "learning_rate": 5e-2, "layers": [0, 1], "early_stopping": False}
    moved = {}
    for weight in (0.0, 5.0):
        editor = ICELoRAEditor(tiny, method="lora", lambda_locality=weight, locality_anchors=len(ANCHOR_TEXTS),
                               **settings)
        pad = editor.tokenizer.pad_token_id
        teacher = anchor_teacher(editor.model, editor.tokenizer, pad)
        editor.edit(REQUEST, progress=False)
        with torch.no_grad():
            moved[weight] = anchor_kl(editor.model, teacher, list(range(len(ANCHOR_TEXTS))), pad, 1).item()
        editor.revert()
        editor.params.model.unload()  # the next editor wraps the same tiny model
    assert moved[5.0] < moved[0.0]
