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

With ``replay_anchors = a > 0`` (and ``lambda_locality > 0``) each replayed edit also brings ``a``
of its own locality anchors (:mod:`icelora.anchors`: its relation anchors under
``locality_anchor_kind`` relation, its subject anchors otherwise), and the step adds

    lambda_locality * mean_t KL(p0(.|a<t) || q(.|a<t))

over their tokens, ``p0`` being the unedited model: the new edit's locality term guards only its
own subject, and without this the earlier subjects drift as edits pile up. The anchors ride in
the replayed targets' pass; their pre-edit distributions are computed at the start of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from icelora.anchors import AnchorTeacher, anchor_kl_from_logits, seeded_sample
from icelora.config import EditConfig
from icelora.losses import EditPlan, LossParts, Rider, ft_loss
from icelora.request import EditRequest
from icelora.tokenization import pad_rows

#: Configuration keys that act only when edits accumulate (the sequential protocol).
SEQUENTIAL_ONLY_KEYS = ("replay_edits", "lambda_replay", "replay_anchors")

AnchorRows = list[tuple[int, ...]]


@dataclass
class ReplayAnchors:
    """The earlier edits' subject anchors and where their pre-edit distributions come from.

    ``rows[j]``: the anchor token rows of the replay plan's request ``j`` (empty for a request
    without a subject). ``teacher(rows)``: the unedited model's distributions on those rows (it
    may swap the trained weights for a moment, so it is called before the step's passes).
    """

    rows: list[AnchorRows]
    teacher: Callable[[AnchorRows], AnchorTeacher]


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


def replayed_anchor_rows(rows: Sequence[AnchorRows], chosen: Sequence[int], count: int, seed: int,
                         step: int) -> AnchorRows:
    """``count`` anchor rows of each replayed edit in ``chosen`` (all of them when it has fewer),
    drawn per (seed, step, edit)."""
    picked: AnchorRows = []
    for j in chosen:
        mine = rows[j]
        drawn = seeded_sample(len(mine), count, (seed * 1_000_003 + step) * 1_000_033 + j)
        picked.extend(mine[i] for i in sorted(drawn))
    return picked


def replay_term(model: nn.Module, plan: EditPlan, config: EditConfig, step: int, chosen: Sequence[int],
                anchors: tuple[AnchorRows, AnchorTeacher] | None = None) -> torch.Tensor:
    """``lambda_replay`` times the mean target cross-entropy (no context) of the replayed edits
    ``chosen``, plus ``lambda_locality`` times the mean KL on their anchor rows, when given with
    their pre-edit distributions."""
    rider = None
    if anchors:
        device = next(model.parameters()).device
        rider = Rider(batch=pad_rows(anchors[0], plan.pad_id, device=device), owners=[0] * len(anchors[0]))
    term = config.lambda_replay * ft_loss(model, plan.subset(chosen), config, step, rider).loss
    if anchors:
        rows, teacher = anchors
        term = term + config.lambda_locality * anchor_kl_from_logits([teacher], [range(len(rows))], rider.logits)[0]
    return term


def with_replay(parts: LossParts, term: torch.Tensor) -> LossParts:
    """``parts`` with ``term`` added to the loss that is minimised; the reported numbers (and so
    early stopping) stay the new edit's own."""
    return LossParts(parts.loss + term, parts.numbers, summed=parts.summed)


class ReplayObjective:
    """``objective`` with the replay term of the earlier edits in ``plan`` added at every step
    (and their anchors' locality term, when ``anchors`` are given and ``replay_anchors > 0``)."""

    def __init__(self, objective: Callable[[nn.Module, int], LossParts], plan: EditPlan, config: EditConfig,
                 anchors: ReplayAnchors | None = None) -> None:
        if not config.replay_edits:
            raise ValueError("replay needs replay_edits > 0")
        if not plan.requests:
            raise ValueError("replay needs at least one earlier edit")
        if anchors is not None and len(anchors.rows) != len(plan.requests):
            raise ValueError(f"{len(anchors.rows)} anchor sets for {len(plan.requests)} replayed edits")
        self.objective, self.plan, self.config, self.anchors = objective, plan, config, anchors

    def __call__(self, model: nn.Module, step: int) -> LossParts:
        config = self.config
        chosen = replayed_indices(len(self.plan.requests), config.replay_edits, config.seed, step)
        anchors = None
        if self.anchors is not None and config.replay_anchors and config.lambda_locality:
            rows = replayed_anchor_rows(self.anchors.rows, chosen, config.replay_anchors, config.seed, step)
            anchors = (rows, self.anchors.teacher(rows)) if rows else None  # before this step's passes
        parts = self.objective(model, step)
        return with_replay(parts, replay_term(model, self.plan, config, step, chosen, anchors))
