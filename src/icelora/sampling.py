"""Self-induced completions: sample ``x_c`` from the context-conditioned model with a KV cache.

One cached decode gives both the sampled tokens and, for each of them, the model's untempered
next-token logits ``p(. | c, q, x*, x_c<t)``: the teacher distribution of the ICE loss. No second
forward pass with the context is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from icelora.output_layer import output_layer_reads
from icelora.tokenization import PaddedBatch, pad_rows, to_device


@dataclass
class Completions:
    """Sampled completions of R rows, ``length`` tokens each.

    tokens: [R, m] sampled ids. teacher_logits: [R, m, V] logits that produced them (before the
    temperature). alive: [R, m] True for tokens before the row's first EOS.
    """

    tokens: torch.Tensor
    teacher_logits: torch.Tensor
    alive: torch.Tensor


def alive_before_eos(tokens: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """True for the tokens of each row that come before its first EOS token (the EOS excluded)."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= tokens == eos
    return is_eos.long().cumsum(dim=1) == 0


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator],
         groups: list[torch.Tensor] | None) -> torch.Tensor:
    """One token per row of ``probs``; rows ``groups[g]`` draw from ``generators[g]`` (all rows
    from ``generators[0]`` when ``groups`` is None), so a group's draws do not depend on the others."""
    if groups is None:
        return torch.multinomial(probs, 1, generator=generators[0])
    token = torch.empty((probs.shape[0], 1), dtype=torch.long, device=probs.device)
    for generator, rows in zip(generators, groups):
        token[rows] = torch.multinomial(probs[rows], 1, generator=generator)
    return token


def group_rows(row_groups: Sequence[int], groups: int, device: torch.device) -> list[torch.Tensor]:
    """For each generator k, the indices of the rows that draw from it."""
    return [to_device(torch.tensor([r for r, g in enumerate(row_groups) if g == k], dtype=torch.long), device)
            for k in range(groups)]


def sample_completions(
    model: nn.Module,
    rows: list[tuple[int, ...]],
    pad_id: int,
    length: int,
    temperature: float,
    generator: torch.Generator | Sequence[torch.Generator],
    eos_ids: set[int],
    row_groups: Sequence[int] | None = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> Completions:
    """Sample ``length`` tokens after each row (left-padded prefill, then cached decode steps).

    Generators must live on the model's device. With ``row_groups`` (a generator index per row)
    row i draws from ``generator[row_groups[i]]``. ``forward_kwargs`` go to every forward call
    (e.g. ``adapter_names`` routing each row to its own adapter).
    """
    device = next(model.parameters()).device
    generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
    groups = None
    if row_groups is not None:
        if len(row_groups) != len(rows):
            raise ValueError(f"{len(row_groups)} row groups for {len(rows)} rows")
        groups = group_rows(row_groups, len(generators), device)
    batch = pad_rows(rows, pad_id, side="left", device=device)
    return sample_from_batch(model, batch, length, temperature, generators, eos_ids, groups, forward_kwargs)


def sample_with(run_pass: Callable[[int, torch.Tensor | None], torch.Tensor], length: int, temperature: float,
                generators: Sequence[torch.Generator], eos_ids: set[int],
                groups: list[torch.Tensor] | None = None) -> Completions:
    """The sampling loop: ``run_pass(k, token)`` gives the untempered logits [R, V] of completion
    token k (k = 0: the prefill, ``token`` None; k > 0: a decode pass after ``token``, the [R, 1]
    tokens drawn at k - 1), and each token is drawn from them at ``temperature``."""
    tokens, teacher = [], []
    token = None
    for step in range(length):
        logits = run_pass(step, token)
        token = draw(torch.softmax(logits / temperature, dim=-1), generators, groups)
        tokens.append(token)
        teacher.append(logits)
    sampled = torch.cat(tokens, dim=1)
    return Completions(tokens=sampled, teacher_logits=torch.stack(teacher, dim=1),
                       alive=alive_before_eos(sampled, eos_ids))


def decode_step(model: nn.Module, token: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                **forward_kwargs: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One cached decode pass of ``token`` [R, 1] after rows whose attention ``mask`` and last
    ``positions`` [R, 1] are given; (model output, mask and positions with the token added)."""
    mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    positions = positions + 1
    out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                **forward_kwargs)
    return out, mask, positions


@torch.no_grad()
def sample_from_batch(
    model: nn.Module,
    batch: PaddedBatch,
    length: int,
    temperature: float,
    generators: Sequence[torch.Generator],
    eos_ids: set[int],
    groups: list[torch.Tensor] | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    expand: torch.Tensor | None = None,
    prefill_kwargs: dict[str, Any] | None = None,
) -> Completions:
    """:func:`sample_completions` on a left-padded batch already on the device, with the rows of
    each generator given as index tensors (``group_rows``). Nothing here reads the device from the
    host, so the editing loop can queue the whole step.

    ``expand``: the batch holds each distinct row once, and completion row ``r`` continues batch
    row ``expand[r]`` (several samples after one context): the prefill runs on the distinct rows
    and its cache is copied to the rows that share them, the decode passes run on every row.
    ``forward_kwargs`` go to the decode passes and ``prefill_kwargs`` (by default the same; with
    ``expand``, e.g. the distinct rows' adapter routing) to the prefill."""
    extra = forward_kwargs or {}
    prefill_extra = extra if prefill_kwargs is None else prefill_kwargs
    state: dict[str, Any] = {"mask": batch.attention_mask, "positions": batch.position_ids[:, -1:], "cache": None}

    def run_pass(step: int, token: torch.Tensor | None) -> torch.Tensor:
        if token is None:  # the last position only, made contiguous: the output layer is then one matrix product
            with output_layer_reads(model, torch.Tensor.contiguous):
                out = model(**batch.forward_kwargs(), **prefill_extra, use_cache=True, logits_to_keep=1)
            if expand is not None:
                out.cache.reorder_cache(expand)
                state["mask"], state["positions"] = state["mask"][expand], state["positions"][expand]
                state["cache"] = out.cache
                return out.logits[expand, -1].float()
        else:
            out, state["mask"], state["positions"] = decode_step(model, token, state["mask"], state["positions"],
                                                                 state["cache"], logits_to_keep=1, **extra)
        state["cache"] = out.cache
        return out.logits[:, -1].float()

    return sample_with(run_pass, length, temperature, generators, eos_ids, groups)


class DrawMemory:
    """The completions of an objective's last draw, kept for the steps that reuse them.

    With ``every`` k, an objective draws fresh completions (and their teacher distributions) at
    its first call and every k-th call after; the k - 1 calls between train on the same draw,
    as a minibatch taken for more than one step. ``every`` 1 keeps nothing. Each row is kept with
    the request it belongs to (its index in the whole plan), so that when some requests of an
    independent plan have stopped, the others still find their own rows, in order.
    """

    def __init__(self, every: int = 1) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = every
        self.step: int | None = None
        self.uses = 0
        self.rows: list[int] = []
        self.completions: Completions | None = None

    def recall(self, requests: Sequence[int]) -> tuple[int, Completions] | None:
        """(the step of the draw, the completions of the rows of ``requests``, in order) while the
        last draw is to be reused and holds every one of them; ``None``: draw afresh."""
        if self.completions is None or self.uses >= self.every:
            return None
        wanted = set(requests)
        keep = [r for r, owner in enumerate(self.rows) if owner in wanted]
        if {self.rows[r] for r in keep} != wanted:
            return None
        self.uses += 1
        if len(keep) == len(self.rows):
            return self.step, self.completions
        index = torch.tensor(keep, device=self.completions.tokens.device)
        drawn = self.completions
        return self.step, Completions(tokens=drawn.tokens[index], teacher_logits=drawn.teacher_logits[index],
                                      alive=drawn.alive[index])

    def keep(self, step: int, rows: Sequence[int], completions: Completions) -> None:
        """Remember a fresh draw of step ``step``; ``rows``: the request of each of its rows."""
        if self.every == 1:
            return
        self.step, self.uses, self.rows, self.completions = step, 1, list(rows), completions
