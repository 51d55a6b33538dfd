"""Rows of one batch through different LoRA adapters without the host waiting on the device.

PEFT routes a mixed batch (``adapter_names=[...]``, one name per row) by indexing the batch with
Python lists, once per adapter and layer; each such index is a tensor made from host data, whose
copy to the device makes the host wait for all work queued before it. Edits trained together
(``ICELoRAEditor.edit_each(..., together=True)``) route every pass that way, so on a GPU the host
stopped hundreds of times per step.

Here the adapters a batch uses are concatenated into one pair of rank ``K·r`` and a per-row mask
keeps each row's own adapter's columns:

    delta(x_b) = B_cat ((A_cat x_b) * m_b),   A_cat = [A_1; ...; A_K],  B_cat = [B_1, ..., B_K],
    m_b = s_k on the r columns of adapter k when row b belongs to adapter k, 0 elsewhere

which is ``s_k B_k A_k x_b``, PEFT's result for that row (a ``"__base__"`` row gets 0), with the
same gradients. The mask of a routing is made once, on the host, copied to the device, and cached:
the steps of an edit route the same rows the same way, so later steps make no copy at all.
"""

from __future__ import annotations

from functools import lru_cache
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_lora_layer
from torch import nn

#: Keyword arguments PEFT passes for adapter variants; a plain LoRA ignores them.
_VARIANT_KWARGS = tuple(getattr(peft_lora_layer, "VARIANT_KWARG_KEYS", ("alora_offsets",)))


@lru_cache(maxsize=128)
def row_mask(row_adapters: tuple[str, ...], adapters: tuple[str, ...], ranks: tuple[int, ...],
             scalings: tuple[float, ...], device: str) -> torch.Tensor:
    """``[rows, sum(ranks)]`` float32 mask on ``device``: row b holds ``scalings[k]`` on the columns of
    ``adapters[k]`` when ``row_adapters[b]`` is that adapter, 0 elsewhere (cached: made once per routing)."""
    offsets = [sum(ranks[:k]) for k in range(len(ranks))]
    position = {name: k for k, name in enumerate(adapters)}
    mask = torch.zeros(len(row_adapters), sum(ranks))
    for row, name in enumerate(row_adapters):
        k = position.get(name)
        if k is not None:
            mask[row, offsets[k]:offsets[k] + ranks[k]] = scalings[k]
    return mask.to(device)


def _plain_lora(module: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` of ``module`` is plain LoRA (no variant, bias or dropout), the case
    the concatenated form computes exactly."""
    return (name not in getattr(module, "lora_variant", {})
            and not getattr(module, "use_dora", {}).get(name, False)
            and isinstance(module.lora_A[name], nn.Linear) and module.lora_B[name].bias is None
            and isinstance(module.lora_dropout[name], nn.Identity))


def routed_mixed_batch_forward(self: nn.Module, x: torch.Tensor, *args: Any, adapter_names: list[str],
                               **kwargs: Any) -> torch.Tensor:
    """Drop-in for PEFT's ``Linear._mixed_batch_forward``: the base layer plus each row's own adapter,
    through the concatenated adapters and the cached row mask. Falls back to PEFT's own method
    for adapters it does not cover (variants, DoRA, LoRA bias, dropout)."""
    adapters = tuple(sorted({name for name in adapter_names if name in self.lora_A}))
    if not adapters or not all(_plain_lora(self, name) for name in adapters):
        return type(self)._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    for key in _VARIANT_KWARGS:
        kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    a_cat = torch.cat([self.lora_A[name].weight for name in adapters])          # [K·r, in]
    b_cat = torch.cat([self.lora_B[name].weight for name in adapters], dim=1)   # [out, K·r]
    mask = row_mask(tuple(adapter_names), adapters, tuple(self.lora_A[n].weight.shape[0] for n in adapters),
                    tuple(float(self.scaling[n]) for n in adapters), str(x.device))
    hidden = F.linear(x.to(a_cat.dtype), a_cat)
    hidden = hidden * mask.view(mask.shape[0], *([1] * (hidden.dim() - 2)), mask.shape[1]).to(hidden.dtype)
    return result + F.linear(hidden, b_cat).to(result.dtype)


def install_row_routing(model: nn.Module) -> int:
    """Route mixed batches of every PEFT LoRA ``Linear`` in ``model`` through
    :func:`routed_mixed_batch_forward` (idempotent); returns the number of layers routed."""
    count = 0
    for module in model.modules():
        # the instance attribute set here (PEFT's method lives on the class) marks a routed layer
        if isinstance(module, peft_lora_layer.Linear) and "_mixed_batch_forward" not in vars(module):
            module._mixed_batch_forward = MethodType(routed_mixed_batch_forward, module)
            count += 1
    return count
