"""Editing objectives: what the editing loop minimises.

- ``ft``: mean cross-entropy of the target tokens after the prompt (no context).
- ``ft-last``: the target tokens scored at the last prompt position only (EasyEdit's FT-L).
- ``ice``: ``L_FT + lambda * L_ICE`` with ``L_ICE`` the mean over sampled completion tokens of
  ``KL(p(.|c, q, x*, x_c<t).detach() || q(.|q, x*, x_c<t))``.
- ``ice-reference``: the ICE reference implementation's terms, per context row
  ``-(log p(x*|c,q) + log q(x*|q)) + sum_t KL(p.detach() || q)``, summed over positions, averaged
  over rows.

Every objective also reports each request's own loss parts. With ``EditPlan.independent`` each
request is a separate edit (its own adapter, rows routed to it): the per-request losses are summed,
so each adapter's gradient is exactly the one it would get alone, and each request samples from its
own generator.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from icelora.anchors import AnchorTeacher, anchor_kl_from_logits, anchor_rows
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


@dataclass(frozen=True)
class RequestLoss:
    """One request's share of a step: its loss, target cross-entropy, ICE term, target learned."""

    loss: float
    ft: float
    ice: float
    learned: bool


@dataclass
class LossParts:
    """One step's loss and its parts. ``target_learned``: greedy teacher-forced target is right
    (for every request); ``per_request``: the same numbers for each request of the plan."""

    loss: torch.Tensor
    ft: float
    ice: float
    target_learned: bool
    per_request: list[RequestLoss] = field(default_factory=list)


@dataclass
class EditPlan:
    """Everything an objective needs about the requests, tokenized once per edit call."""

    tokenizer: PreTrainedTokenizerBase
    requests: list[EditRequest]
    encoded: list[PromptTarget]
    contexts: list[list[str]]
    pad_id: int
    eos_ids: set[int]
    independent: bool = False
    adapter_names: list[str] | None = None
    _cache: dict[tuple[str, str], PromptTarget] = field(default_factory=dict)

    def encode(self, prefix: str, target: str) -> PromptTarget:
        """``encode_prompt_target`` with a cache (the reference objective re-encodes rows per step)."""
        key = (prefix, target)
        if key not in self._cache:
            self._cache[key] = encode_prompt_target(self.tokenizer, prefix, target)
        return self._cache[key]

    def subset(self, keep: Sequence[int]) -> EditPlan:
        """The plan of the requests ``keep`` only (tokenization cache shared)."""
        names = None if self.adapter_names is None else [self.adapter_names[i] for i in keep]
        return replace(self, requests=[self.requests[i] for i in keep], encoded=[self.encoded[i] for i in keep],
                       contexts=[self.contexts[i] for i in keep], adapter_names=names, _cache=self._cache)

    def route(self, owners: Sequence[int]) -> dict[str, Any]:
        """Forward keyword arguments sending each row to its request's adapter (PEFT mixed batches)."""
        if self.adapter_names is None:
            return {}
        return {"adapter_names": [self.adapter_names[i] for i in owners]}

    def reduce(self, per_request: torch.Tensor) -> torch.Tensor:
        """Independent edits: the sum (each adapter gets its own gradient); one joint edit: the mean."""
        return per_request.sum() if self.independent else per_request.mean()


def build_plan(tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest], config: EditConfig,
               independent: bool = False, adapter_names: list[str] | None = None) -> EditPlan:
    """Tokenize the requests and choose their contexts.

    ``independent``: every request is its own edit, trained in the adapter ``adapter_names[i]``.
    """
    if adapter_names is not None and len(adapter_names) != len(requests):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(requests)} requests")
    eos = tokenizer.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
    encoded = [encode_prompt_target(tokenizer, r.prompt, r.target) for r in requests]
    contexts = [contexts_for(r, config.num_contexts, config.seed) for r in requests]
    return EditPlan(tokenizer=tokenizer, requests=requests, encoded=encoded, contexts=contexts,
                    pad_id=pad_id, eos_ids=eos_ids, independent=independent, adapter_names=adapter_names)


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


@dataclass
class Rider:
    """Extra rows (the locality anchors) carried through an objective's main forward pass, so they
    cost no pass of their own; ``logits`` is filled by that pass."""

    batch: PaddedBatch
    owners: list[int]
    logits: torch.Tensor | None = None


def _stack(first: PaddedBatch, second: PaddedBatch, pad_id: int) -> dict[str, torch.Tensor]:
    """Forward arguments of two right-padded batches as one (padded to the wider)."""
    width = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    return {"input_ids": torch.cat([widen(first.input_ids, pad_id), widen(second.input_ids, pad_id)]),
            "attention_mask": torch.cat([widen(first.attention_mask, 0), widen(second.attention_mask, 0)]),
            "position_ids": torch.cat([widen(first.position_ids, 0), widen(second.position_ids, 0)])}


def _forward(model: nn.Module, batch: PaddedBatch, plan: EditPlan, owners: Sequence[int],
             rider: Rider | None = None) -> torch.Tensor:
    """Logits of ``batch`` (each row routed to its owner's adapter); ``rider`` rows ride along."""
    if rider is None:
        return model(**batch.forward_kwargs(), **plan.route(owners)).logits
    logits = model(**_stack(batch, rider.batch, plan.pad_id), **plan.route([*owners, *rider.owners])).logits
    rows, width = batch.input_ids.shape
    rider.logits = logits[rows:]
    return logits[:rows, :width]


def wrong_per_request(pred: torch.Tensor, labels: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """Number of target tokens each request's greedy teacher-forced prediction gets wrong."""
    wrong = (pred.argmax(-1) != labels).float()
    return torch.zeros(n, device=wrong.device).index_add(0, owners, wrong)


def combine(plan: EditPlan, per_request: torch.Tensor, ft: torch.Tensor, ice: torch.Tensor | None,
            wrong: torch.Tensor) -> LossParts:
    """``LossParts`` from per-request losses, target terms ``ft``, ICE terms and wrong-token counts.

    One host transfer for all the reported numbers.
    """
    ice = torch.zeros_like(ft) if ice is None else ice
    numbers = torch.stack([ft.detach(), ice.detach(), per_request.detach(), wrong.detach().float()]).tolist()
    requests = [RequestLoss(loss=total, ft=f, ice=i, learned=w == 0) for f, i, total, w in zip(*numbers)]
    return LossParts(loss=plan.reduce(per_request), ft=sum(numbers[0]) / len(requests),
                     ice=sum(numbers[1]) / len(requests), target_learned=all(r.learned for r in requests),
                     per_request=requests)


def ft_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int, rider: Rider | None = None
            ) -> LossParts:
    """Mean target-token cross-entropy per request, averaged over requests."""
    device = next(model.parameters()).device
    n = len(plan.encoded)
    batch = pad_rows([e.ids for e in plan.encoded], plan.pad_id, device=device)
    logits = _forward(model, batch, plan, range(n), rider)
    pred, labels, rows = next_token_view(logits, batch, target_mask(batch, plan.encoded))
    nll = F.cross_entropy(pred.float(), labels, reduction="none")
    ft = per_group_mean(nll, rows, n)
    return combine(plan, ft, ft, None, wrong_per_request(pred, labels, rows, n))


def ft_last_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int, rider: Rider | None = None
                 ) -> LossParts:
    """Target tokens scored at the last prompt position: mean_j -log p(x*_j | q) (EasyEdit's FT-L)."""
    device = next(model.parameters()).device
    prompts = [e.prompt_ids for e in plan.encoded]
    batch = pad_rows(prompts, plan.pad_id, device=device)
    logits = _forward(model, batch, plan, range(len(prompts)), rider)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    log_probs = F.log_softmax(logits[torch.arange(len(prompts), device=device), last].float(), dim=-1)
    ft = torch.stack([-log_probs[i, list(e.target_ids)].mean() for i, e in enumerate(plan.encoded)])
    first = torch.tensor([e.target_ids[0] for e in plan.encoded], device=device)
    wrong = (log_probs.argmax(-1) != first).float()
    return combine(plan, ft, ft, None, wrong)


def _sample_for_rows(model: nn.Module, plan: EditPlan, rows: list[PromptTarget], owners: list[int],
                     config: EditConfig, generators: Sequence[torch.Generator]) -> Completions:
    """Sample completions; independent requests each draw from their own generator."""
    return sample_completions(model, [r.ids for r in rows], plan.pad_id, config.completion_length,
                              config.temperature, list(generators), plan.eos_ids,
                              row_groups=owners if plan.independent else None,
                              forward_kwargs=plan.route(owners))


def _student_rows(plan: EditPlan, owners: list[int], completions: Completions) -> list[tuple[int, ...]]:
    tokens = completions.tokens.tolist()
    return [plan.encoded[i].ids + tuple(tokens[r]) for r, i in enumerate(owners)]


def _as_list(items: Any) -> list[Any]:
    return list(items) if isinstance(items, (list, tuple)) else [items]


def ice_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int,
             generators: torch.Generator | Sequence[torch.Generator], rider: Rider | None = None) -> LossParts:
    """The clean ICE-LoRA objective ``L_FT + lambda * L_ICE`` (ICE-ALGORITHM.md).

    ``generators``: one for all rows, or (independent plans) one per request.
    """
    device = next(model.parameters()).device
    owners, context_rows = [], []
    for i, request in enumerate(plan.requests):
        for context in plan.contexts[i]:
            prefix = config.context_template.format(context=context, prompt=request.prompt)
            row = plan.encode(prefix, request.target)
            for _ in range(config.samples_per_context):
                owners.append(i)
                context_rows.append(row)
    completions = _sample_for_rows(model, plan, context_rows, owners, config, _as_list(generators))

    student = pad_rows(_student_rows(plan, owners, completions), plan.pad_id, device=device)
    owned = [plan.encoded[i] for i in owners]
    logits = _forward(model, student, plan, owners, rider)
    owner_ids = torch.tensor(owners, device=device)
    n = len(plan.requests)

    pred, labels, rows = next_token_view(logits, student, target_mask(student, owned))
    nll = F.cross_entropy(pred.float(), labels, reduction="none")
    ft = per_group_mean(nll, owner_ids[rows], n)

    comp_pred, _, comp_rows = next_token_view(logits, student, completion_mask(student, owned, completions.alive))
    teacher = completions.teacher_logits.to(device)[completions.alive.to(device)]
    kl = kl_divergence(teacher, comp_pred)
    ice = per_group_mean(kl, owner_ids[comp_rows], n)
    return combine(plan, ft + config.lambda_ice * ice, ft, ice, wrong_per_request(pred, labels, owner_ids[rows], n))


def reference_context_prefix(request: EditRequest, context: str | None, prefix: str) -> str:
    """The reference code's context row before the target: ``prefix + c + " Now: " + q``.

    Without a context the reference uses the fact itself, ``q + x* + ". "``.
    """
    context = context if context is not None else f"{request.prompt} {request.target}."
    return f"{prefix}{context} Now: {request.prompt}"


def ice_reference_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int,
                       generators: torch.Generator | Sequence[torch.Generator],
                       rngs: random.Random | Sequence[random.Random], rider: Rider | None = None) -> LossParts:
    """The ICE reference loss terms, summed over positions and averaged over context rows.

    ``rngs`` draw the instruction prefixes: one for all rows, or (independent plans) one per request.
    """
    device = next(model.parameters()).device
    rngs = _as_list(rngs)
    owners, context_rows = [], []
    for i, request in enumerate(plan.requests):
        contexts: list[str | None] = list(request.contexts[: config.num_contexts]) or [None]
        rng = rngs[i] if plan.independent else rngs[0]
        for context in contexts:
            prefix = reference_context_prefix(request, context, rng.choice(REFERENCE_PREFIXES))
            owners.append(i)
            context_rows.append(plan.encode(prefix, request.target))
    completions = _sample_for_rows(model, plan, context_rows, owners, config, _as_list(generators))
    tokens = completions.tokens.tolist()
    n_rows = len(owners)

    with_ctx = pad_rows([r.ids + tuple(tokens[k]) for k, r in enumerate(context_rows)], plan.pad_id, device=device)
    student = pad_rows(_student_rows(plan, owners, completions), plan.pad_id, device=device)
    owned = [plan.encoded[i] for i in owners]
    ctx_logits = _forward(model, with_ctx, plan, owners)
    logits = _forward(model, student, plan, owners, rider)

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

    owner_ids = torch.tensor(owners, device=device)
    n = len(plan.requests)
    loss = per_group_mean(target_term + kl_term, owner_ids, n)
    ft = per_group_mean(zeros.index_add(0, rows, nll), owner_ids, n)  # no-context target term per row
    ice = per_group_mean(kl_term, owner_ids, n)
    return combine(plan, loss, ft, ice, wrong_per_request(pred, labels, owner_ids[rows], n))


def with_locality(parts: LossParts, plan: EditPlan, kl: torch.Tensor, weight: float) -> LossParts:
    """Add ``weight * kl`` to every request's loss: ``kl`` holds one value per request of an
    independent plan, or a single value shared by all requests of a joint one."""
    n = len(plan.requests)
    per_request = kl if plan.independent else kl.expand(n)
    extra = (weight * per_request).detach().tolist()
    requests = [replace(r, loss=r.loss + e) for r, e in zip(parts.per_request, extra)]
    return replace(parts, loss=parts.loss + weight * plan.reduce(per_request), per_request=requests)


class Objective:
    """An objective bound to one edit call: call it once per step to get that step's loss.

    Each step's randomness depends on (seed, step) only, so a resumed run repeats it exactly; in an
    independent plan every request has its own generator with that seed, so an edit trained beside
    others draws what it would draw alone. ``anchors`` (needed when ``lambda_locality > 0``): the
    pre-edit model's distributions on the locality anchors (:mod:`icelora.anchors`).
    """

    def __init__(self, plan: EditPlan, config: EditConfig, device: torch.device,
                 anchors: AnchorTeacher | None = None) -> None:
        if config.lambda_locality and anchors is None:
            raise ValueError("lambda_locality > 0 needs the anchors' pre-edit distributions")
        self.plan = plan
        self.config = config
        self.anchors = anchors
        streams = len(plan.requests) if plan.independent else 1
        self.generators = [torch.Generator(device=device) for _ in range(streams)]
        self.rngs = [random.Random() for _ in range(streams)]

    def __call__(self, model: nn.Module, step: int, active: Sequence[int] | None = None) -> LossParts:
        """The loss of step ``step``; ``active`` restricts an independent plan to those requests."""
        step_seed = self.config.seed * 1_000_003 + step
        for generator, rng in zip(self.generators, self.rngs):
            generator.manual_seed(step_seed)
            rng.seed(step_seed)
        plan, generators, rngs = self.plan, self.generators, self.rngs
        if active is not None:
            if not plan.independent:
                raise ValueError("only an independent plan can run a subset of its requests")
            plan = plan.subset(active)
            generators, rngs = [generators[i] for i in active], [rngs[i] for i in active]
        if not self.config.lambda_locality:
            return self.objective_parts(model, plan, step, generators, rngs, None)
        # the anchors ride along in the objective's main pass: one copy per independent edit
        owners = len(plan.requests) if plan.independent else 1
        chosen = self.anchors.choose(self.config.locality_anchors, self.config.seed, step)
        device = next(model.parameters()).device
        rider = Rider(batch=pad_rows(anchor_rows(self.anchors, chosen, owners), plan.pad_id, device=device),
                      owners=[k for k in range(owners) for _ in chosen])
        parts = self.objective_parts(model, plan, step, generators, rngs, rider)
        kl = anchor_kl_from_logits(self.anchors, chosen, owners, rider.logits)
        return with_locality(parts, plan, kl, self.config.lambda_locality)

    def objective_parts(self, model: nn.Module, plan: EditPlan, step: int, generators: list[torch.Generator],
                        rngs: list[random.Random], rider: Rider | None) -> LossParts:
        name = self.config.objective
        if name == "ft":
            return ft_loss(model, plan, self.config, step, rider)
        if name == "ft-last":
            return ft_last_loss(model, plan, self.config, step, rider)
        if name == "ice":
            return ice_loss(model, plan, self.config, step, generators, rider)
        if name == "ice-reference":
            return ice_reference_loss(model, plan, self.config, step, generators, rngs, rider)
        raise ValueError(f"unknown objective {name!r}")


class CyclingObjective:
    """Minibatch training: step ``s`` uses the objective of minibatch ``s mod n`` (one epoch = n steps)."""

    def __init__(self, objectives: list[Objective]) -> None:
        if not objectives:
            raise ValueError("no minibatch to train on")
        self.objectives = objectives

    def __call__(self, model: nn.Module, step: int) -> LossParts:
        return self.objectives[step % len(self.objectives)](model, step)
