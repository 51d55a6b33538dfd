"""Locality anchors: texts whose next-token distributions an edit should leave as they were.

With ``lambda_locality > 0`` every step adds ``lambda_locality * mean_t KL(p0(.|a<t) || q(.|a<t))``
over the tokens of a few anchor texts ``a``: ``p0`` is the model before the edit (computed once per
edit call), ``q`` the model being edited. Which anchors a step uses depends on (seed, step) only.

Two kinds of anchors (``EditConfig.locality_anchor_kind``):

- ``general``: fixed statements and questions written for this purpose, taken from no benchmark;
- ``subject``: short prompts about the edited request's subject ("{subject} is known for"),
  each continued by the unedited model's own greedy tokens. They keep what the model says about
  the subject apart from the edited fact (the idea of ROME's "essence" KL prompts); a request
  without a subject gets the general anchors.
- ``relation``: the subject's other relations, asked as "The {relation} of {subject} is" and
  "{subject} {relation}" for common Wikidata properties (a fixed list, taken from no record),
  leaving out those whose words the edit's own prompt uses; each continued by the unedited
  model's greedy tokens like the subject anchors.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from icelora.config import LOCALITY_ANCHOR_KINDS
from icelora.request import EditRequest
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

#: Prompts about the subject that name no relation of their own; each is continued by
#: ``SUBJECT_CONTINUATION`` greedy tokens of the unedited model.
SUBJECT_TEMPLATES = (
    "{subject} is a",
    "{subject} was",
    "{subject} is known for",
    "{subject} has",
    "People know {subject} as",
    "The story of {subject}",
    "About {subject}:",
    "{subject}, who",
)
SUBJECT_CONTINUATION = 3

#: Properties that many Wikidata statements use, for the ``relation`` anchors.
SUBJECT_RELATIONS = (
    "instance of", "sex or gender", "country of citizenship", "country", "occupation", "date of birth",
    "place of birth", "date of death", "place of death", "given name", "family name", "languages spoken",
    "educated at", "member of", "part of", "located in", "taxon rank", "parent taxon",
)
RELATION_TEMPLATES = ("The {relation} of {subject} is", "{subject} {relation}")


@dataclass
class AnchorTeacher:
    """Anchor token rows and the pre-edit model's log-probabilities over each of their positions."""

    rows: list[tuple[int, ...]]
    log_probs: list[torch.Tensor]  # per anchor: [len(row) - 1, V], on the model's device

    @functools.cached_property
    def widest(self) -> int:
        """The length of the longest anchor row (what a fixed-shape pass pads the anchors to)."""
        return max(len(row) for row in self.rows)

    def choose(self, count: int, seed: int, step: int) -> list[int]:
        """The anchors step ``step`` uses: ``count`` of them, a function of (seed, step) only."""
        return seeded_sample(len(self.rows), count, seed * 1_000_003 + step)


def seeded_sample(size: int, count: int, seed: int) -> list[int]:
    """``count`` of ``range(size)`` (all when ``size`` is smaller) drawn without replacement, a
    function of ``seed`` only."""
    return random.Random(seed).sample(range(size), min(count, size))


@torch.no_grad()
def teacher_from_rows(model: nn.Module, rows: list[tuple[int, ...]], pad_id: int) -> AnchorTeacher:
    """Record the model's next-token log-probabilities on token ``rows`` (call it on the model as
    it is before the edit)."""
    device = next(model.parameters()).device
    batch = pad_rows(rows, pad_id, device=device)
    logits = model(**batch.forward_kwargs()).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = [F.log_softmax(logits[i, : len(r) - 1], dim=-1) for i, r in enumerate(rows)]
    return AnchorTeacher(rows=list(rows), log_probs=log_probs)


def anchor_teacher(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int,
                   texts: Sequence[str] = ANCHOR_TEXTS) -> AnchorTeacher:
    """The general anchors (or ``texts``), tokenized, with the model's distributions on them."""
    return teacher_from_rows(model, [tuple(tokenizer(t)["input_ids"]) for t in texts], pad_id)


@torch.no_grad()
def greedy_extend(model: nn.Module, rows: list[tuple[int, ...]], pad_id: int, tokens: int,
                  eos_id: int | None) -> list[tuple[int, ...]]:
    """Each row followed by the model's ``tokens`` greedy next tokens (a row stops after EOS)."""
    device = next(model.parameters()).device
    rows = [tuple(r) for r in rows]
    if not rows:
        return []
    done = [False] * len(rows)
    for _ in range(tokens):
        batch = pad_rows(rows, pad_id, device=device)
        logits = model(**batch.forward_kwargs()).logits
        last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
        chosen = logits[torch.arange(len(rows), device=logits.device), last].argmax(-1).tolist()
        rows = [r if d else (*r, t) for r, d, t in zip(rows, done, chosen)]
        done = [d or t == eos_id for d, t in zip(done, chosen)]
    return rows


def subject_anchor_rows(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int,
                        subjects: Sequence[str]) -> list[tuple[int, ...]]:
    """The subject anchors of ``subjects``: every template filled with each subject, continued by
    the model's greedy tokens."""
    prompts = [tuple(tokenizer(t.format(subject=s))["input_ids"]) for s in subjects for t in SUBJECT_TEMPLATES]
    return greedy_extend(model, prompts, pad_id, SUBJECT_CONTINUATION, tokenizer.eos_token_id)


def relations_apart_from(prompt: str) -> list[str]:
    """The relations of :data:`SUBJECT_RELATIONS` none of whose words (of 4+ letters) the edit's
    prompt uses: anchoring the edited relation itself would pull the edit back."""
    used = {word.strip("?.,:;!'\"").lower() for word in prompt.split()}
    return [relation for relation in SUBJECT_RELATIONS
            if not any(len(w) >= 4 and any(u.startswith(w) for u in used) for w in relation.split())]


def relation_anchor_rows(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int,
                         requests: Sequence[EditRequest]) -> list[tuple[int, ...]]:
    """The relation anchors of ``requests`` (those with a subject), continued by the model's
    greedy tokens."""
    prompts = [tuple(tokenizer(t.format(relation=relation, subject=r.subject))["input_ids"])
               for r in requests if r.subject for relation in relations_apart_from(r.prompt)
               for t in RELATION_TEMPLATES]
    return greedy_extend(model, prompts, pad_id, SUBJECT_CONTINUATION, tokenizer.eos_token_id)


def request_anchor_rows(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int, kind: str,
                        requests: Sequence[EditRequest]) -> list[tuple[int, ...]]:
    """The ``relation`` or ``subject`` anchor rows of ``requests`` (those with a subject)."""
    if kind == "relation":
        return relation_anchor_rows(model, tokenizer, pad_id, requests)
    return subject_anchor_rows(model, tokenizer, pad_id, [r.subject for r in requests if r.subject])


def anchor_teachers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int, kind: str,
                    requests: Sequence[EditRequest], independent: bool,
                    rows_of: Callable[[Sequence[EditRequest]], list[tuple[int, ...]]] | None = None
                    ) -> list[AnchorTeacher]:
    """The anchors of one edit call with the model as it is before the edit.

    ``general``: one set shared by every request. ``subject`` and ``relation``: for an independent
    plan one set per request (its own subject's anchors), else one set with every request's.
    ``rows_of``: makes the anchor rows of some requests, all with a subject (a cache of them, say);
    by default :func:`request_anchor_rows` with ``model``.
    """
    make_rows = rows_of or (lambda group: request_anchor_rows(model, tokenizer, pad_id, kind, group))
    if kind not in LOCALITY_ANCHOR_KINDS:
        raise ValueError(f"unknown anchor kind {kind!r}; choose from {list(LOCALITY_ANCHOR_KINDS)}")
    if kind == "general":
        return [anchor_teacher(model, tokenizer, pad_id)]
    groups = [[r] for r in requests] if independent else [list(requests)]
    teachers = []
    for group in groups:
        rows = make_rows([r for r in group if r.subject]) if any(r.subject for r in group) else []
        # no subject (or, under relation anchors, every relation named by the prompt): the general anchors
        teachers.append(teacher_from_rows(model, rows, pad_id) if rows else anchor_teacher(model, tokenizer, pad_id))
    return teachers


def choose_each(teachers: Sequence[AnchorTeacher], count: int, seed: int, step: int) -> list[list[int]]:
    """The anchors step ``step`` uses in each owner's set."""
    return [t.choose(count, seed, step) for t in teachers]


def anchor_rows(teachers: Sequence[AnchorTeacher], chosen: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Owner k's chosen anchor rows, for every owner in turn (owner k's set is ``teachers[k]``)."""
    return [t.rows[j] for t, mine in zip(teachers, chosen) for j in mine]


def anchor_kl_from_logits(teachers: Sequence[AnchorTeacher], chosen: Sequence[Sequence[int]],
                          logits: torch.Tensor) -> torch.Tensor:
    """``KL(p0 || q)`` averaged over each owner's chosen anchors' positions, from the edited model's
    logits on :func:`anchor_rows` (right-padded, one row each): [owners]."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    per_owner, r = [], 0
    for teacher, mine in zip(teachers, chosen):
        terms = []
        for j in mine:
            row = teacher.rows[j]
            log_q = F.log_softmax(logits[r, : len(row) - 1].to(dtype), dim=-1)
            log_p = teacher.log_probs[j]
            terms.append((log_p.exp() * (log_p - log_q)).sum(-1).mean())
            r += 1
        per_owner.append(torch.stack(terms).mean())
    return torch.stack(per_owner)
