"""Self-induced completions: sample ``x_c`` from the context-conditioned model with a KV cache.

One cached decode gives both the sampled tokens and, for each of them, the model's untempered
next-token logits ``p(. | c, q, x*, x_c<t)``: the teacher distribution of the ICE loss. No second
forward pass with the context is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from icelora.tokenization import pad_rows


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


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    rows: list[tuple[int, ...]],
    pad_id: int,
    length: int,
    temperature: float,
    generator: torch.Generator,
    eos_ids: set[int],
) -> Completions:
    """Sample ``length`` tokens after each row (left-padded prefill, then cached decode steps).

    ``generator`` must live on the model's device.
    """
    device = next(model.parameters()).device
    batch = pad_rows(rows, pad_id, side="left", device=device)
    out = model(**batch.forward_kwargs(), use_cache=True, logits_to_keep=1)
    cache = out.cache
    logits = out.logits[:, -1].float()
    attention_mask = batch.attention_mask
    positions = batch.position_ids[:, -1:]
    tokens, teacher = [], []
    for step in range(length):
        probs = torch.softmax(logits / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)
        tokens.append(token)
        teacher.append(logits)
        if step + 1 == length:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        positions = positions + 1
        out = model(input_ids=token, attention_mask=attention_mask, position_ids=positions,
                    cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = out.logits[:, -1].float()
    sampled = torch.cat(tokens, dim=1)
    return Completions(tokens=sampled, teacher_logits=torch.stack(teacher, dim=1),
                       alive=alive_before_eos(sampled, eos_ids))
