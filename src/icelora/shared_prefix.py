"""The ICE training pass with each request's prompt and target encoded once.

Every student row of a request is ``q + x* + x_c``: the same prompt and target, then one of its
sampled completions. Run as whole rows, the pass repeats ``q + x*`` in each of them (5 times with
5 contexts), forward and backward. Here it runs in two passes instead:

1. the **prefix pass**: one row ``q + x*`` per request (right-padded), with a KV cache. Its logits
   at the target positions give the target cross-entropy (the same in each of the request's rows,
   so scoring it once gives the same mean), and its logits at the last position predict the first
   completion token of each of the request's rows;
2. the **continuation pass**: the first ``m - 1`` completion tokens of every student row, attending
   to its request's cached prefix (selected from the cache by index, so the gradients of the
   continuation flow back through the cached keys and values into the prefix pass). Its logits
   predict completion tokens ``2..m``.

The logits, and so the loss and its gradients, equal the whole-row pass's up to float rounding
(``tests/test_shared_prefix.py``). The output layer runs once for both passes, on the positions
whose logits the loss reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from icelora.output_layer import output_layer_reads
from icelora.tokenization import PaddedBatch, PromptTarget, TokenIndex, pad_rows, span_index, to_device


@dataclass
class PrefixLayout:
    """The fixed structure of the two passes of one edit call.

    ``batch``: one right-padded ``q + x*`` row per request; ``target``: the target tokens in it,
    ``labels`` their ids; ``read``: the (rows, positions) of the prefix pass whose logits are read:
    those predicting each target token, then each request's last position (predicting the first
    completion token); ``row_owner``: the request of each student row; ``positions``: the position
    ids of the continuation pass [R, m - 1].
    """

    batch: PaddedBatch
    target: TokenIndex
    labels: torch.Tensor
    read: tuple[torch.Tensor, torch.Tensor]
    row_owner: torch.Tensor
    positions: torch.Tensor

    @property
    def requests(self) -> int:
        """The number of requests (prefix rows)."""
        return self.batch.input_ids.shape[0]

    @property
    def continued(self) -> int:
        """Completion tokens per student row that the continuation pass reads (``m - 1``)."""
        return self.positions.shape[1]


def prefix_layout(encoded: Sequence[PromptTarget], owners: Sequence[int], completion_length: int, pad_id: int,
                  device: torch.device | str) -> PrefixLayout:
    """The layout of requests ``encoded`` whose student rows belong to ``owners`` (a request each)."""
    batch = pad_rows([e.ids for e in encoded], pad_id, device=device)
    target = span_index(batch, [(e.target_start, len(e.ids)) for e in encoded], device)
    last = to_device(torch.tensor([len(e.ids) - 1 for e in encoded], dtype=torch.long), device)
    read = (torch.cat([target.rows, to_device(torch.arange(len(encoded)), device)]),
            torch.cat([target.positions - 1, last]))
    lengths = [len(encoded[i].ids) for i in owners]
    positions = torch.tensor([[n + k for k in range(completion_length - 1)] for n in lengths], dtype=torch.long)
    return PrefixLayout(batch=batch, target=target, labels=target.labels(batch.input_ids), read=read,
                        row_owner=to_device(torch.tensor(list(owners), dtype=torch.long), device),
                        positions=to_device(positions.reshape(len(owners), completion_length - 1), device))


@dataclass
class PrefixLogits:
    """What the ICE loss reads from the two passes: the logits predicting each target token [N, V]
    (rows of ``layout.target``) and each completion token [R * m, V] (row by row); and, when rows
    rode along in the prefix pass, the logits at each rider row's positions ``0..len - 2``, row
    after row (``None`` otherwise)."""

    target: torch.Tensor
    completion: torch.Tensor
    riders: torch.Tensor | None = None


def rider_index(first_row: int, lengths: Sequence[int], device: torch.device | str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the rider rows' positions ``0..len - 2`` (those whose logits predict a
    next token of the row), the rider rows being rows ``first_row, first_row + 1, ...`` of a
    right-padded batch, of ``lengths`` real tokens."""
    rows = [first_row + i for i, n in enumerate(lengths) for _ in range(n - 1)]
    positions = [k for n in lengths for k in range(n - 1)]
    both = to_device(torch.tensor([rows, positions], dtype=torch.long), device)  # one copy to the device
    return both[0], both[1]


def continue_from_prefix(model: nn.Module, cache: Any, prefix_mask: torch.Tensor, layout: PrefixLayout,
                         tokens: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
    """Logits of the continuation pass (by default [R, m - 1, V]): ``tokens[:, :m - 1]`` after each
    student row's cached prefix (``cache`` of the prefix pass, whose rows' attention is
    ``prefix_mask``)."""
    cache.reorder_cache(layout.row_owner)  # index_select: differentiable, the prefix gets the gradients
    steps = layout.continued
    mask = torch.cat([prefix_mask[layout.row_owner], prefix_mask.new_ones((len(layout.row_owner), steps))], dim=1)
    return model(input_ids=tokens[:, :steps], attention_mask=mask, position_ids=layout.positions, cache=cache,
                 use_cache=True, **forward_kwargs).logits


def shared_prefix_logits(model: nn.Module, layout: PrefixLayout, tokens: torch.Tensor,
                         prefix_kwargs: dict[str, torch.Tensor] | None = None,
                         prefix_route: dict[str, Any] | None = None, continuation_route: dict[str, Any] | None = None,
                         rider_lengths: Sequence[int] = ()) -> PrefixLogits:
    """Both passes for the sampled completion ``tokens`` [R, m].

    ``prefix_kwargs``: the prefix pass's inputs when other rows ride along in it (rows of
    ``rider_lengths`` real tokens, after the prefix rows, right-padded to one width); by default
    the prefix rows alone. ``prefix_route``, ``continuation_route``: forward keyword arguments
    routing each pass's rows to their adapters.

    The output layer runs once, on the positions whose logits are read (:mod:`icelora.output_layer`):
    the prefix pass keeps the hidden states at the target positions, each request's last position
    and the riders' positions, and hands its output layer nothing; the continuation pass's output
    layer reads those and its own.
    """
    kwargs = prefix_kwargs if prefix_kwargs is not None else layout.batch.forward_kwargs()
    n = layout.requests
    rows, positions = layout.read
    if rider_lengths:
        extra_rows, extra_positions = rider_index(n, rider_lengths, positions.device)
        rows, positions = torch.cat([rows, extra_rows]), torch.cat([positions, extra_positions])
    kept: list[torch.Tensor] = []

    def keep(hidden: torch.Tensor) -> torch.Tensor:
        kept.append(hidden[rows, positions])
        return hidden[:, :0] if layout.continued else kept[0][None]

    with output_layer_reads(model, keep):
        out = model(**kwargs, use_cache=True, **(prefix_route or {}))
    if layout.continued:
        with output_layer_reads(model, lambda hidden: torch.cat([kept[0], hidden.flatten(0, 1)])[None]):
            logits = continue_from_prefix(model, out.cache, kwargs["attention_mask"][:n], layout, tokens,
                                          **(continuation_route or {}))[0]
    else:
        logits = out.logits[0]
    student_rows = len(layout.row_owner)
    sizes = [len(layout.target.rows), n, sum(length - 1 for length in rider_lengths), student_rows * layout.continued]
    if logits.shape[0] != sum(sizes):  # shapes are known on the host: no wait on the device
        raise RuntimeError(f"the shared-prefix passes gave logits for {logits.shape[0]} positions, expected "
                           f"{sum(sizes)} (targets, requests, rider positions, continued: {sizes})")
    target, first, rider, rest = logits.split(sizes)
    completion = torch.cat([first[layout.row_owner][:, None], rest.reshape(student_rows, -1, rest.shape[-1])], dim=1)
    return PrefixLogits(target=target, completion=completion.reshape(-1, logits.shape[-1]),
                        riders=rider if rider_lengths else None)
