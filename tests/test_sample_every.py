"""``sample_every``: an ICE draw reused for the steps between fresh ones, alone and among many edits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import icelora.losses
from icelora.config import EditConfig
from icelora.losses import Objective, build_plan, ice_loss
from icelora.sampling import Completions, DrawMemory
from tests.test_separate_edits import REQUESTS


def _completions(rows: int) -> Completions:
    tokens = torch.arange(rows * 2).reshape(rows, 2)
    return Completions(tokens=tokens, teacher_logits=tokens[..., None].float().expand(rows, 2, 4).clone(),
                       alive=torch.ones(rows, 2, dtype=torch.bool))


def test_memory_gives_a_draw_back_for_the_steps_between_and_then_asks_for_a_new_one():
    memory = DrawMemory(3)
    assert memory.recall([0]) is None  # nothing drawn yet
    drawn = _completions(2)
    memory.keep(6, [0, 0], drawn)
    for _ in range(2):  # the two steps after the one that drew it
        step, again = memory.recall([0])
        assert step == 6 and again is drawn
    assert memory.recall([0]) is None


def test_memory_of_every_step_keeps_nothing():
    memory = DrawMemory(1)
    memory.keep(0, [0], _completions(1))
    assert memory.recall([0]) is None
    with pytest.raises(ValueError, match="positive integer"):
        DrawMemory(0)


def test_memory_gives_the_rows_of_the_requests_still_running_in_order():
    memory = DrawMemory(2)
    drawn = _completions(5)
    memory.keep(4, [0, 0, 1, 2, 2], drawn)
    step, rows = memory.recall([0, 2])
    assert step == 4
    assert rows.tokens.tolist() == drawn.tokens[[0, 1, 3, 4]].tolist()
    assert torch.equal(rows.teacher_logits, drawn.teacher_logits[[0, 1, 3, 4]])
    memory.keep(4, [0, 0, 1, 2, 2], drawn)
    assert memory.recall([0, 3]) is None  # a request the draw does not hold: draw afresh


def _config(**kw) -> EditConfig:
    return EditConfig(**{"num_contexts": 2, "completion_length": 3, "seed": 3, **kw})


def test_a_reused_draw_scores_the_same_completions_as_the_step_that_drew_them(tiny):
    """With the model unchanged, the step after a draw has that draw's loss exactly, where a
    fresh draw (another step's seed) gives another."""
    config = _config(sample_every=2)
    plan = build_plan(tiny.tokenizer, [REQUESTS[0]], config)
    memory = DrawMemory(2)
    first = ice_loss(tiny.model, plan, config, 0, torch.Generator().manual_seed(5), memory=memory)
    reused = ice_loss(tiny.model, plan, config, 1, torch.Generator().manual_seed(99), memory=memory)
    fresh = ice_loss(tiny.model, plan, config, 2, torch.Generator().manual_seed(99), memory=memory)
    assert reused.loss.item() == first.loss.item() and reused.ice == first.ice
    assert fresh.ice != pytest.approx(first.ice, rel=1e-3)


def test_a_reused_draw_keeps_the_contexts_it_was_drawn_after(tiny):
    """With ``contexts_per_step``, a step that reuses a draw trains on the window of the step
    that drew it, not on its own."""
    config = _config(sample_every=2, contexts_per_step=1)
    plan = build_plan(tiny.tokenizer, [REQUESTS[0]], config)
    memory = DrawMemory(2)
    first = ice_loss(tiny.model, plan, config, 0, torch.Generator().manual_seed(5), memory=memory)
    reused = ice_loss(tiny.model, plan, config, 1, torch.Generator().manual_seed(5), memory=memory)
    own_window = ice_loss(tiny.model, plan, replace(config, sample_every=1), 1, torch.Generator().manual_seed(5))
    assert reused.ice == first.ice
    assert own_window.ice != pytest.approx(first.ice, rel=1e-3)


def test_an_objective_samples_at_every_kth_call_only(tiny, monkeypatch):
    calls: list[int] = []
    sample = icelora.losses.sample_from_batch

    def counting(*args, **kwargs):
        calls.append(1)
        return sample(*args, **kwargs)

    monkeypatch.setattr(icelora.losses, "sample_from_batch", counting)
    config = _config(sample_every=3)
    objective = Objective(build_plan(tiny.tokenizer, [REQUESTS[0]], config), config, torch.device("cpu"))
    for step in range(7):
        objective(tiny.model, step)
    assert len(calls) == 3  # steps 0, 3 and 6


def test_independent_edits_reuse_their_own_rows_after_some_have_stopped(tiny):
    """Three edits drawn together at step 0; at step 1 only edits 0 and 2 run: each gets the
    loss it would get alone reusing its own draw of step 0."""
    config = _config(sample_every=2)
    together = Objective(build_plan(tiny.tokenizer, REQUESTS, config, independent=True), config,
                         torch.device("cpu"))
    together(tiny.model, 0)
    later = together(tiny.model, 1, active=[0, 2])
    for mine, request in zip(later.per_request, [REQUESTS[0], REQUESTS[2]]):
        alone = Objective(build_plan(tiny.tokenizer, [request], config), config, torch.device("cpu"))
        drawn = alone(tiny.model, 0)
        again = alone(tiny.model, 1)
        assert again.ice == drawn.ice
        assert mine.ice == pytest.approx(again.ice, rel=1e-5) and mine.loss == pytest.approx(again.total, rel=1e-5)
