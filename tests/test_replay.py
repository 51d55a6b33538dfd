"""Rehearsal of earlier edits in sequential editing (``replay_edits``)."""

from __future__ import annotations

import pytest
import torch

from icelora import EditConfig, ICELoRAEditor
from icelora import anchors as anchor_module
from icelora.anchors import SUBJECT_TEMPLATES, anchor_kl_from_logits, subject_anchors, teacher_from_rows
from icelora.errors import InvalidConfigError
from icelora.evaluation.metrics import continuation_nll
from icelora.losses import Objective, build_plan, ft_loss
from icelora.replay import (
    ReplayAnchors,
    ReplayObjective,
    replayed_anchor_rows,
    replayed_indices,
    replayed_requests,
)
from icelora.request import EditRequest
from icelora.tokenization import pad_rows
from tests.conftest import tiny_gpt2

EARLIER = [
    EditRequest(prompt="The Eiffel Tower is located in the city of", target="Rome", subject="Eiffel Tower"),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", target="Italian", subject="Danielle Darrieux"),
    EditRequest(prompt="Which family does Epaspidoceras belong to?", target="Geometridae"),
    EditRequest(prompt="The place of death of Leo Arons is", target="Paris", subject="Leo Arons"),
]
NEW = EditRequest(prompt="The capital of Italy is", target="Berlin", subject="Italy")


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
    with pytest.raises(InvalidConfigError, match="replay_anchors"):
        EditConfig(replay_anchors=-1)
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


def test_replayed_anchor_rows_are_seeded_draws_from_each_replayed_edit():
    rows = [[(1, i) for i in range(8)], [], [(2, i) for i in range(3)], [(3, i) for i in range(8)]]
    drawn = replayed_anchor_rows(rows, [0, 1, 2, 3], 2, seed=0, step=5)
    assert len(drawn) == 2 + 0 + 2 + 2 and [r[0] for r in drawn] == [1, 1, 2, 2, 3, 3]
    assert len(set(drawn)) == len(drawn)
    assert drawn == replayed_anchor_rows(rows, [0, 1, 2, 3], 2, seed=0, step=5)
    assert {tuple(replayed_anchor_rows(rows, [0], 2, seed=0, step=s)) for s in range(10)} != {tuple(drawn[:2])}
    assert replayed_anchor_rows(rows, [2], 5, seed=0, step=0) == rows[2]      # all of an edit with fewer


def test_replay_anchors_add_the_locality_term_of_the_replayed_subjects(tiny):
    config = EditConfig(objective="ft", replay_edits=2, lambda_replay=0.5, lambda_locality=3.0, replay_anchors=2,
                        seed=1)
    objective = Objective(build_plan(tiny.tokenizer, [NEW], config), config, torch.device("cpu"),
                          anchors=teacher_from_rows(tiny.model, [(5, 6, 7, 8)], 0))
    earlier = build_plan(tiny.tokenizer, EARLIER, config)
    rows = [[tuple(tiny.tokenizer(f"{r.subject} {t}")["input_ids"]) for t in ("is a", "was born in", "has")]
            if r.subject else [] for r in EARLIER]
    torch.manual_seed(123)
    other = type(tiny.model)(tiny.model.config).eval()   # another model's distributions, so that KL > 0
    asked = []

    def teacher(chosen_rows):
        asked.append(list(chosen_rows))
        return teacher_from_rows(other, chosen_rows, earlier.pad_id)

    replay = ReplayObjective(objective, earlier, config, ReplayAnchors(rows=rows, teacher=teacher))
    with torch.no_grad():
        plain, replayed = objective(tiny.model, 4), replay(tiny.model, 4)
        chosen = replayed_indices(len(EARLIER), 2, seed=1, step=4)
        drawn = replayed_anchor_rows(rows, chosen, 2, seed=1, step=4)
        target = ft_loss(tiny.model, earlier.subset(chosen), config, 4).loss
        logits = tiny.model(**pad_rows(drawn, earlier.pad_id).forward_kwargs()).logits
        kl = anchor_kl_from_logits([teacher(drawn)], [range(len(drawn))], logits)[0]
    assert asked[0] == drawn and drawn
    assert kl > 0
    torch.testing.assert_close(replayed.loss, plain.loss + 0.5 * target + 3.0 * kl)
    assert replayed.per_request == plain.per_request


def test_the_editor_makes_replay_anchors_with_the_unedited_model(tiny):
    editor = ICELoRAEditor(tiny, method="lora", layers=[0, 1, 2], max_steps=3, learning_rate=5e-2,
                           lambda_locality=1.0, locality_anchor_kind="subject", replay_edits=2, replay_anchors=2)
    plan = build_plan(editor.tokenizer, EARLIER, editor.config)
    with torch.no_grad():
        before_rows = [subject_anchors(editor.model, editor.tokenizer, plan.pad_id, [r.subject]).rows
                       if r.subject else [] for r in EARLIER]
        before = teacher_from_rows(editor.model, before_rows[0], plan.pad_id)
    editor.edit(EARLIER[:2], progress=False)
    edited = {k: v.clone() for k, v in editor.params.named_trainable().items()}
    anchors = editor.replay_anchors(plan)
    assert anchors.rows == before_rows and len(anchors.rows[0]) == len(SUBJECT_TEMPLATES)
    for got, want in zip(anchors.teacher(anchors.rows[0]).log_probs, before.log_probs):
        torch.testing.assert_close(got, want)
    for key, value in editor.params.named_trainable().items():               # the edit is back afterwards
        torch.testing.assert_close(value, edited[key], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for v in edited.values())
    editor.config = editor.config.replace(replay_anchors=0)
    assert editor.replay_anchors(plan) is None                                        # off


def _earlier_subject_drift(replay_anchors: int) -> float:
    """Mean KL to the unedited model on the earlier edits' subject anchors after four sequential
    edits (each with its own subject's locality term, and replay of the earlier targets). The
    learning rate is low enough for the outcome not to hang on float rounding: at 3e-2 the ratio
    below was 0.66 on one CPU and 0.94 on another."""
    loaded = tiny_gpt2()
    editor = ICELoRAEditor(loaded, method="lora", layers=[0, 1, 2], max_steps=16, learning_rate=1e-2,
                           lambda_locality=1.0, locality_anchor_kind="subject", replay_edits=3,
                           replay_anchors=replay_anchors)
    requests = [r for r in EARLIER if r.subject] + [NEW]
    plan = build_plan(editor.tokenizer, requests[:-1], editor.config)
    with torch.no_grad():
        rows = [row for r in requests[:-1]
                for row in subject_anchors(editor.model, editor.tokenizer, plan.pad_id, [r.subject]).rows]
        teacher = teacher_from_rows(editor.model, rows, plan.pad_id)
    for request in requests:
        editor.edit(request, progress=False)
    with torch.no_grad():
        logits = editor.model(**pad_rows(rows, plan.pad_id).forward_kwargs()).logits
        return anchor_kl_from_logits([teacher], [range(len(rows))], logits)[0].item()


def test_replayed_anchors_keep_earlier_subjects_as_they_were():
    plain, kept = _earlier_subject_drift(0), _earlier_subject_drift(2)
    assert kept < 0.8 * plain, (kept, plain)   # 0.43 against 0.97 nats (seeds 1-3: ratio 0.32-0.44)


def test_each_subjects_anchor_rows_are_made_once(tiny, monkeypatch):
    made = []
    make = anchor_module.subject_anchors
    monkeypatch.setattr(anchor_module, "subject_anchors",
                        lambda model, tokenizer, pad_id, subjects: made.append(list(subjects))
                        or make(model, tokenizer, pad_id, subjects))
    editor = ICELoRAEditor(tiny, method="lora", layers=[0, 1, 2], max_steps=2, lambda_locality=1.0,
                           locality_anchor_kind="subject", replay_edits=2, replay_anchors=1)
    requests = [r for r in EARLIER if r.subject] + [NEW]
    for request in requests:       # each edit's own anchors, then the same rows again when it is replayed
        editor.edit(request, progress=False)
    assert made == [[r.subject] for r in requests]


def _relation_anchor_editor(tiny, monkeypatch) -> tuple[ICELoRAEditor, list, list[list[str]], list]:
    """An editor with relation anchors and their replay; the earlier requests with a subject,
    each one's anchor rows made alone by the unedited model, and the list each call of
    ``relation_anchors`` appends its requests' prompts to from now on."""
    made: list[list[str]] = []
    make = anchor_module.relation_anchors
    monkeypatch.setattr(anchor_module, "relation_anchors",
                        lambda model, tokenizer, pad_id, requests: made.append([r.prompt for r in requests])
                        or make(model, tokenizer, pad_id, requests))
    editor = ICELoRAEditor(tiny, method="lora", layers=[0, 1, 2], max_steps=2, lambda_locality=1.0,
                           locality_anchor_kind="relation", replay_edits=2, replay_anchors=1)
    earlier = [r for r in EARLIER if r.subject]
    pad_id = build_plan(editor.tokenizer, earlier, editor.config).pad_id
    with torch.no_grad():
        alone = [make(editor.model, editor.tokenizer, pad_id, [r]).rows for r in earlier]
    return editor, earlier, made, alone


def test_relation_anchors_are_replayed_as_relation_anchors(tiny, monkeypatch):
    editor, earlier, made, before = _relation_anchor_editor(tiny, monkeypatch)
    plan = build_plan(editor.tokenizer, earlier, editor.config)
    for request in [*earlier, NEW]:  # each edit's own anchors, then the same rows when it is replayed
        editor.edit(request, progress=False)
    assert made == [[r.prompt] for r in [*earlier, NEW]]
    assert editor.replay_anchors(plan).rows == before  # made by the unedited model, once per edit


def test_kept_anchor_rows_are_each_requests_own_and_made_again_one_request_at_a_time(tiny, monkeypatch):
    """A joint edit of several requests keeps for each the rows it gets alone (one decode per
    request, whatever else shares the call); an editor that has lost them (a run resumed from its
    ledger) makes them again one request at a time, the same rows."""
    editor, earlier, made, alone = _relation_anchor_editor(tiny, monkeypatch)
    plan = build_plan(editor.tokenizer, earlier, editor.config)
    editor.edit(earlier, progress=False)  # one joint edit
    assert made == [[r.prompt] for r in earlier]
    assert editor.replay_anchors(plan).rows == alone
    editor._anchor_rows.clear()
    made.clear()
    assert editor.replay_anchors(plan).rows == alone
    assert made == [[r.prompt] for r in earlier]
