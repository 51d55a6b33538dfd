"""Token sequences for editing: prompt/target boundaries, padding on either side, and span masks.

Every mask is built from explicit token spans, never from pad or EOS ids, so it is right for
GPT-2 (no BOS, pad = EOS) and Llama-style tokenizers (BOS prepended, pad may equal EOS) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from icelora.errors import InvalidRequestError


@dataclass(frozen=True)
class PromptTarget:
    """Token ids of ``prefix + " " + target``; the target occupies ``ids[target_start:]``."""

    ids: tuple[int, ...]
    target_start: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.ids[self.target_start:]

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.ids[: self.target_start]


def encode_prompt_target(tokenizer: PreTrainedTokenizerBase, prefix: str, target: str,
                         strict: bool = True) -> PromptTarget:
    """Tokenize ``prefix + " " + target`` once, the way the model will read it, and find the target.

    The boundary comes from character offsets: target tokens are those that start at or after the
    end of ``prefix`` (the separating space belongs to the target, as in GPT-2's " Rome"). If the
    tokenizer merges across the boundary, prefix and target are encoded separately instead.
    Special tokens the tokenizer adds (a Llama BOS) stay in the prefix part. ``strict`` refuses a
    target holding characters the tokenizer maps to its unknown token (an edit could not teach it);
    evaluation scores such answers as they are.
    """
    text = f"{prefix} {target}"
    boundary = len(prefix)
    ids: list[int] | None = None
    start = 0
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        special = set(tokenizer.all_special_ids)
        start = len(offsets)
        straddles = False
        for i, (lo, hi) in enumerate(offsets):
            if enc["input_ids"][i] in special and lo == hi:
                continue
            if lo >= boundary:
                start = i
                break
            if hi > boundary and text[boundary:hi].strip():
                straddles = True
                break
        if not straddles:
            ids = list(enc["input_ids"])
            # A tokenizer that appends specials (EOS) after the text: keep them out of the target.
            while len(ids) > start and ids[-1] in special and offsets[len(ids) - 1][0] == offsets[len(ids) - 1][1]:
                ids.pop()
    if ids is None:
        prompt_ids = tokenizer(prefix)["input_ids"]
        target_only = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        ids, start = list(prompt_ids) + list(target_only), len(prompt_ids)
    target_ids = ids[start:]
    if not target_ids:
        raise InvalidRequestError(f"target {target!r} encodes to no tokens")
    unk = tokenizer.unk_token_id
    if strict and unk is not None and unk in target_ids and tokenizer.unk_token not in target:
        raise InvalidRequestError(f"target {target!r} holds characters the tokenizer cannot encode")
    if start == 0:
        raise InvalidRequestError(f"prompt {prefix!r} encodes to no tokens")
    return PromptTarget(ids=tuple(ids), target_start=start)


def check_encodable(tokenizer: PreTrainedTokenizerBase, text: str, field_name: str) -> list[int]:
    """Token ids of ``text``; an error naming ``field_name`` when it is empty or holds unknown tokens."""
    ids = tokenizer(text)["input_ids"]
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids and tokenizer.unk_token not in text):
        raise InvalidRequestError(f"{field_name} {text!r} holds characters the tokenizer cannot encode")
    return list(ids)


@dataclass
class PaddedBatch:
    """Padded rows with the masks and positions a forward pass needs.

    ``offsets[i]`` is where row i's first real token sits (the left-padding width; 0 on the right).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: list[int]
    lengths: list[int]

    def span_mask(self, spans: list[tuple[int, int]]) -> torch.Tensor:
        """Boolean [rows, width] mask, True on row i's tokens ``spans[i] = (start, end)`` (unpadded)."""
        mask = torch.zeros_like(self.input_ids, dtype=torch.bool)
        for i, (start, end) in enumerate(spans):
            if not 0 <= start <= end <= self.lengths[i]:
                raise ValueError(f"span {(start, end)} outside row {i} of length {self.lengths[i]}")
            mask[i, self.offsets[i] + start: self.offsets[i] + end] = True
        return mask

    def real_positions(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, positions) on ``device``: every real (unpadded) token, row by row, made from the
        host's offsets and lengths, so indexing with them reads nothing back from the device."""
        real = [(i, offset + k) for i, (offset, n) in enumerate(zip(self.offsets, self.lengths)) for k in range(n)]
        rows, positions = to_device(torch.tensor(real, dtype=torch.long).reshape(-1, 2).T, device)
        return rows, positions

    def forward_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(...)``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def pad_rows(rows: list[list[int]] | list[tuple[int, ...]], pad_id: int, side: str = "right",
             device: torch.device | str = "cpu") -> PaddedBatch:
    """Pad token rows to one width on ``side`` (``"left"`` or ``"right"``).

    Position ids count real tokens only, so left-padded rows get the same positions as unpadded
    ones (GPT-2's absolute positions need this).
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ValueError("no rows to pad")
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for i, row in enumerate(rows):
        offset = width - len(row) if side == "left" else 0
        ids[i, offset: offset + len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, offset: offset + len(row)] = 1
        offsets.append(offset)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return PaddedBatch(input_ids=to_device(ids, device), attention_mask=to_device(mask, device),
                       position_ids=to_device(positions, device), offsets=offsets, lengths=lengths)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor to ``device``; to a CUDA device through pinned memory, so the host does
    not wait for the work already queued on the device."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class TokenIndex:
    """Fixed positions of chosen tokens in a padded batch: token k sits at ``(rows[k], positions[k])``
    and is predicted by the logits one position earlier. Gathering by index keeps every shape known
    on the host, so no step waits for the device to count a mask."""

    rows: torch.Tensor
    positions: torch.Tensor

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V]: the logits that predict each chosen token."""
        return logits[self.rows, self.positions - 1]

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[N]: the chosen tokens themselves."""
        return input_ids[self.rows, self.positions]


def span_index(batch: PaddedBatch, spans: list[tuple[int, int]], device: torch.device | str) -> TokenIndex:
    """The tokens ``spans[i] = (start, end)`` of each row i (unpadded positions, ``start >= 1``), row
    by row, in the order ``next_token_view`` selects them."""
    rows, positions = [], []
    for i, (start, end) in enumerate(spans):
        if not 1 <= start <= end <= batch.lengths[i]:
            raise ValueError(f"span {(start, end)} outside row {i} of length {batch.lengths[i]} (or at its start)")
        rows += [i] * (end - start)
        positions += range(batch.offsets[i] + start, batch.offsets[i] + end)
    return TokenIndex(rows=to_device(torch.tensor(rows, dtype=torch.long), device),
                      positions=to_device(torch.tensor(positions, dtype=torch.long), device))


def next_token_view(logits: torch.Tensor, batch: PaddedBatch, token_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits with the tokens they predict.

    Returns (logits [N, V], labels [N], row index [N]) for the N tokens selected by ``token_mask``:
    the logits at position t-1 predict the token at position t.
    """
    shifted_mask = token_mask[:, 1:]
    pred_logits = logits[:, :-1][shifted_mask]
    labels = batch.input_ids[:, 1:][shifted_mask]
    rows = torch.arange(token_mask.shape[0], device=token_mask.device)[:, None].expand_as(shifted_mask)[shifted_mask]
    return pred_logits, labels, rows
