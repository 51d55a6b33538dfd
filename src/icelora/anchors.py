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
from icelora.output_layer import output_layer_reads
from icelora.request import EditRequest
from icelora.sampling import decode_step
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
def greedy_teacher(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, tokens: int,
                   eos_id: int | None) -> AnchorTeacher:
    """Each prompt followed by the model's ``tokens`` greedy next tokens (a row stops after EOS),
    with the model's log-probabilities over every position of the rows made.

    One left-padded prefill and ``tokens - 1`` cached one-token decode passes: the prefill's logits
    are the teacher's over the prompt, and the logits that choose each greedy token are its
    teacher's at that position, so no second pass over the finished rows is needed. Equal, up to
    float rounding, to extending the rows a full pass at a time and then :func:`teacher_from_rows`.
    """
    rows = [tuple(p) for p in prompts]
    if not rows:
        return AnchorTeacher(rows=[], log_probs=[])
    device = next(model.parameters()).device
    batch = pad_rows(rows, pad_id, side="left", device=device)
    real_rows, real_positions = batch.real_positions(device)
    with output_layer_reads(model, lambda hidden: hidden[real_rows, real_positions][None]):  # none at the padding
        out = model(**batch.forward_kwargs(), use_cache=True)
    dtype = torch.promote_types(out.logits.dtype, torch.float32)
    parts = out.logits[0].split(batch.lengths)
    seen = [[part.to(dtype)] for part in parts]
    last = torch.stack([part[-1] for part in parts])
    mask, positions = batch.attention_mask, batch.position_ids[:, -1:]
    done = [False] * len(rows)
    for k in range(tokens):
        chosen = last.argmax(-1)
        picked = chosen.tolist()
        rows = [r if d else (*r, t) for r, d, t in zip(rows, done, picked)]
        done = [d or t == eos_id for d, t in zip(done, picked)]
        if k == tokens - 1 or all(done):
            break
        out, mask, positions = decode_step(model, chosen[:, None], mask, positions, out.cache)
        last = out.logits[:, -1]
        for i in range(len(rows)):
            if not done[i]:
                seen[i].append(last[i: i + 1].to(dtype))
    return AnchorTeacher(rows=rows, log_probs=[F.log_softmax(torch.cat(parts)[: len(r) - 1], dim=-1)
                                               for parts, r in zip(seen, rows)])


def subject_anchors(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int,
                    subjects: Sequence[str]) -> AnchorTeacher:
    """The subject anchors of ``subjects``: every template filled with each subject, continued by
    the model's greedy tokens, with the model's distributions on them."""
    prompts = [tuple(tokenizer(t.format(subject=s))["input_ids"]) for s in subjects for t in SUBJECT_TEMPLATES]
    return greedy_teacher(model, prompts, pad_id, SUBJECT_CONTINUATION, tokenizer.eos_token_id)


def relations_apart_from(prompt: str) -> list[str]:
    """The relations of :data:`SUBJECT_RELATIONS` none of whose words (of 4+ letters) the edit's
    prompt uses: anchoring the edited relation itself would pull the edit back."""
    used = {word.strip("?.,:;!'\"").lower() for word in prompt.split()}
    return [relation for relation in SUBJECT_RELATIONS
            if not any(len(w) >= 4 and any(u.startswith(w) for u in used) for w in relation.split())]


def relation_anchors(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int,
                     requests: Sequence[EditRequest]) -> AnchorTeacher:
    """The relation anchors of ``requests`` (those with a subject), continued by the model's
    greedy tokens, with the model's distributions on them."""
    prompts = [tuple(tokenizer(t.format(relation=relation, subject=r.subject))["input_ids"])
               for r in requests if r.subject for relation in relations_apart_from(r.prompt)
               for t in RELATION_TEMPLATES]
    return greedy_teacher(model, prompts, pad_id, SUBJECT_CONTINUATION, tokenizer.eos_token_id)


def request_anchors(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int, kind: str,
                    requests: Sequence[EditRequest]) -> AnchorTeacher:
    """The ``relation`` or ``subject`` anchors of ``requests`` (those with a subject)."""
    if kind == "relation":
        return relation_anchors(model, tokenizer, pad_id, requests)
    return subject_anchors(model, tokenizer, pad_id, [r.subject for r in requests if r.subject])


def anchors_of_request(kind: str, request: EditRequest) -> int:
    """How many ``relation`` or ``subject`` anchor rows :func:`request_anchors` makes for ``request``."""
    if not request.subject:
        return 0
    if kind == "relation":
        return len(relations_apart_from(request.prompt)) * len(RELATION_TEMPLATES)
    return len(SUBJECT_TEMPLATES)


def request_anchors_each(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int, kind: str,
                         requests: Sequence[EditRequest]) -> list[AnchorTeacher]:
    """Each request's own ``relation`` or ``subject`` anchors (none without a subject), all made in
    one :func:`request_anchors` call: one batched greedy decode, not one per request."""
    made = request_anchors(model, tokenizer, pad_id, kind, requests)
    counts = [anchors_of_request(kind, r) for r in requests]
    if sum(counts) != len(made.rows):
        raise ValueError(f"{len(made.rows)} anchor rows made for {len(requests)} request(s), {sum(counts)} expected")
    each: list[AnchorTeacher] = []
    start = 0
    for count in counts:
        each.append(AnchorTeacher(rows=made.rows[start: start + count], log_probs=made.log_probs[start: start + count]))
        start += count
    return each


def joined(teachers: Sequence[AnchorTeacher]) -> AnchorTeacher:
    """One anchor set holding the rows of ``teachers`` in turn."""
    return AnchorTeacher(rows=[row for t in teachers for row in t.rows],
                         log_probs=[lp for t in teachers for lp in t.log_probs])


def anchor_teachers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pad_id: int, kind: str,
                    requests: Sequence[EditRequest], independent: bool,
                    teachers_of: Callable[[Sequence[EditRequest]], list[AnchorTeacher]] | None = None
                    ) -> list[AnchorTeacher]:
    """The anchors of one edit call with the model as it is before the edit.

    ``general``: one set shared by every request. ``subject`` and ``relation``: for an independent
    plan one set per request (its own subject's anchors), else one set with every request's; either
    way every request's anchors come from one batched pass. A request (or a joint plan) left with
    no anchor rows (no subject, or under relation anchors every relation named by its prompt) gets
    the general anchors. ``teachers_of``: makes each of some requests' anchors, all with a subject
    (keeping their rows too, say); by default :func:`request_anchors_each` with ``model``.
    """
    make = teachers_of or (lambda group: request_anchors_each(model, tokenizer, pad_id, kind, group))
    if kind not in LOCALITY_ANCHOR_KINDS:
        raise ValueError(f"unknown anchor kind {kind!r}; choose from {list(LOCALITY_ANCHOR_KINDS)}")
    if kind == "general":
        return [anchor_teacher(model, tokenizer, pad_id)]
    with_subject = [r for r in requests if r.subject]
    made = iter(make(with_subject) if with_subject else [])
    own = [next(made) if r.subject else joined([]) for r in requests]
    sets = own if independent else [joined(own)]
    general: AnchorTeacher | None = None
    teachers = []
    for teacher in sets:
        if not teacher.rows:
            general = general or anchor_teacher(model, tokenizer, pad_id)
            teacher = general
        teachers.append(teacher)
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
    logits on :func:`anchor_rows`: [owners]. ``logits`` is either [rows, width, V] (the rows
    right-padded, one row each) or [positions, V] (each row's positions ``0..len - 2``, row after
    row).

    Each anchor's positions come out of one ``split`` (or ``unbind``), not a slice per anchor: the
    backward of a slice writes its gradient into a zeroed tensor the size of all the logits, so
    with many edits trained together (dozens of anchors, hundreds of positions over the whole
    vocabulary) those fills took a quarter of a step; a split's backward is one concatenation."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    lengths = [len(teacher.rows[j]) - 1 for teacher, mine in zip(teachers, chosen) for j in mine]
    if logits.dim() == 2:
        if sum(lengths) != logits.shape[0]:
            raise ValueError(f"anchor logits hold {logits.shape[0]} positions, the chosen anchors {sum(lengths)}")
        rows = logits.split(lengths)
    else:
        rows = tuple(row[:n] for row, n in zip(logits.unbind(0), lengths))
    pieces, per_owner = iter(rows), []
    for teacher, mine in zip(teachers, chosen):
        terms = []
        for j in mine:
            log_q = F.log_softmax(next(pieces).to(dtype), dim=-1)
            log_p = teacher.log_probs[j]
            terms.append((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        per_owner.append(torch.stack(terms).mean())
    return torch.stack(per_owner)
