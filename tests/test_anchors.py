"""The locality term: KL to the pre-edit model on unrelated anchor texts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icelora import EditConfig, ICELoRAEditor
from icelora.anchors import (
    ANCHOR_TEXTS,
    RELATION_TEMPLATES,
    SUBJECT_CONTINUATION,
    SUBJECT_RELATIONS,
    SUBJECT_TEMPLATES,
    AnchorTeacher,
    anchor_kl_from_logits,
    anchor_rows,
    anchor_teacher,
    anchor_teachers,
    greedy_teacher,
    relation_anchors,
    relations_apart_from,
    teacher_from_rows,
)
from icelora.errors import InvalidConfigError
from icelora.losses import Objective, build_plan
from icelora.request import EditRequest
from icelora.tokenization import pad_rows
from tests.conftest import moved_editor_and_plan, tiny_gpt2, tiny_llama

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
    teachers, picks = [teacher] * owners, [chosen] * owners
    batch = pad_rows(anchor_rows(teachers, picks), pad_id, device=device)
    logits = model(**batch.forward_kwargs(), **(forward_kwargs or {})).logits
    return anchor_kl_from_logits(teachers, picks, logits)


def _graph_names(tensor: torch.Tensor) -> set[str]:
    """Names of the autograd nodes ``tensor``'s backward runs through."""
    names, seen, todo = set(), set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [next_node for next_node, _ in node.next_functions]
    return names


@pytest.mark.parametrize("layout", ["positions", "rows"])
def test_anchor_kl_from_logits_is_each_anchors_mean_kl_averaged_per_owner(layout):
    """Two owners with 2 and 1 anchors, of 3, 2 and 4 positions: the value is the mean over each
    owner's anchors of the mean KL over their positions, and its gradient that of the same formula
    on slices; over [positions, V] logits every anchor comes out of one split (a slice per anchor
    would zero a gradient the size of all the logits for each)."""
    generator = torch.Generator().manual_seed(0)
    rows = [(1,) * 4, (2,) * 3, (3,) * 5]
    log_probs = [torch.randn(len(r) - 1, 7, generator=generator).log_softmax(-1) for r in rows]
    teachers = [AnchorTeacher(rows=rows[:2], log_probs=log_probs[:2]),
                AnchorTeacher(rows=rows[2:], log_probs=log_probs[2:])]
    chosen = [[0, 1], [0]]
    lengths = [3, 2, 4]
    if layout == "positions":
        logits = torch.randn(sum(lengths), 7, generator=generator, requires_grad=True)
        pieces = [logits[start: start + n] for start, n in zip([0, 3, 5], lengths)]
    else:
        logits = torch.randn(3, 5, 7, generator=generator, requires_grad=True)
        pieces = [logits[r, :n] for r, n in enumerate(lengths)]

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p.exp() * (p - q.log_softmax(-1))).sum(-1).mean()

    expected = torch.stack([(kl(log_probs[0], pieces[0]) + kl(log_probs[1], pieces[1])) / 2,
                            kl(log_probs[2], pieces[2])])
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    value = anchor_kl_from_logits(teachers, chosen, logits)
    assert torch.allclose(value, expected, atol=1e-6)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert torch.allclose(grad, expected_grad, atol=1e-7)
    if layout == "positions":
        names = _graph_names(anchor_kl_from_logits(teachers, chosen, logits))
        assert "SplitWithSizesBackward0" in names and "SliceBackward0" not in names
        with pytest.raises(ValueError, match="hold 10 positions, the chosen anchors 9"):
            anchor_kl_from_logits(teachers, chosen, torch.randn(10, 7))


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


SUBJECT_REQUESTS = [
    EditRequest(prompt="The Eiffel Tower is located in the city of", target="Rome", subject="The Eiffel Tower"),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", target="Italian", subject="Danielle Darrieux"),
    EditRequest(prompt="Which family does Epaspidoceras belong to?", target="Geometridae"),
]


def test_greedy_teacher_appends_the_models_argmax_tokens(tiny):
    pad = tiny.tokenizer.pad_token_id
    rows = [tuple(tiny.tokenizer(t)["input_ids"]) for t in ("The river flows", "A")]
    extended = greedy_teacher(tiny.model, rows, pad, 3, eos_id=None).rows
    for row, longer in zip(rows, extended):
        assert longer[: len(row)] == row and len(longer) == len(row) + 3
        with torch.no_grad():  # each added token is the argmax after the tokens before it
            logits = tiny.model(torch.tensor([longer])).logits[0]
        assert [int(logits[i].argmax()) for i in range(len(row) - 1, len(longer) - 1)] == list(longer[len(row):])
    stopped = greedy_teacher(tiny.model, rows, pad, 3, eos_id=extended[0][len(rows[0])]).rows
    assert stopped[0] == extended[0][: len(rows[0]) + 1]  # nothing after EOS


def extend_a_full_pass_at_a_time(model: nn.Module, rows: list[tuple[int, ...]], pad: int, tokens: int,
                                 eos_id: int | None) -> list[tuple[int, ...]]:
    """Reference greedy extension: every token from a full pass over the rows so far."""
    done = [False] * len(rows)
    for _ in range(tokens):
        with torch.no_grad():
            logits = model(**pad_rows(rows, pad).forward_kwargs()).logits
        picked = [int(logits[i, len(r) - 1].argmax()) for i, r in enumerate(rows)]
        rows = [r if d else (*r, t) for r, d, t in zip(rows, done, picked)]
        done = [d or t == eos_id for d, t in zip(done, picked)]
    return rows


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_greedy_teacher_equals_full_passes_then_a_teacher_pass(builder):
    """One cached decode gives the rows and the teacher's distributions on them: the same, up to
    rounding, as extending a full pass at a time and then a pass over the finished rows (rows of
    different lengths; one stopped by EOS)."""
    loaded = builder()
    loaded.model.double()
    pad = loaded.tokenizer.pad_token_id
    prompts = [tuple(loaded.tokenizer(t)["input_ids"]) for t in ("The river flows past", "A", "Who wrote the novel")]
    reference = extend_a_full_pass_at_a_time(loaded.model, prompts, pad, 3, eos_id=None)
    eos = reference[1][len(prompts[1]) + 1]          # the second row stops by its second token
    for eos_id in (None, eos):
        expected = extend_a_full_pass_at_a_time(loaded.model, prompts, pad, 3, eos_id)
        made = greedy_teacher(loaded.model, prompts, pad, 3, eos_id)
        assert made.rows == expected
        stopped = [len(r) < len(p) + 3 for r, p in zip(expected, prompts)]
        assert any(stopped) if eos_id is not None else not any(stopped)
        before = teacher_from_rows(loaded.model, expected, pad)
        for mine, theirs, row in zip(made.log_probs, before.log_probs, expected):
            assert mine.shape == theirs.shape == (len(row) - 1, theirs.shape[-1])
            assert torch.allclose(mine, theirs, atol=1e-9)
    assert greedy_teacher(loaded.model, [], pad, 3, None).rows == []
    no_tokens = greedy_teacher(loaded.model, prompts, pad, 0, None)
    assert no_tokens.rows == prompts and [len(lp) for lp in no_tokens.log_probs] == [len(p) - 1 for p in prompts]


def test_subject_anchors_are_about_each_requests_subject(tiny):
    pad = tiny.tokenizer.pad_token_id
    per_request = anchor_teachers(tiny.model, tiny.tokenizer, pad, "subject", SUBJECT_REQUESTS, independent=True)
    assert len(per_request) == 3
    for request, teacher in zip(SUBJECT_REQUESTS[:2], per_request):
        assert len(teacher.rows) == len(SUBJECT_TEMPLATES)
        for template, row in zip(SUBJECT_TEMPLATES, teacher.rows):
            prompt = tuple(tiny.tokenizer(template.format(subject=request.subject))["input_ids"])
            assert row[: len(prompt)] == prompt and len(row) <= len(prompt) + SUBJECT_CONTINUATION
        assert [lp.shape[0] for lp in teacher.log_probs] == [len(r) - 1 for r in teacher.rows]
    # no subject: the general anchors
    assert len(per_request[2].rows) == len(ANCHOR_TEXTS)
    joint = anchor_teachers(tiny.model, tiny.tokenizer, pad, "subject", SUBJECT_REQUESTS, independent=False)
    assert len(joint) == 1 and joint[0].rows == per_request[0].rows + per_request[1].rows
    general = anchor_teachers(tiny.model, tiny.tokenizer, pad, "general", SUBJECT_REQUESTS, independent=True)
    assert len(general) == 1 and len(general[0].rows) == len(ANCHOR_TEXTS)
    with pytest.raises(ValueError, match="anchor kind"):
        anchor_teachers(tiny.model, tiny.tokenizer, pad, "nearby", SUBJECT_REQUESTS, independent=True)


def test_subject_anchors_hold_the_subjects_other_continuations(tiny):
    """An edit with subject anchors moves the model's distributions on them less than one without."""
    settings = {"max_steps": 10, "learning_rate": 5e-2, "layers": [0, 1], "early_stopping": False,
                "locality_anchor_kind": "subject", "locality_anchors": len(SUBJECT_TEMPLATES)}
    request = SUBJECT_REQUESTS[1]
    moved = {}
    for weight in (0.0, 5.0):
        editor = ICELoRAEditor(tiny, method="lora", lambda_locality=weight, **settings)
        pad = editor.tokenizer.pad_token_id
        teacher = anchor_teachers(editor.model, editor.tokenizer, pad, "subject", [request], independent=False)[0]
        editor.edit(request, progress=False)
        with torch.no_grad():
            moved[weight] = anchor_kl(editor.model, teacher, list(range(len(teacher.rows))), pad, 1).item()
        editor.revert()
        editor.params.model.unload()
    assert moved[5.0] < 0.5 * moved[0.0]


def test_objective_rejects_anchor_sets_that_do_not_fit_the_plan(tiny):
    config = EditConfig(num_contexts=2, completion_length=2, lambda_locality=1.0)
    pad = tiny.tokenizer.pad_token_id
    sets = anchor_teachers(tiny.model, tiny.tokenizer, pad, "subject", SUBJECT_REQUESTS, independent=True)
    joint = build_plan(tiny.tokenizer, SUBJECT_REQUESTS, config)
    with pytest.raises(ValueError, match="independent plan"):
        Objective(joint, config, torch.device("cpu"), sets)
    with pytest.raises(InvalidConfigError, match="locality_anchor_kind"):
        EditConfig(locality_anchor_kind="nearby")


@pytest.mark.parametrize("independent", [False, True], ids=["joint", "independent"])
def test_anchors_in_their_own_pass_give_the_main_pass_loss(tiny, independent):
    """The anchor rows in a pass of their own (the CPU default with whole student rows) or riding
    in the main pass (the default otherwise): the same loss, up to rounding."""
    tiny.model.double()
    config = EditConfig(num_contexts=2, completion_length=2, seed=3, lambda_locality=2.0, locality_anchors=3,
                        locality_anchor_kind="subject")
    editor, plan = moved_editor_and_plan(tiny, config, SUBJECT_REQUESTS, independent)
    with editor.unedited():
        teachers = anchor_teachers(editor.model, editor.tokenizer, plan.pad_id, "subject", SUBJECT_REQUESTS,
                                   independent)
    results = {}
    for main_pass in (True, False):
        objective = Objective(plan, config, torch.device("cpu"), teachers)
        objective.main_pass_anchors = main_pass
        parts = objective(editor.model, 4)
        results[main_pass] = (parts.loss.item(), parts.numbers.clone())
    plain = Objective(plan, config.replace(lambda_locality=0.0), torch.device("cpu"))(editor.model, 4).loss.item()
    assert results[True][0] - plain > 1e-4  # the term is there
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-9)
    assert torch.allclose(results[True][1], results[False][1], rtol=1e-9, atol=1e-12)
    defaults = Objective(plan, config, torch.device("cpu"), [AnchorTeacher([], [])])
    assert defaults.anchors_in_main_pass(torch.device("cpu")) is True  # in the prefix pass
    defaults.shared_prefix = False  # whole student rows: their own pass on the CPU
    assert defaults.anchors_in_main_pass(torch.device("cpu")) is False
    assert defaults.anchors_in_main_pass(torch.device("cuda")) is True


def test_relation_anchors_ask_the_subjects_other_relations(tiny):
    kept = relations_apart_from("What is the country of citizenship of Danielle Darrieux?")
    assert "country of citizenship" not in kept and "country" not in kept and "occupation" in kept
    assert relations_apart_from("Who fathered Gervase of Blois?") == list(SUBJECT_RELATIONS)
    request = EditRequest(prompt="Which family does Epaspidoceras belong to?", target="Noctuidae",
                          subject="Epaspidoceras")
    rows = relation_anchors(tiny.model, tiny.tokenizer, tiny.tokenizer.pad_token_id, [request]).rows
    relations = relations_apart_from(request.prompt)
    assert "family name" not in relations
    assert len(rows) == len(relations) * len(RELATION_TEMPLATES)
    first = tiny.tokenizer(RELATION_TEMPLATES[0].format(relation=relations[0], subject="Epaspidoceras"))["input_ids"]
    assert rows[0][: len(first)] == tuple(first) and len(rows[0]) <= len(first) + SUBJECT_CONTINUATION
    config = EditConfig(lambda_locality=1.0, locality_anchor_kind="relation")
    teachers = anchor_teachers(tiny.model, tiny.tokenizer, tiny.tokenizer.pad_token_id, config.locality_anchor_kind,
                               [request], independent=False)
    assert teachers[0].rows == rows


@pytest.mark.parametrize("kind", ["relation", "subject"])
def test_independent_anchors_come_from_one_batched_pass(tiny, kind, monkeypatch):
    """An independent plan's anchors: one greedy decode for all its requests (not one per request),
    each request's set the rows it gets alone and their distributions up to rounding; a request
    without a subject, or whose prompt names every relation, gets the general anchors."""
    import icelora.anchors as anchor_module

    pad = tiny.tokenizer.pad_token_id
    every = " ".join(SUBJECT_RELATIONS) + " of Epaspidoceras?"
    requests = [*SUBJECT_REQUESTS, EditRequest(prompt=every, target="Noctuidae", subject="Epaspidoceras")]
    alone = [anchor_teachers(tiny.model, tiny.tokenizer, pad, kind, [r], independent=True)[0] for r in requests]
    calls = []
    greedy = anchor_module.greedy_teacher
    monkeypatch.setattr(anchor_module, "greedy_teacher",
                        lambda model, prompts, *args: calls.append(len(prompts)) or greedy(model, prompts, *args))
    each = anchor_teachers(tiny.model, tiny.tokenizer, pad, kind, requests, independent=True)
    assert calls == [sum(len(t.rows) for t in alone[:2]) + (len(alone[3].rows) if kind == "subject" else 0)]
    assert len(each) == len(requests)
    general = anchor_teacher(tiny.model, tiny.tokenizer, pad).rows
    assert each[2].rows == general and (each[3].rows == general) == (kind == "relation")
    for mine, theirs in zip(each, alone):
        assert mine.rows == theirs.rows
        for a, b in zip(mine.log_probs, theirs.log_probs):
            assert torch.allclose(a, b, atol=1e-5)


def test_a_prompt_naming_every_relation_gets_the_general_anchors(tiny):
    prompt = " ".join(SUBJECT_RELATIONS) + " of Epaspidoceras?"
    assert relations_apart_from(prompt) == []
    request = EditRequest(prompt=prompt, target="Noctuidae", subject="Epaspidoceras")
    pad = tiny.tokenizer.pad_token_id
    teachers = anchor_teachers(tiny.model, tiny.tokenizer, pad, "relation", [request], independent=True)
    assert teachers[0].rows == anchor_teacher(tiny.model, tiny.tokenizer, pad).rows
