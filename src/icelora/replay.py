"""Rehearsal of earlier edits while a new one is trained (sequential editing).

Edits written one after another into the same adapter overwrite each other: each new edit's
steps move the adapter wherever its own loss wants, and nothing pulls the earlier targets back.
With ``replay_edits = k > 0`` every step of a new edit also minimises the target cross-entropy
of ``k`` earlier edits from the editor's ledger, drawn afresh at every step:

    L = L_new + lambda_replay * mean_{j in R_step} CE(x*_j | q_j)

``R_step`` holds ``k`` of the earlier edits (all of them while there are at most ``k``), drawn
without replacement by a generator seeded with (seed, number of earlier edits, step), so a rerun
or a resumed run draws the same ones. An earlier edit whose prompt the new edit rewrites is not
replayed (its old target would fight the new one). The step's reported numbers and its early
stopping stay those of the new edit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from icelora.config import EditConfig
from icelora.losses import EditPlan, LossParts, ft_loss
from icelora.request import EditRequest

#: Configuration keys that act only when edits accumulate (the sequential protocol).
SEQUENTIAL_ONLY_KEYS = ("replay_edits", "lambda_replay")


def replayed_requests(ledger: list[EditRequest], batch: list[EditRequest]) -> list[EditRequest]:
    """The ledger's edits that may be replayed while ``batch`` is trained: those whose prompt no
    request of ``batch`` rewrites."""
    rewritten = {request.prompt for request in batch}
    return [request for request in ledger if request.prompt not in rewritten]


def replayed_indices(count: int, k: int, seed: int, step: int) -> list[int]:
    """Which of ``count`` earlier edits step ``step`` replays: ``k`` of them drawn without
    replacement (seeded by seed, count and step), or all of them when ``count <= k``, in order."""
    if count <= k:
        return list(range(count))
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + count) * 1_000_033 + step) % 2**63)
    return sorted(torch.randperm(count, generator=generator)[:k].tolist())


def replay_term(model: nn.Module, plan: EditPlan, config: EditConfig, step: int) -> torch.Tensor:
    """Mean target cross-entropy (no context) of the earlier edits replayed at ``step``."""
    chosen = replayed_indices(len(plan.requests), config.replay_edits, config.seed, step)
    return ft_loss(model, plan.subset(chosen), config, step).loss


def with_replay(parts: LossParts, term: torch.Tensor, weight: float) -> LossParts:
    """``parts`` with ``weight * term`` added to the loss that is minimised; the reported numbers
    (and so early stopping) stay the new edit's own."""
    return LossParts(parts.loss + weight * term, parts.numbers, summed=parts.summed)


class ReplayObjective:
    """``objective`` with the replay term of the earlier edits in ``plan`` added at every step."""

    def __init__(self, objective: Callable[[nn.Module, int], LossParts], plan: EditPlan, config: EditConfig) -> None:
        if not config.replay_edits:
            raise ValueError("replay needs replay_edits > 0")
        if not plan.requests:
            raise ValueError("replay needs at least one earlier edit")
        self.objective, self.plan, self.config = objective, plan, config

    def __call__(self, model: nn.Module, step: int) -> LossParts:
        parts = self.objective(model, step)
        return with_replay(parts, replay_term(model, self.plan, self.config, step), self.config.lambda_replay)
