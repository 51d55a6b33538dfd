"""Deterministic, seeded context sentences for requests that bring none.

ICE conditions the model on sentences stating the new fact. The ICE data set ships five per ZsRE
record; for every other request these templates write them from the request's subject, prompt and
target. The choice and order of templates depend only on the seed and the request text, never on
Python's randomised ``hash``.
"""

from __future__ import annotations

import hashlib
import random

from icelora.request import EditRequest

#: Templates stating the fact; ``{fact}`` is the prompt completed by the target.
FACT_TEMPLATES = (
    "{fact}.",
    "Fact: {fact}.",
    "New information: {fact}.",
    "It is now true that {fact_lower}.",
    "Remember this: {fact}.",
    "As recently updated, {fact_lower}.",
    "According to the latest records, {fact_lower}.",
    "Note that {fact_lower}.",
)
#: Templates for question-shaped prompts (ZsRE): the question answered by the target.
QUESTION_TEMPLATES = (
    "Q: {prompt} A: {target}.",
    "{prompt} The answer is {target}.",
    "Question: {prompt} Answer: {target}.",
    "If asked \"{prompt}\", the correct answer is {target}.",
)
#: Templates that name the subject; used when the request has one.
SUBJECT_TEMPLATES = (
    "Here is a new fact about {subject}: {fact}.",
    "{subject}: {target}.",
)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:1].isupper() and not text[1:2].isupper() else text


def request_seed(request: EditRequest, seed: int) -> int:
    """A stable 64-bit seed from ``seed`` and the request's text."""
    digest = hashlib.sha256(f"{seed}\x00{request.prompt}\x00{request.target}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def template_contexts(request: EditRequest, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct context sentences stating ``request``'s fact, in a seeded order."""
    prompt, target = request.prompt, request.target
    question = prompt.rstrip().endswith("?")
    fact = f"{prompt.rstrip('?').rstrip()} {target}" if not question else f"{prompt} {target}"
    values = {"prompt": prompt, "target": target, "fact": fact, "fact_lower": _lower_first(fact),
              "subject": request.subject or ""}
    pool = list(QUESTION_TEMPLATES if question else FACT_TEMPLATES)
    if request.subject and not question:
        pool += SUBJECT_TEMPLATES
    rng = random.Random(request_seed(request, seed))
    rng.shuffle(pool)
    while len(pool) < count:  # more contexts asked for than templates: repeat in a new order
        extra = list(pool[: len(FACT_TEMPLATES)])
        rng.shuffle(extra)
        pool += extra
    return [t.format(**values) for t in pool[:count]]


def contexts_for(request: EditRequest, count: int, seed: int = 0) -> list[str]:
    """The request's own contexts (first ``count``) when it has them, else template contexts."""
    if request.contexts:
        return list(request.contexts[:count])
    return template_contexts(request, count, seed)
