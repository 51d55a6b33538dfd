"""Editing objectives: what the editing loop minimises.

- ``ft``: mean cross-entropy of the target tokens after the prompt (no context).
- ``ft-last``: the target tokens scored at the last prompt position only (EasyEdit's FT-L).
- ``ice``: ``L_FT + lambda * L_ICE`` with ``L_ICE`` the mean over sampled completion tokens of
  ``KL(p(.|c, q, x*, x_c<t).detach() || q(.|q, x*, x_c<t))``.
- ``ice-reference``: the ICE reference implementation's terms, per context row
  ``-(log p(x*|c,q) + log q(x*|q)) + sum_t KL(p.detach() || q)``, summed over positions, averaged
  over rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from icelora.config import EditConfig
from icelora.data_utils.templates import contexts_for
from icelora.request import EditRequest
from icelora.sampling import Completions, sample_completions
from icelora.tokenization import PaddedBatch, PromptTarget, encode_prompt_target, next_token_view, pad_rows

#: Instruction prefixes the ICE reference code draws from for every context row.
REFERENCE_PREFIXES = (
    "",
    "Fact: A new knowledge: Consider this new knowledge: ",  # three strings joined by missing commas
    "Remember this fact: ",
    "Remember this new fact and reason about its consequences: ",
)


@dataclass
class LossParts:
    """One step's loss and its parts. ``target_learned``: greedy teacher-forced target is right."""

    loss: torch.Tensor
    ft: float
    ice: float
    target_learned: bool


@dataclass
class EditPlan:
    """Everything an objective needs about the requests, tokenized once per edit call."""

    tokenizer: PreTrainedTokenizerBase
    requests: list[EditRequest]
    encoded: list[PromptTarget]
    contexts: list[list[str]]
    pad_id: int
    eos_ids: set[int]
    _cache: dict[tuple[str, str], PromptTarget] = field(default_factory=dict)

    def encode(self, prefix: str, target: str) -> PromptTarget:
        """``encode_prompt_target`` with a cache (the reference objective re-encodes rows per step)."""
        key = (prefix, target)
        if key not in self._cache:
            self._cache[key] = encode_prompt_target(self.tokenizer, prefix, target)
        return self._cache[key]


def build_plan(tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest], config: EditConfig) -> EditPlan:
    """Tokenize the requests and choose their contexts."""
    eos = tokenizer.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
    encoded = [encode_prompt_target(tokenizer, r.prompt, r.target) for r in requests]
    contexts = [contexts_for(r, config.num_contexts, config.seed) for r in requests]
    return EditPlan(tokenizer=tokenizer, requests=requests, encoded=encoded, contexts=contexts,
                    pad_id=pad_id, eos_ids=eos_ids)


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per position, summed over the vocabulary; p = softmax(teacher), q = softmax(student)."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def per_group_mean(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of ``values`` within each group id; groups with no value get 0."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(
        0, groups, torch.ones_like(values))
    return sums / counts.clamp(min=1)


def target_mask(batch: PaddedBatch, encoded: list[PromptTarget]) -> torch.Tensor:
    """Mask of the target tokens of rows that begin with ``encoded[i]``."""
    return batch.span_mask([(e.target_start, len(e.ids)) for e in encoded])


def completion_mask(batch: PaddedBatch, encoded: list[PromptTarget], alive: torch.Tensor) -> torch.Tensor:
    """Mask of the completion tokens (before EOS) appended after ``encoded[i]`` in row i."""
    length = alive.shape[1]
    mask = batch.span_mask([(len(e.ids), len(e.ids) + length) for e in encoded])
    mask[mask.clone()] = alive.to(mask.device).reshape(-1)
    return mask


def _forward(model: nn.Module, batch: PaddedBatch) -> torch.Tensor:
    return model(**batch.forward_kwargs()).logits


def ft_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int) -> LossParts:
    """Mean target-token cross-entropy per request, averaged over requests."""
    device = next(model.parameters()).device
    batch = pad_rows([e.ids for e in plan.encoded], plan.pad_id, device=device)
    logits = _forward(model, batch)
    pred, labels, rows = next_token_view(logits, batch, target_mask(batch, plan.encoded))
    nll = F.cross_entropy(pred.float(), labels, reduction="none")
    loss = per_group_mean(nll, rows, len(plan.encoded)).mean()
    learned = bool((pred.argmax(-1) == labels).all())
    return LossParts(loss=loss, ft=loss.item(), ice=0.0, target_learned=learned)


def ft_last_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int) -> LossParts:
    """Target tokens scored at the last prompt position: mean_j -log p(x*_j | q) (EasyEdit's FT-L)."""
    device = next(model.parameters()).device
    prompts = [e.prompt_ids for e in plan.encoded]
    batch = pad_rows(prompts, plan.pad_id, device=device)
    logits = _forward(model, batch)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    log_probs = F.log_softmax(logits[torch.arange(len(prompts), device=device), last].float(), dim=-1)
    losses = [-log_probs[i, list(e.target_ids)].mean() for i, e in enumerate(plan.encoded)]
    loss = torch.stack(losses).mean()
    learned = all(int(log_probs[i].argmax()) == e.target_ids[0] for i, e in enumerate(plan.encoded))
    return LossParts(loss=loss, ft=loss.item(), ice=0.0, target_learned=learned)


def _sample_for_rows(model: nn.Module, plan: EditPlan, rows: list[PromptTarget], config: EditConfig,
                     generator: torch.Generator) -> Completions:
    return sample_completions(model, [r.ids for r in rows], plan.pad_id, config.completion_length,
                              config.temperature, generator, plan.eos_ids)


def _student_rows(plan: EditPlan, owners: list[int], completions: Completions) -> list[tuple[int, ...]]:
    tokens = completions.tokens.tolist()
    return [plan.encoded[i].ids + tuple(tokens[r]) for r, i in enumerate(owners)]


def ice_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int,
             generator: torch.Generator) -> LossParts:
    """The clean ICE-LoRA objective ``L_FT + lambda * L_ICE`` (ICE-ALGORITHM.md)."""
    device = next(model.parameters()).device
    owners, context_rows = [], []
    for i, request in enumerate(plan.requests):
        for context in plan.contexts[i]:
            prefix = config.context_template.format(context=context, prompt=request.prompt)
            row = plan.encode(prefix, request.target)
            for _ in range(config.samples_per_context):
                owners.append(i)
                context_rows.append(row)
    completions = _sample_for_rows(model, plan, context_rows, config, generator)

    student = pad_rows(_student_rows(plan, owners, completions), plan.pad_id, device=device)
    owned = [plan.encoded[i] for i in owners]
    logits = _forward(model, student)
    owner_ids = torch.tensor(owners, device=device)
    n = len(plan.requests)

    pred, labels, rows = next_token_view(logits, student, target_mask(student, owned))
    nll = F.cross_entropy(pred.float(), labels, reduction="none")
    loss_ft = per_group_mean(nll, owner_ids[rows], n).mean()

    comp_pred, _, comp_rows = next_token_view(logits, student, completion_mask(student, owned, completions.alive))
    teacher = completions.teacher_logits.to(device)[completions.alive.to(device)]
    kl = kl_divergence(teacher, comp_pred)
    loss_ice = per_group_mean(kl, owner_ids[comp_rows], n).mean() if kl.numel() else kl.sum()

    learned = bool((pred.argmax(-1) == labels).all())
    loss = loss_ft + config.lambda_ice * loss_ice
    return LossParts(loss=loss, ft=loss_ft.item(), ice=loss_ice.item(), target_learned=learned)


def reference_context_prefix(request: EditRequest, context: str | None, prefix: str) -> str:
    """The reference code's context row before the target: ``prefix + c + " Now: " + q``.

    Without a context the reference uses the fact itself, ``q + x* + ". "``.
    """
    context = context if context is not None else f"{request.prompt} {request.target}."
    return f"{prefix}{context} Now: {request.prompt}"


def ice_reference_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int,
                       generator: torch.Generator, rng: random.Random) -> LossParts:
    """The ICE reference loss terms, summed over positions and averaged over context rows."""
    device = next(model.parameters()).device
    owners, context_rows = [], []
    for i, request in enumerate(plan.requests):
        contexts: list[str | None] = list(request.contexts[: config.num_contexts]) or [None]
        for context in contexts:
            prefix = reference_context_prefix(request, context, rng.choice(REFERENCE_PREFIXES))
            owners.append(i)
            context_rows.append(plan.encode(prefix, request.target))
    completions = _sample_for_rows(model, plan, context_rows, config, generator)
    tokens = completions.tokens.tolist()
    n_rows = len(owners)

    with_ctx = pad_rows([r.ids + tuple(tokens[k]) for k, r in enumerate(context_rows)], plan.pad_id, device=device)
    student = pad_rows(_student_rows(plan, owners, completions), plan.pad_id, device=device)
    owned = [plan.encoded[i] for i in owners]
    ctx_logits = _forward(model, with_ctx)
    logits = _forward(model, student)

    ctx_pred, ctx_labels, ctx_rows = next_token_view(ctx_logits, with_ctx, target_mask(with_ctx, context_rows))
    pred, labels, rows = next_token_view(logits, student, target_mask(student, owned))
    nll_ctx = F.cross_entropy(ctx_pred.float(), ctx_labels, reduction="none")
    nll = F.cross_entropy(pred.float(), labels, reduction="none")
    zeros = torch.zeros(n_rows, device=device)
    target_term = zeros.index_add(0, ctx_rows, nll_ctx).index_add(0, rows, nll)

    alive = completions.alive
    teacher_pred, _, _ = next_token_view(ctx_logits, with_ctx, completion_mask(with_ctx, context_rows, alive))
    comp_pred, _, comp_rows = next_token_view(logits, student, completion_mask(student, owned, alive))
    kl = kl_divergence(teacher_pred.detach(), comp_pred)
    kl_term = zeros.index_add(0, comp_rows, kl)

    row_loss = target_term + kl_term
    owner_ids = torch.tensor(owners, device=device)
    loss = per_group_mean(row_loss, owner_ids, len(plan.requests)).mean()
    learned = bool((pred.argmax(-1) == labels).all())
    return LossParts(loss=loss, ft=nll.sum().item() / n_rows, ice=kl_term.mean().item(), target_learned=learned)


class Objective:
    """An objective bound to one edit call: call it once per step to get that step's loss."""

    def __init__(self, plan: EditPlan, config: EditConfig, device: torch.device) -> None:
        self.plan = plan
        self.config = config
        self.generator = torch.Generator(device=device)
        self.rng = random.Random()

    def __call__(self, model: nn.Module, step: int) -> LossParts:
        # Each step's randomness depends on (seed, step) only, so a resumed run repeats it exactly.
        step_seed = self.config.seed * 1_000_003 + step
        self.generator.manual_seed(step_seed)
        self.rng.seed(step_seed)
        name = self.config.objective
        if name == "ft":
            return ft_loss(model, self.plan, self.config, step)
        if name == "ft-last":
            return ft_last_loss(model, self.plan, self.config, step)
        if name == "ice":
            return ice_loss(model, self.plan, self.config, step, self.generator)
        if name == "ice-reference":
            return ice_reference_loss(model, self.plan, self.config, step, self.generator, self.rng)
        raise ValueError(f"unknown objective {name!r}")


class CyclingObjective:
    """Minibatch training: step ``s`` uses the objective of minibatch ``s mod n`` (one epoch = n steps)."""

    def __init__(self, objectives: list[Objective]) -> None:
        if not objectives:
            raise ValueError("no minibatch to train on")
        self.objectives = objectives

    def __call__(self, model: nn.Module, step: int) -> LossParts:
        return self.objectives[step % len(self.objectives)](model, step)
