"""Comparing generated text with targets."""

from __future__ import annotations

import re

#: Where the answer at the start of a continuation ends: the first sentence or clause break (a
#: punctuation mark before a space or the end, so that "3.5" or "1,000" stay whole) or line break.
ANSWER_END = re.compile(r"[.,;:!?](?=\s|$)|\n")


def normalise(text: str) -> str:
    """Lower-case with runs of whitespace collapsed, for comparing generations with targets."""
    return " ".join(text.split()).lower()


def starts_with_target(generation: str, target: str, whole_words: bool = False) -> bool:
    """True when the generation starts with the target (whitespace and case normalised);
    ``whole_words``: and the target does not end inside a word of it ("Paris" not in "Parisian")."""
    text, start = normalise(generation), normalise(target)
    return text.startswith(start) and not (whole_words and text[len(start):][:1].isalnum())


def leading_answer(generation: str) -> str:
    """The answer a continuation starts with: its text before the first sentence or clause break
    (``"Leonardo da Vinci."`` gives ``"Leonardo da Vinci"``), whitespace stripped."""
    return ANSWER_END.split(generation, maxsplit=1)[0].strip()


def answer_kept(before: str, after: str) -> bool:
    """True when the continuation ``after`` an edit starts with the answer the one ``before`` it
    started with (:func:`leading_answer`) as whole words, whatever follows it ("Paris" is not kept
    by "Parisian"); where ``before`` starts with a break, True only for the same text."""
    answer = leading_answer(before)
    if not answer:
        return normalise(after) == normalise(before)
    return starts_with_target(after, answer, whole_words=True)


def unrelated_verdict(before: str, after: str) -> str:
    """How an unrelated prompt's continuation fared in an edit: ``"unchanged"`` (the same text),
    ``"answer kept, text changed"`` (:func:`answer_kept`) or ``"answer CHANGED"``."""
    if after == before:
        return "unchanged"
    return "answer kept, text changed" if answer_kept(before, after) else "answer CHANGED"
