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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from icelora.anchors import AnchorTeacher, anchor_kl_from_logits, anchor_rows, choose_each
from icelora.config import EditConfig
from icelora.data_utils.templates import contexts_for
from icelora.request import EditRequest
from icelora.sampling import Completions, DrawMemory, group_rows, sample_completions, sample_from_batch
from icelora.sampling_graphs import FixedShapeSampler, fixed_shape_supported
from icelora.shared_prefix import prefix_layout, shared_prefix_logits
from icelora.tokenization import (
    PaddedBatch,
    PromptTarget,
    TokenIndex,
    encode_prompt_target,
    next_token_view,
    pad_rows,
    span_index,
    to_device,
)
from icelora.training_graphs import FixedShapeForward

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


class LossParts:
    """One step's loss and its parts, per request of the plan.

    ``numbers`` [4, n] stays on the device (target cross-entropy, ICE term, loss and the number of
    target tokens predicted wrong, for each request); it is read on the host once, the first time a
    reported number is asked for, which the editing loop does after the step's update is queued.
    ``target_learned``: the greedy teacher-forced target is right for every request.
    """

    def __init__(self, loss: torch.Tensor, numbers: torch.Tensor, summed: bool = False) -> None:
        self.loss = loss
        self.numbers = numbers.detach()
        self.summed = summed
        self._requests: list[RequestLoss] | None = None

    @classmethod
    def of(cls, loss: torch.Tensor, requests: Sequence[RequestLoss], summed: bool = False) -> LossParts:
        """Parts from per-request numbers known on the host (for objectives written by hand)."""
        numbers = torch.tensor([[r.ft for r in requests], [r.ice for r in requests], [r.loss for r in requests],
                                [0.0 if r.learned else 1.0 for r in requests]], dtype=torch.float64)
        return cls(loss, numbers, summed)

    @property
    def total(self) -> float:
        """``loss`` as a number, from the same single read as the parts (the sum of the requests'
        losses for independent edits, their mean for one joint edit)."""
        losses = [r.loss for r in self.per_request]
        return sum(losses) if self.summed else sum(losses) / len(losses)

    @property
    def per_request(self) -> list[RequestLoss]:
        if self._requests is None:
            ft, ice, total, wrong = self.numbers.tolist()
            self._requests = [RequestLoss(loss=t, ft=f, ice=i, learned=w == 0)
                              for f, i, t, w in zip(ft, ice, total, wrong)]
        return self._requests

    @property
    def ft(self) -> float:
        return sum(r.ft for r in self.per_request) / len(self.per_request)

    @property
    def ice(self) -> float:
        return sum(r.ice for r in self.per_request) / len(self.per_request)

    @property
    def target_learned(self) -> bool:
        return all(r.learned for r in self.per_request)


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
    _cache: dict[tuple[str, str], PromptTarget] = field(default_factory=dict, repr=False, compare=False)
    _layouts: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    def encode(self, prefix: str, target: str) -> PromptTarget:
        """``encode_prompt_target`` with a cache (the reference objective re-encodes rows per step)."""
        key = (prefix, target)
        if key not in self._cache:
            self._cache[key] = encode_prompt_target(self.tokenizer, prefix, target)
        return self._cache[key]

    def layout(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The device tensors of a step's fixed structure (padded rows, token indices), built by
        ``build`` the first time ``key`` is seen and reused by every later step."""
        if key not in self._layouts:
            self._layouts[key] = build()
        return self._layouts[key]

    def subset(self, keep: Sequence[int]) -> EditPlan:
        """The plan of the requests ``keep`` only (tokenization cache shared)."""
        names = None if self.adapter_names is None else [self.adapter_names[i] for i in keep]
        return replace(self, requests=[self.requests[i] for i in keep], encoded=[self.encoded[i] for i in keep],
                       contexts=[self.contexts[i] for i in keep], adapter_names=names, _cache=self._cache,
                       _layouts=self._layouts)

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
    cost no pass of their own; ``logits`` is filled by that pass: [rows, width, V], or [positions, V]
    at each row's positions ``0..len - 2`` only (:func:`anchor_kl_from_logits` reads either).
    ``width``: the widest row the anchors of an edit can have; a fixed-shape pass
    (:mod:`icelora.training_graphs`) is padded to at least this width, so that its shape is the
    same at every step."""

    batch: PaddedBatch
    owners: list[int]
    logits: torch.Tensor | None = None
    width: int = 0


def _stack(first: PaddedBatch, second: PaddedBatch, pad_id: int, width: int = 0) -> dict[str, torch.Tensor]:
    """Forward arguments of two right-padded batches as one (padded to the wider, or ``width``)."""
    width = max(first.input_ids.shape[1], second.input_ids.shape[1], width)

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    return {"input_ids": torch.cat([widen(first.input_ids, pad_id), widen(second.input_ids, pad_id)]),
            "attention_mask": torch.cat([widen(first.attention_mask, 0), widen(second.attention_mask, 0)]),
            "position_ids": torch.cat([widen(first.position_ids, 0), widen(second.position_ids, 0)])}


def _forward(model: nn.Module, batch: PaddedBatch, plan: EditPlan, owners: Sequence[int],
             rider: Rider | None = None, fixed: FixedShapeForward | None = None) -> torch.Tensor:
    """Logits of ``batch`` (each row routed to its owner's adapter); ``rider`` rows ride along.
    ``fixed``: the pass runs there (unrouted rows; the rider padded to its ``width``)."""
    if rider is not None:
        owners = [*owners, *rider.owners]
    kwargs = batch.forward_kwargs() if rider is None else _stack(batch, rider.batch, plan.pad_id,
                                                                 rider.width if fixed is not None else 0)
    logits = fixed(model, **kwargs) if fixed is not None else model(**kwargs, **plan.route(owners)).logits
    if rider is None:
        return logits
    rows, width = batch.input_ids.shape
    rider.logits = logits[rows:]
    return logits[:rows, :width]


def wrong_per_request(pred: torch.Tensor, labels: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """Number of target tokens each request's greedy teacher-forced prediction gets wrong."""
    wrong = (pred.argmax(-1) != labels).float()
    return torch.zeros(n, device=wrong.device).index_add(0, owners, wrong)


def combine(plan: EditPlan, per_request: torch.Tensor, ft: torch.Tensor, ice: torch.Tensor | None,
            wrong: torch.Tensor) -> LossParts:
    """``LossParts`` from per-request losses, target terms ``ft``, ICE terms and wrong-token counts
    (all left on the device)."""
    ice = torch.zeros_like(ft) if ice is None else ice
    dtype = reported_dtype(ft.device)
    numbers = torch.stack([t.detach().to(dtype) for t in (ft, ice, per_request, wrong)])
    return LossParts(plan.reduce(per_request), numbers, summed=plan.independent)


def reported_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the reported numbers: float64, so that sums of them match the host's
    arithmetic; float32 on devices without float64 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def kept_group_mean(values: torch.Tensor, keep: torch.Tensor, groups: torch.Tensor, num_groups: int
                    ) -> torch.Tensor:
    """Mean of the ``values`` with ``keep`` True within each group id (the others count as absent,
    even when not finite); groups with none kept get 0. Fixed shapes: nothing waits on the device."""
    zeros = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    sums = zeros.index_add(0, groups, torch.where(keep, values, torch.zeros_like(values)))
    counts = zeros.index_add(0, groups, keep.to(values.dtype))
    return sums / counts.clamp(min=1)


@dataclass
class TargetLayout:
    """The fixed structure of the ``ft`` objective's pass: the prompt+target rows and their target tokens."""

    batch: PaddedBatch
    target: TokenIndex
    owner: torch.Tensor


def ft_layout(plan: EditPlan, device: torch.device) -> TargetLayout:
    """The padded rows ``q + x*`` of the plan's requests and where their target tokens sit; built
    once per plan and device (every step of an edit has the same shapes)."""
    rows = [e.ids for e in plan.encoded]
    key = ("ft", tuple(plan.encoded), plan.pad_id, str(device))

    def build() -> TargetLayout:
        batch = pad_rows(rows, plan.pad_id, device=device)
        target = span_index(batch, [(e.target_start, len(e.ids)) for e in plan.encoded], device)
        return TargetLayout(batch, target, target.rows)

    return plan.layout(key, build)


def ft_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int, rider: Rider | None = None
            ) -> LossParts:
    """Mean target-token cross-entropy per request, averaged over requests."""
    layout = ft_layout(plan, next(model.parameters()).device)
    n = len(plan.encoded)
    logits = _forward(model, layout.batch, plan, range(n), rider)
    pred, labels = layout.target.logits(logits), layout.target.labels(layout.batch.input_ids)
    nll = F.cross_entropy(pred.float(), labels, reduction="none")
    ft = per_group_mean(nll, layout.owner, n)
    return combine(plan, ft, ft, None, wrong_per_request(pred, labels, layout.owner, n))


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


@dataclass
class IceLayout:
    """The fixed structure of one ICE step, the same at every step of an edit (only the sampled
    tokens change): the context rows to sample after, the student rows ``q + x* + x_c`` with room
    for the completion, and where the target and completion tokens sit in them. With several
    samples per context, also each context row once (``distinct``, of requests
    ``distinct_owners``) and the distinct row each context row repeats (``expand``), so that the
    sampling prefill runs once per context."""

    owners: list[int]
    context: PaddedBatch
    groups: list[torch.Tensor] | None
    student: PaddedBatch
    target: TokenIndex
    target_owner: torch.Tensor
    completion: TokenIndex
    completion_owner: torch.Tensor
    distinct: PaddedBatch | None = None
    expand: torch.Tensor | None = None
    distinct_owners: list[int] | None = None
    usable: dict[int, bool] = field(default_factory=dict, repr=False, compare=False)
    samplers: dict[int, FixedShapeSampler] = field(default_factory=dict, repr=False, compare=False)
    forwards: dict[int, FixedShapeForward] = field(default_factory=dict, repr=False, compare=False)

    def graphs_usable(self, model: nn.Module, plan: EditPlan) -> bool:
        """Whether :func:`graphs_apply` allows CUDA graphs for ``model``'s passes (decided at the
        first step of the edit, kept for the rest)."""
        if id(model) not in self.usable:
            self.usable[id(model)] = graphs_apply(model, plan, self.owners, self.context.input_ids.device)
        return self.usable[id(model)]

    def sampler(self, model: nn.Module, plan: EditPlan, length: int) -> FixedShapeSampler | None:
        """The CUDA-graph sampler of ``model`` after the context rows (``None`` where graphs do not apply)."""
        if not self.graphs_usable(model, plan):
            return None
        if id(model) not in self.samplers:
            self.samplers[id(model)] = FixedShapeSampler(model, self.context, length, graphs=True)
        return self.samplers[id(model)]

    def training_pass(self, model: nn.Module, plan: EditPlan) -> FixedShapeForward | None:
        """The CUDA-graph training pass of ``model`` (``None`` where graphs do not apply)."""
        if not self.graphs_usable(model, plan):
            return None
        if id(model) not in self.forwards:
            self.forwards[id(model)] = FixedShapeForward(graphs=True)
        return self.forwards[id(model)]

    def student_with(self, tokens: torch.Tensor) -> PaddedBatch:
        """The student rows with the sampled completion ``tokens`` [R, m] in place (on the device)."""
        ids = self.student.input_ids.clone()
        ids[self.completion.rows, self.completion.positions] = tokens.reshape(-1)
        return replace(self.student, input_ids=ids)


def contexts_at_step(contexts: Sequence[str], per_step: int | None, step: int) -> list[str]:
    """The contexts step ``step`` samples after: all of them (``per_step`` None or at least their
    number), else the window of ``per_step`` that starts at ``step * per_step`` modulo their number."""
    n = len(contexts)
    if per_step is None or per_step >= n:
        return list(contexts)
    start = step * per_step % n
    return [contexts[(start + j) % n] for j in range(per_step)]


def ice_layout(plan: EditPlan, config: EditConfig, device: torch.device, step: int = 0) -> IceLayout:
    """The fixed structure of ICE step ``step``, built once per plan and choice of contexts
    (:func:`contexts_at_step`): the context rows ``c + q + x*`` (``samples_per_context`` per
    context, left-padded for sampling), the student rows ``q + x*`` with room for the ``m``
    completion tokens written in each step, and where the target and completion tokens sit in them."""
    owners, context_rows = [], []
    for i, request in enumerate(plan.requests):
        for context in contexts_at_step(plan.contexts[i], config.contexts_per_step, step):
            prefix = config.context_template.format(context=context, prompt=request.prompt)
            row = plan.encode(prefix, request.target)
            for _ in range(config.samples_per_context):
                owners.append(i)
                context_rows.append(row.ids)
    m = config.completion_length
    key = ("ice", tuple(owners), tuple(context_rows), tuple(plan.encoded), m, plan.independent, plan.pad_id,
           str(device))

    def build() -> IceLayout:
        context = pad_rows(context_rows, plan.pad_id, side="left", device=device)
        groups = group_rows(owners, len(plan.requests), device) if plan.independent else None
        owned = [plan.encoded[i] for i in owners]
        student = pad_rows([e.ids + (plan.pad_id,) * m for e in owned], plan.pad_id, device=device)
        target = span_index(student, [(e.target_start, len(e.ids)) for e in owned], device)
        completion = span_index(student, [(len(e.ids), len(e.ids) + m) for e in owned], device)
        owner_ids = to_device(torch.tensor(owners, dtype=torch.long), device)
        layout = IceLayout(owners, context, groups, student, target, owner_ids[target.rows], completion,
                           owner_ids[completion.rows])
        k = config.samples_per_context
        if k > 1:  # the copies of a context row are consecutive
            layout.distinct = pad_rows(context_rows[::k], plan.pad_id, side="left", device=device)
            layout.distinct_owners = owners[::k]
            layout.expand = to_device(torch.arange(len(owners), dtype=torch.long) // k, device)
        return layout

    return plan.layout(key, build)


def graphs_apply(model: nn.Module, plan: EditPlan, owners: Sequence[int], device: torch.device) -> bool:
    """Whether an ICE step's passes (sampling and training) can be replayed from CUDA graphs: on
    CUDA, outside autocast, rows not routed to separate adapters, and a model the fixed-shape
    passes can drive."""
    return (device.type == "cuda" and not torch.is_autocast_enabled(device.type) and not plan.route(owners)
            and fixed_shape_supported(model))


def ice_loss(model: nn.Module, plan: EditPlan, config: EditConfig, step: int,
             generators: torch.Generator | Sequence[torch.Generator], rider: Rider | None = None,
             graphs: bool = False, graphed_training: bool = False, shared_prefix: bool = False,
             memory: DrawMemory | None = None, requests: Sequence[int] | None = None) -> LossParts:
    """The clean ICE-LoRA objective ``L_FT + lambda * L_ICE`` (ICE-ALGORITHM.md).

    ``generators``: one for all rows, or (independent plans) one per request. Every shape is fixed
    by the layout, so the step is queued on the device without the host reading anything back.
    ``graphs``: replay the sampling passes from CUDA graphs where :func:`graphs_apply` allows
    (:mod:`icelora.sampling_graphs`); ``graphed_training``: the training pass too
    (:mod:`icelora.training_graphs`); ``shared_prefix``: the training pass encodes each request's
    ``q + x*`` once and continues its completions from the KV cache (:mod:`icelora.shared_prefix`),
    unless it is replayed from a graph. ``memory``: reuse an earlier step's draw while it is to be
    reused (``sample_every``), and keep a fresh one; ``requests``: the index of each of the plan's
    requests in the plan the memory was made for (default: the same plan).
    """
    device = next(model.parameters()).device
    recalled = None
    if memory is not None:
        requests = list(range(len(plan.requests))) if requests is None else list(requests)
        recalled = memory.recall(requests)
    if recalled is not None:
        drawn_at, completions = recalled
        layout = ice_layout(plan, config, device, drawn_at)
    else:
        layout = ice_layout(plan, config, device, step)
        completions = _draw(model, plan, config, layout, _as_list(generators), graphs)
        if memory is not None:
            memory.keep(step, [requests[i] for i in layout.owners], completions)
    fixed = layout.training_pass(model, plan) if graphed_training else None
    n = len(plan.requests)
    if shared_prefix and fixed is None:
        pred, labels, target_owner, completion_logits = _shared_prefix_pass(model, plan, config, layout,
                                                                            completions.tokens, rider)
    else:
        student = layout.student_with(completions.tokens)
        logits = _forward(model, student, plan, layout.owners, rider, fixed)
        pred, labels = layout.target.logits(logits), layout.target.labels(student.input_ids)
        target_owner, completion_logits = layout.target_owner, layout.completion.logits(logits)

    nll = F.cross_entropy(pred.float(), labels, reduction="none")
    ft = per_group_mean(nll, target_owner, n)

    teacher = completions.teacher_logits.reshape(-1, completions.teacher_logits.shape[-1])
    kl = kl_divergence(teacher, completion_logits)
    ice = kept_group_mean(kl, completions.alive.reshape(-1), layout.completion_owner, n)
    return combine(plan, ft + config.lambda_ice * ice, ft, ice, wrong_per_request(pred, labels, target_owner, n))


def _draw(model: nn.Module, plan: EditPlan, config: EditConfig, layout: IceLayout,
          generators: list[torch.Generator], graphs: bool) -> Completions:
    """Completions after the layout's context rows: from the CUDA-graph sampler where ``graphs``
    and :func:`graphs_apply` allow, else eagerly, each distinct context row prefilled once."""
    args = (config.completion_length, config.temperature, generators, plan.eos_ids, layout.groups,
            plan.route(layout.owners))
    sampler = layout.sampler(model, plan, config.completion_length) if graphs else None
    if sampler is not None:
        return sampler(model, layout.context, *args)
    if layout.expand is None:
        return sample_from_batch(model, layout.context, *args)
    return sample_from_batch(model, layout.distinct, *args, layout.expand, plan.route(layout.distinct_owners))


def _shared_prefix_pass(model: nn.Module, plan: EditPlan, config: EditConfig, layout: IceLayout,
                        tokens: torch.Tensor, rider: Rider | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training pass of :func:`ice_loss` with each request's ``q + x*`` encoded once
    (:mod:`icelora.shared_prefix`): (target logits, target labels, their requests, completion
    logits), in the orders of the whole-row pass's ``layout.target`` and ``layout.completion``."""
    device = tokens.device
    key = ("ice-prefix", tuple(layout.owners), tuple(plan.encoded), config.completion_length, plan.pad_id,
           str(device))
    prefix = plan.layout(key, lambda: prefix_layout(plan.encoded, layout.owners, config.completion_length,
                                                    plan.pad_id, device))
    owners = list(range(len(plan.requests)))
    if rider is None:
        logits = shared_prefix_logits(model, prefix, tokens, prefix_route=plan.route(owners),
                                      continuation_route=plan.route(layout.owners))
    else:
        logits = shared_prefix_logits(model, prefix, tokens, _stack(prefix.batch, rider.batch, plan.pad_id),
                                      plan.route([*owners, *rider.owners]), plan.route(layout.owners),
                                      rider_lengths=rider.batch.lengths)
        rider.logits = logits.riders
    return logits.target, prefix.labels, prefix.target.rows, logits.completion


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
    numbers = parts.numbers.clone()
    numbers[2] += weight * per_request.detach().to(numbers.dtype)
    return LossParts(parts.loss + weight * plan.reduce(per_request), numbers, summed=parts.summed)


class Objective:
    """An objective bound to one edit call: call it once per step to get that step's loss.

    Each step's randomness depends on (seed, step) only, so a resumed run repeats it exactly; in an
    independent plan every request has its own generator with that seed, so an edit trained beside
    others draws what it would draw alone. ``anchors`` (needed when ``lambda_locality > 0``): the
    pre-edit model's distributions on the locality anchors (:mod:`icelora.anchors`), one set shared
    by every request or, for an independent plan, one set per request. With ``sample_every`` k the
    ``ice`` objective draws its completions at its first call and every k-th call after, and the
    calls between reuse that draw (:class:`~icelora.sampling.DrawMemory`); a run resumed from a
    checkpoint draws afresh at its first step.
    """

    def __init__(self, plan: EditPlan, config: EditConfig, device: torch.device,
                 anchors: AnchorTeacher | Sequence[AnchorTeacher] | None = None) -> None:
        if config.lambda_locality and not anchors:
            raise ValueError("lambda_locality > 0 needs the anchors' pre-edit distributions")
        self.plan = plan
        self.config = config
        self.anchors = [anchors] if isinstance(anchors, AnchorTeacher) else list(anchors or [])
        if len(self.anchors) > 1 and (not plan.independent or len(self.anchors) != len(plan.requests)):
            raise ValueError(f"{len(self.anchors)} anchor sets need an independent plan of as many requests")
        self.main_pass_anchors: bool | None = None
        self.shared_prefix: bool | None = None
        self.cuda_graphs: bool | str | None = None
        streams = len(plan.requests) if plan.independent else 1
        self.generators = [torch.Generator(device=device) for _ in range(streams)]
        self.rngs = [random.Random() for _ in range(streams)]
        self.draws = DrawMemory(config.sample_every) if config.sample_every > 1 else None

    def __call__(self, model: nn.Module, step: int, active: Sequence[int] | None = None) -> LossParts:
        """The loss of step ``step``; ``active`` restricts an independent plan to those requests."""
        step_seed = self.config.seed * 1_000_003 + step
        for generator, rng in zip(self.generators, self.rngs):
            generator.manual_seed(step_seed)
            rng.seed(step_seed)
        plan, generators, rngs = self.plan, self.generators, self.rngs
        requests = list(range(len(plan.requests)))
        if active is not None:
            if not plan.independent:
                raise ValueError("only an independent plan can run a subset of its requests")
            plan, requests = plan.subset(active), list(active)
            generators, rngs = [generators[i] for i in active], [rngs[i] for i in active]
        if not self.config.lambda_locality:
            return self.objective_parts(model, plan, step, generators, rngs, None, requests)
        # one set of anchors per independent edit, each row routed to its owner's adapter
        owners = requests if plan.independent else [0]
        teachers = [self.anchors[k] if len(self.anchors) > 1 else self.anchors[0] for k in owners]
        chosen = choose_each(teachers, self.config.locality_anchors, self.config.seed, step)
        device = next(model.parameters()).device
        batch = pad_rows(anchor_rows(teachers, chosen), plan.pad_id, device=device)
        row_owners = [k for k, mine in enumerate(chosen) for _ in mine]
        if self.anchors_in_main_pass(device):
            rider = Rider(batch=batch, owners=row_owners, width=max(t.widest for t in teachers))
            parts = self.objective_parts(model, plan, step, generators, rngs, rider, requests)
            logits = rider.logits
        else:
            parts = self.objective_parts(model, plan, step, generators, rngs, None, requests)
            logits = model(**batch.forward_kwargs(), **plan.route(row_owners)).logits
        kl = anchor_kl_from_logits(teachers, chosen, logits)
        return with_locality(parts, plan, kl, self.config.lambda_locality)

    def anchors_in_main_pass(self, device: torch.device) -> bool:
        """Whether the anchor rows ride in the objective's main pass (padded to its width) or get a
        pass of their own (at their own width). ``main_pass_anchors`` decides when set; by default
        they ride along: every pass costs a fixed read of every weight and, on accelerators, a
        kernel launch per operation. The exception is the CPU with whole student rows (``shared_prefix`` off),
        where the padding to the main pass's width costs more arithmetic than the pass saves; with
        the prefix encoded once, the main pass's rows (``q + x*``) are about as wide as the anchors'."""
        if self.main_pass_anchors is not None:
            return self.main_pass_anchors
        return device.type != "cpu" or self.encodes_prefix_once(device)

    def encodes_prefix_once(self, device: torch.device) -> bool:
        """Whether the ICE training pass encodes each request's ``q + x*`` once and continues the
        completions from its KV cache (:mod:`icelora.shared_prefix`) rather than running whole
        student rows. ``shared_prefix`` decides when set; by default on the CPU, whose steps are
        bound by arithmetic (it saves the repeated prefix's tokens), and not on accelerators,
        whose steps are bound by kernel launches (it adds a pass)."""
        return self.shared_prefix if self.shared_prefix is not None else device.type == "cpu"

    def _graphs_setting(self, device: torch.device) -> bool | str:
        """``cuda_graphs``, or where it is ``None`` whether ``device`` is a CUDA device."""
        if self.cuda_graphs not in (None, True, False, "sampling"):
            raise ValueError(f"cuda_graphs must be None, True, False or 'sampling', got {self.cuda_graphs!r}")
        return self.cuda_graphs if self.cuda_graphs is not None else device.type == "cuda"

    def samples_from_graphs(self, device: torch.device) -> bool:
        """Whether the ICE sampling passes are replayed from CUDA graphs (where they can be):
        ``cuda_graphs`` decides when set (``True`` or ``"sampling"``); by default on CUDA."""
        return self._graphs_setting(device) in (True, "sampling")

    def trains_from_graphs(self, device: torch.device) -> bool:
        """Whether the ICE training pass is replayed from CUDA graphs (where it can be):
        ``cuda_graphs`` decides when set (``True`` only); by default on CUDA."""
        return self._graphs_setting(device) is True

    def objective_parts(self, model: nn.Module, plan: EditPlan, step: int, generators: list[torch.Generator],
                        rngs: list[random.Random], rider: Rider | None, requests: list[int] | None = None
                        ) -> LossParts:
        """The objective's loss on ``plan`` (``requests``: their indices in the objective's own plan)."""
        name = self.config.objective
        if name == "ft":
            return ft_loss(model, plan, self.config, step, rider)
        if name == "ft-last":
            return ft_last_loss(model, plan, self.config, step, rider)
        if name == "ice":
            device = next(model.parameters()).device
            return ice_loss(model, plan, self.config, step, generators, rider, self.samples_from_graphs(device),
                            self.trains_from_graphs(device), self.encodes_prefix_once(device), self.draws,
                            requests)
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
