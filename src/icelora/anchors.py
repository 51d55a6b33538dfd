"""Locality anchors: unrelated texts whose next-token distributions an edit should leave as they were.

With ``lambda_locality > 0`` every step adds ``lambda_locality * mean_t KL(p0(.|a<t) || q(.|a<t))``
over the tokens of a few anchor texts ``a``: ``p0`` is the model before the edit (computed once per
edit call), ``q`` the model being edited. The texts are general statements and questions written
for this purpose, taken from no benchmark; which ones a step uses depends on (seed, step) only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from icelora.tokenization import pad_rows

ANCHOR_TEXTS = (
    "Water boils at one hundred degrees Celsius at sea level.",
    "The capital of Japan is Tokyo, a city on the island of Honshu.",
    "Q: How many days are there in a leap year? A: 366.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "Who painted the ceiling of the Sistine Chapel? Michelangelo.",
    "The river flows past the old mill and into the lake.",
    "A triangle has three sides and its angles add up to 180 degrees.",
    "She opened the window to let the cool morning air into the room.",
    "What is the chemical symbol for gold? The answer is Au.",
    "The Pacific is the largest and deepest of the world's oceans.",
    "He plays the violin in the city orchestra every weekend.",
    "Q: Which planet is known as the Red Planet? A: Mars.",
    "Bread is made from flour, water, salt and yeast.",
    "The museum is closed on Mondays and open late on Fridays.",
    "In which year did the First World War end? It ended in 1918.",
    "The human heart has four chambers.",
    "The train to the coast leaves from platform four at noon.",
    "Q: What language is spoken in Brazil? A: Portuguese.",
    "Mount Everest is the highest mountain above sea level.",
    "The children built a sandcastle on the beach.",
    "Who wrote the novel Pride and Prejudice? Jane Austen.",
    "Copper is a good conductor of electricity and heat.",
    "The meeting was moved to Thursday afternoon.",
    "Q: How many legs does a spider have? A: Eight.",
)


@dataclass
class AnchorTeacher:
    """Anchor token rows and the pre-edit model's log-probabilities over each of their positions."""

    rows: list[tuple[int, ...]]
    log_probs: list[torch.Tensor]  # per anchor: [len(row) - 1, V], on the model's device

    def choose(self, count: int, seed: int, step: int) -> list[int]:
        """The anchors step ``step`` uses: ``count`` of them, a function of (seed, step) only."""
        return random.Random(seed * 1_000_003 + step).sample(range(len(self.rows)), min(count, len(self.rows)))


@torch.no_grad()
def anchor_teacher(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int,
                   texts: Sequence[str] = ANCHOR_TEXTS) -> AnchorTeacher:
    """Tokenize the anchors and record the model's next-token log-probabilities on them (call it on
    the model as it is before the edit)."""
    device = next(model.parameters()).device
    rows = [tuple(tokenizer(t)["input_ids"]) for t in texts]
    batch = pad_rows(rows, pad_id, device=device)
    logits = model(**batch.forward_kwargs()).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = [F.log_softmax(logits[i, : len(r) - 1], dim=-1) for i, r in enumerate(rows)]
    return AnchorTeacher(rows=rows, log_probs=log_probs)


def anchor_rows(teacher: AnchorTeacher, chosen: list[int], owners: int) -> list[tuple[int, ...]]:
    """The chosen anchors' token rows, one copy per owner (owner k's copy is rows k*len(chosen)...)."""
    return [teacher.rows[j] for _ in range(owners) for j in chosen]


def anchor_kl_from_logits(teacher: AnchorTeacher, chosen: list[int], owners: int,
                          logits: torch.Tensor) -> torch.Tensor:
    """``KL(p0 || q)`` averaged over each owner's chosen anchors' positions, from the edited model's
    logits on :func:`anchor_rows` (right-padded, one row each): [owners]."""
    rows = anchor_rows(teacher, chosen, owners)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    terms = []
    for r, row in enumerate(rows):
        log_q = F.log_softmax(logits[r, : len(row) - 1].to(dtype), dim=-1)
        log_p = teacher.log_probs[chosen[r % len(chosen)]]
        terms.append((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return torch.stack(terms).view(owners, len(chosen)).mean(dim=1)
