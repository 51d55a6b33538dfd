"""Comparing generated text with targets."""

from __future__ import annotations


def normalise(text: str) -> str:
    """Lower-case with runs of whitespace collapsed, for comparing generations with targets."""
    return " ".join(text.split()).lower()


def starts_with_target(generation: str, target: str) -> bool:
    """True when the generation starts with the target (whitespace and case normalised)."""
    return normalise(generation).startswith(normalise(target))
