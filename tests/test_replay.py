"""Rehearsal of earlier edits in sequential editing (``replay_edits``)."""

from __future__ import annotations

import pytest
import torch

from icelora import EditConfig, ICELoRAEditor
from icelora.errors import InvalidConfigError
from icelora.evaluation.metrics import continuation_nll
from icelora.losses import Objective, build_plan, ft_loss
from icelora.replay import ReplayObjective, replayed_indices, replayed_requests
from icelora.request import EditRequest
from tests.conftest import tiny_gpt2

EARLIER = [
    EditRequest(prompt="The Eiffel Tower is located in the city of", target="Rome"),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", target="Italian"),
    EditRequest(prompt="Which family does Epaspidoceras belong to?", target="Geometridae"),
    EditRequest(prompt="The place of death of Leo Arons is", target="Paris"),
]
NEW = EditRequest(prompt="The capital of Italy is", target="Berlin")


def test_replayed_indices_are_seeded_draws_without_replacement():
    assert replayed_indices(3, 5, seed=0, step=0) == [0, 1, 2]
    draws = [replayed_indices(40, 6, seed=0, step=step) for step in range(10)]
    for drawn in draws:
        assert len(drawn) == 6 and len(set(drawn)) == 6 and drawn == sorted(drawn)
        assert all(0 <= i < 40 for i in drawn)
    assert draws == [replayed_indices(40, 6, seed=0, step=step) for step in range(10)]
    assert len({tuple(d) for d in draws}) > 1                                 # a fresh draw every step
    assert replayed_indices(40, 6, seed=1, step=0) != draws[0]               # and per seed
    assert len(replayed_indices(10**6, 3, seed=2**40, step=24)) == 3        # any seed


def test_an_edit_does_not_replay_a_prompt_it_rewrites():
    rewrite = EditRequest(prompt=EARLIER[1].prompt, target="Spanish")
    assert replayed_requests(EARLIER, [rewrite]) == [EARLIER[0], EARLIER[2], EARLIER[3]]
    assert replayed_requests(EARLIER, [NEW]) == EARLIER


def test_replay_adds_the_weighted_target_loss_of_the_drawn_edits(tiny):
    config = EditConfig(objective="ft", replay_edits=2, lambda_replay=0.5, seed=3)
    objective = Objective(build_plan(tiny.tokenizer, [NEW], config), config, torch.device("cpu"))
    earlier = build_plan(tiny.tokenizer, EARLIER, config)
    with_replay = ReplayObjective(objective, earlier, config)
    with torch.no_grad():
        plain, replayed = objective(tiny.model, 7), with_replay(tiny.model, 7)
        chosen = replayed_indices(len(EARLIER), 2, seed=3, step=7)
        term = ft_loss(tiny.model, earlier.subset(chosen), config, 7).loss
        by_hand = torch.stack([ft_loss(tiny.model, earlier.subset([i]), config, 7).loss for i in chosen]).mean()
    torch.testing.assert_close(term, by_hand)
    torch.testing.assert_close(replayed.loss, plain.loss + 0.5 * term)
    assert replayed.per_request == plain.per_request      # reported numbers and early stopping: the new edit's


def test_replay_config_is_checked():
    with pytest.raises(InvalidConfigError, match="replay_edits"):
        EditConfig(replay_edits=-1)
    with pytest.raises(InvalidConfigError, match="lambda_replay"):
        EditConfig(lambda_replay=-0.5)
    with pytest.raises(ValueError, match="replay_edits"):
        ReplayObjective(lambda model, step: None, None, EditConfig())  # type: ignore[arg-type]


def _target_nll(editor: ICELoRAEditor, request: EditRequest) -> float:
    tok = editor.tokenizer
    prompt = tuple(tok(request.prompt)["input_ids"])
    target = tuple(tok(" " + request.target, add_special_tokens=False)["input_ids"])
    return continuation_nll(editor.model, prompt, target)


def _sequential(replay_edits: int) -> list[float]:
    editor = ICELoRAEditor(tiny_gpt2(), method="lora", layers=[0, 1, 2], max_steps=15, learning_rate=2e-2,
                           replay_edits=replay_edits)
    for request in EARLIER:
        editor.edit(request, progress=False)
    return [_target_nll(editor, r) for r in EARLIER]


def test_replay_keeps_earlier_edits_that_later_edits_overwrite():
    plain, replayed = _sequential(0), _sequential(2)
    # without replay the first edits are overwritten by the later ones; with it they stay learned
    assert sum(replayed[:-1]) < 0.5 * sum(plain[:-1]), (replayed, plain)
    assert replayed[-1] < 2 * plain[-1] + 0.5                              # the last edit is still made


def test_edits_each_from_the_unedited_model_do_not_replay_the_ledger():
    def separate(replay_edits: int) -> dict[str, torch.Tensor]:
        editor = ICELoRAEditor(tiny_gpt2(), method="lora", layers=[1, 2], max_steps=4, learning_rate=2e-2,
                               replay_edits=replay_edits)
        editor.edit(EARLIER[0], progress=False)
        with editor.edit_each([NEW], progress=False, together=False) as edits:
            return {k: v.clone() for k, v in editor.params.separate_tensors(edits.adapters).items()}

    plain, with_replay = separate(0), separate(3)
    assert plain.keys() == with_replay.keys()
    for key, value in plain.items():
        torch.testing.assert_close(with_replay[key], value, rtol=0, atol=0)
