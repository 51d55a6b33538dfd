"""The objectives against hand-computed values on tiny GPT-2 and Llama models."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from icelora.config import EditConfig
from icelora.losses import (
    REFERENCE_PREFIXES,
    Objective,
    _draw,
    build_plan,
    completion_mask,
    contexts_at_step,
    ice_layout,
    ice_loss,
    ice_reference_loss,
    kept_group_mean,
    kl_divergence,
    per_group_mean,
    reference_context_prefix,
)
from icelora.request import EditRequest
from icelora.sampling import sample_completions, sample_from_batch
from icelora.tokenization import encode_prompt_target, pad_rows
from tests.conftest import tiny_gpt2, tiny_llama

REQUEST = EditRequest(prompt="The Eiffel Tower is located in the city of", target="Rome",
                      subject="The Eiffel Tower",
                      contexts=("The Eiffel Tower is in Rome.", "Rome is home to the Eiffel Tower."))


def test_kl_matches_hand_computation():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108...
    got = kl_divergence(p.log()[None], q.log()[None])
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # logits are normalised: shifting them changes nothing; KL(p||p) = 0
    assert kl_divergence(p.log()[None] + 3.0, q.log()[None] - 1.0).item() == pytest.approx(expected, abs=1e-6)
    assert kl_divergence(p.log()[None], p.log()[None]).item() == pytest.approx(0.0, abs=1e-7)


def test_per_group_mean():
    values = torch.tensor([1.0, 3.0, 10.0])
    assert per_group_mean(values, torch.tensor([0, 0, 2]), 3).tolist() == [2.0, 0.0, 10.0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_completion_mask_selects_exactly_the_live_completion_tokens(tokenizers_by_kind, side):
    tok = tokenizers_by_kind["llama"]
    encs = [encode_prompt_target(tok, "The city of", "Rome"), encode_prompt_target(tok, "Q:", "Paris is")]
    completion = torch.tensor([[7, 8, 9], [10, 2, 11]])
    alive = torch.tensor([[True, True, True], [True, False, False]])
    rows = [e.ids + tuple(c) for e, c in zip(encs, completion.tolist())]
    batch = pad_rows(rows, tok.pad_token_id, side=side)
    mask = completion_mask(batch, encs, alive)
    assert batch.input_ids[mask].tolist() == [7, 8, 9, 10]


def _config(**kw) -> EditConfig:
    return EditConfig(**{"num_contexts": 2, "completion_length": 3, "seed": 3, **kw})


def test_lambda_zero_is_plain_cross_entropy(tiny):
    plan = build_plan(tiny.tokenizer, [REQUEST], _config())
    ft = Objective(plan, _config(objective="ft"), torch.device("cpu"))(tiny.model, 0)
    ice0 = Objective(plan, _config(objective="ice", lambda_ice=0.0), torch.device("cpu"))(tiny.model, 0)
    ice = Objective(plan, _config(objective="ice", lambda_ice=0.7), torch.device("cpu"))(tiny.model, 0)
    manual = -F.log_softmax(tiny.model(torch.tensor([plan.encoded[0].ids])).logits[0], -1)
    enc = plan.encoded[0]
    manual_ce = torch.stack([manual[p - 1, enc.ids[p]] for p in range(enc.target_start, len(enc.ids))]).mean()
    assert ft.loss.item() == pytest.approx(manual_ce.item(), rel=1e-5)
    assert ice0.loss.item() == pytest.approx(ft.loss.item(), rel=1e-5)
    assert ice.ft == pytest.approx(ft.loss.item(), rel=1e-5)
    assert ice.ice > 0
    assert ice.loss.item() == pytest.approx(ice.ft + 0.7 * ice.ice, rel=1e-5)


def test_cached_decode_teacher_equals_a_full_forward(tiny):
    tok = tiny.tokenizer
    rows = [encode_prompt_target(tok, "Fact: Rome. The city of", "Rome").ids,
            encode_prompt_target(tok, "Q:", "Rome").ids]
    gen = torch.Generator().manual_seed(0)
    comp = sample_completions(tiny.model, rows, tok.pad_token_id, 3, 1.0, gen, {tok.eos_token_id})
    for r, row in enumerate(rows):
        full = tiny.model(torch.tensor([list(row) + comp.tokens[r].tolist()])).logits[0]
        expected = full[len(row) - 1: len(row) + 2]
        torch.testing.assert_close(comp.teacher_logits[r], expected, atol=1e-4, rtol=1e-4)


def test_ice_term_matches_hand_computation(tiny):
    """L_ICE = mean over completion tokens of KL(p(.|c,q,x*,x_c<t) || q(.|q,x*,x_c<t))."""
    config = _config(objective="ice", lambda_ice=1.0, temperature=1.0)
    plan = build_plan(tiny.tokenizer, [REQUEST], config)
    parts = ice_loss(tiny.model, plan, config, 0, torch.Generator().manual_seed(11))

    gen = torch.Generator().manual_seed(11)
    tok, enc = tiny.tokenizer, plan.encoded[0]
    ctx_rows = [plan.encode(config.context_template.format(context=c, prompt=REQUEST.prompt), REQUEST.target)
                for c in REQUEST.contexts]
    comp = sample_completions(tiny.model, [r.ids for r in ctx_rows], tok.pad_token_id, 3, 1.0, gen,
                              {tok.eos_token_id})
    kls = []
    for r, ctx in enumerate(ctx_rows):
        x_c = comp.tokens[r].tolist()
        p = tiny.model(torch.tensor([list(ctx.ids) + x_c])).logits[0]
        q = tiny.model(torch.tensor([list(enc.ids) + x_c])).logits[0]
        for t in range(3):
            if comp.alive[r, t]:
                lp = F.log_softmax(p[len(ctx.ids) - 1 + t], -1)
                lq = F.log_softmax(q[len(enc.ids) - 1 + t], -1)
                kls.append((lp.exp() * (lp - lq)).sum())
    assert parts.ice == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4)


def test_contexts_take_turns_in_a_moving_window():
    contexts = ["a", "b", "c", "d", "e"]
    windows = [contexts_at_step(contexts, 2, step) for step in range(5)]
    assert windows == [["a", "b"], ["c", "d"], ["e", "a"], ["b", "c"], ["d", "e"]]
    assert all(sum(w.count(c) for w in windows) == 2 for c in contexts)  # every context equally often
    assert contexts_at_step(contexts, None, 7) == contexts
    assert contexts_at_step(contexts, 5, 7) == contexts
    assert contexts_at_step(["a", "b"], 3, 1) == ["a", "b"]


@pytest.mark.parametrize("step", [0, 1, 2])
def test_a_step_with_fewer_contexts_is_the_loss_of_those_contexts_alone(tiny, step):
    """contexts_per_step k: step s's ICE loss is the one of a request holding only its window."""
    three = EditRequest(prompt=REQUEST.prompt, target=REQUEST.target, subject=REQUEST.subject,
                        contexts=(*REQUEST.contexts, "Rome, Italy: the Eiffel Tower."))
    config = _config(objective="ice", num_contexts=3, contexts_per_step=1)
    plan = build_plan(tiny.tokenizer, [three], config)
    parts = ice_loss(tiny.model, plan, config, step, torch.Generator().manual_seed(5))

    alone = EditRequest(prompt=REQUEST.prompt, target=REQUEST.target, subject=REQUEST.subject,
                        contexts=(three.contexts[step],))
    full = _config(objective="ice", num_contexts=3)
    expected = ice_loss(tiny.model, build_plan(tiny.tokenizer, [alone], full), full, step,
                        torch.Generator().manual_seed(5))
    assert parts.ice == pytest.approx(expected.ice, rel=1e-5)
    assert parts.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    everything = ice_loss(tiny.model, plan, full, step, torch.Generator().manual_seed(5))
    assert parts.ice != pytest.approx(everything.ice, rel=1e-3)  # the window is not all the contexts


def test_reference_terms_match_hand_computation(tiny):
    """Per row: -(log p(x*|c) + log q(x*)) + sum_t KL(p || q), summed over positions, mean over rows."""
    config = _config(objective="ice-reference", temperature=100.0)
    plan = build_plan(tiny.tokenizer, [REQUEST], config)
    parts = ice_reference_loss(tiny.model, plan, config, 0, torch.Generator().manual_seed(5), random.Random(9))

    rng, gen = random.Random(9), torch.Generator().manual_seed(5)
    tok, enc = tiny.tokenizer, plan.encoded[0]
    ctx_rows = [plan.encode(reference_context_prefix(REQUEST, c, rng.choice(REFERENCE_PREFIXES)), REQUEST.target)
                for c in REQUEST.contexts]
    comp = sample_completions(tiny.model, [r.ids for r in ctx_rows], tok.pad_token_id, 3, 100.0, gen,
                              {tok.eos_token_id})
    row_losses = []
    for r, ctx in enumerate(ctx_rows):
        x_c = comp.tokens[r].tolist()
        lp = F.log_softmax(tiny.model(torch.tensor([list(ctx.ids) + x_c])).logits[0], -1)
        lq = F.log_softmax(tiny.model(torch.tensor([list(enc.ids) + x_c])).logits[0], -1)
        loss = 0.0
        for j in range(len(enc.target_ids)):
            loss -= lp[ctx.target_start - 1 + j, ctx.target_ids[j]] + lq[enc.target_start - 1 + j, enc.target_ids[j]]
        for t in range(3):
            if comp.alive[r, t]:
                a, b = lp[len(ctx.ids) - 1 + t], lq[len(enc.ids) - 1 + t]
                loss = loss + (a.exp() * (a - b)).sum()
        row_losses.append(loss)
    assert parts.loss.item() == pytest.approx(torch.stack(row_losses).mean().item(), rel=1e-4)


def test_reference_context_pass_is_trained_on_the_target(tiny):
    """The reference objective backpropagates through the with-context target term too."""
    config = _config(objective="ice-reference")
    plan = build_plan(tiny.tokenizer, [REQUEST], config)
    emb = tiny.model.get_input_embeddings().weight
    emb.requires_grad_(True)
    parts = ice_reference_loss(tiny.model, plan, config, 0, torch.Generator().manual_seed(0), random.Random(0))
    parts.loss.backward()
    context_only = set(plan.encode(reference_context_prefix(REQUEST, REQUEST.contexts[0], ""), "Rome").ids)
    context_only -= set(plan.encoded[0].ids)
    assert context_only, "the context must hold tokens the context-free row does not"
    assert any(emb.grad[t].abs().sum() > 0 for t in context_only)


def test_ft_last_scores_every_target_token_at_the_last_prompt_position(tiny):
    config = _config(objective="ft-last")
    request = EditRequest(prompt="Which family does Epaspidoceras belong to?", target="Noctuidae family")
    plan = build_plan(tiny.tokenizer, [request], config)
    enc = plan.encoded[0]
    parts = Objective(plan, config, torch.device("cpu"))(tiny.model, 0)
    logp = F.log_softmax(tiny.model(torch.tensor([list(enc.prompt_ids)])).logits[0, -1], -1)
    assert parts.loss.item() == pytest.approx(-logp[list(enc.target_ids)].mean().item(), rel=1e-5)


def test_kept_group_mean_leaves_out_dropped_values_even_when_not_finite():
    values = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 5.0])
    keep = torch.tensor([True, False, True, False, False])
    groups = torch.tensor([0, 0, 0, 1, 2])
    means = kept_group_mean(values, keep, groups, 4)
    assert means.tolist() == [2.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_samples_after_one_context_share_its_prefill(builder):
    """With several samples per context the prefill runs once per context and its cache is copied
    to the samples: the draws and teacher distributions are those of prefilling every copy."""
    tiny = builder()
    config = _config(objective="ice", samples_per_context=3, temperature=2.0)
    plan = build_plan(tiny.tokenizer, [REQUEST], config)
    layout = ice_layout(plan, config, torch.device("cpu"))
    assert layout.distinct.input_ids.shape[0] == 2 and layout.context.input_ids.shape[0] == 6
    shared = _draw(tiny.model, plan, config, layout, [torch.Generator().manual_seed(4)], graphs=False)
    every = sample_from_batch(tiny.model, layout.context, 3, 2.0, [torch.Generator().manual_seed(4)], plan.eos_ids)
    assert torch.equal(shared.tokens, every.tokens)
    assert torch.allclose(shared.teacher_logits, every.teacher_logits, atol=1e-5)
    assert not torch.equal(shared.tokens[0], shared.tokens[1])  # the copies draw apart
