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
(``tests/test_shared_prefix.py``). Only the prefix's last positions go through the output layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from icelora.tokenization import PaddedBatch, PromptTarget, TokenIndex, pad_rows, span_index, to_device


@dataclass
class PrefixLayout:
    """The fixed structure of the two passes of one edit call.

    ``batch``: one right-padded ``q + x*`` row per request; ``target``: the target tokens in it,
    ``labels`` their ids; ``requests``, ``last``: each request's row and last position (whose
    logits predict the first completion token); ``row_owner``: the request of each student row;
    ``positions``: the position ids of the continuation pass [R, m - 1]; ``keep``: how many of the
    prefix pass's last positions need logits (the target positions and after).
    """

    batch: PaddedBatch
    target: TokenIndex
    labels: torch.Tensor
    requests: torch.Tensor
    last: torch.Tensor
    row_owner: torch.Tensor
    positions: torch.Tensor
    keep: int

    @property
    def continued(self) -> int:
        """Completion tokens per student row that the continuation pass reads (``m - 1``)."""
        return self.positions.shape[1]


def prefix_layout(encoded: Sequence[PromptTarget], owners: Sequence[int], completion_length: int, pad_id: int,
                  device: torch.device | str) -> PrefixLayout:
    """The layout of requests ``encoded`` whose student rows belong to ``owners`` (a request each)."""
    batch = pad_rows([e.ids for e in encoded], pad_id, device=device)
    target = span_index(batch, [(e.target_start, len(e.ids)) for e in encoded], device)
    width = batch.input_ids.shape[1]
    lengths = [len(encoded[i].ids) for i in owners]
    positions = torch.tensor([[n + k for k in range(completion_length - 1)] for n in lengths], dtype=torch.long)
    return PrefixLayout(batch=batch, target=target, labels=target.labels(batch.input_ids),
                        requests=to_device(torch.arange(len(encoded)), device),
                        last=to_device(torch.tensor([len(e.ids) - 1 for e in encoded], dtype=torch.long), device),
                        row_owner=to_device(torch.tensor(list(owners), dtype=torch.long), device),
                        positions=to_device(positions.reshape(len(owners), completion_length - 1), device),
                        keep=width - min(e.target_start for e in encoded) + 1)


@dataclass
class PrefixLogits:
    """What the ICE loss reads from the two passes: the logits predicting each target token [N, V]
    (rows of ``layout.target``) and each completion token [R * m, V] (row by row)."""

    target: torch.Tensor
    completion: torch.Tensor


def continue_from_prefix(model: nn.Module, cache: Any, prefix_mask: torch.Tensor, layout: PrefixLayout,
                         tokens: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
    """Logits [R, m - 1, V] of the continuation pass: ``tokens[:, :m - 1]`` after each student
    row's cached prefix (``cache`` of the prefix pass, whose rows' attention is ``prefix_mask``)."""
    cache.reorder_cache(layout.row_owner)  # index_select: differentiable, the prefix gets the gradients
    steps = layout.continued
    mask = torch.cat([prefix_mask[layout.row_owner], prefix_mask.new_ones((len(layout.row_owner), steps))], dim=1)
    return model(input_ids=tokens[:, :steps], attention_mask=mask, position_ids=layout.positions, cache=cache,
                 use_cache=True, **forward_kwargs).logits


def shared_prefix_logits(model: nn.Module, layout: PrefixLayout, tokens: torch.Tensor,
                         prefix_kwargs: dict[str, torch.Tensor] | None = None,
                         prefix_route: dict[str, Any] | None = None, continuation_route: dict[str, Any] | None = None,
                         riders: int = 0) -> tuple[PrefixLogits, torch.Tensor | None]:
    """Both passes for the sampled completion ``tokens`` [R, m].

    ``prefix_kwargs``: the prefix pass's inputs when other rows ride along in it (``riders`` of
    them, after the prefix rows, padded to one width; their logits are returned too, at every
    position); by default the prefix rows alone. ``prefix_route``, ``continuation_route``: forward
    keyword arguments routing each pass's rows to their adapters.
    """
    kwargs = prefix_kwargs if prefix_kwargs is not None else layout.batch.forward_kwargs()
    keep = 0 if riders else layout.keep
    out = model(**kwargs, use_cache=True, logits_to_keep=keep, **(prefix_route or {}))
    logits = out.logits
    shift = kwargs["input_ids"].shape[1] - logits.shape[1]  # positions left out by logits_to_keep
    n = len(layout.last)
    target = logits[layout.target.rows, layout.target.positions - 1 - shift]
    first = logits[layout.requests, layout.last - shift][layout.row_owner]
    completion = first[:, None]
    if layout.continued:
        rest = continue_from_prefix(model, out.cache, kwargs["attention_mask"][:n], layout, tokens,
                                    **(continuation_route or {}))
        completion = torch.cat([completion, rest.to(first.dtype)], dim=1)
    rider_logits = logits[n:] if riders else None
    return PrefixLogits(target=target, completion=completion.reshape(-1, logits.shape[-1])), rider_logits
