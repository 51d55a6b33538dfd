"""The model's frozen weights held in a narrower dtype while an edit trains (``frozen_dtype``).

On a CPU with bfloat16 matrix units (Intel AMX, AVX512-BF16) a product on bfloat16 weights runs
several times faster than on float32 ones, and the few-row products of an editing step, which are
bound by reading the weights, read half the bytes. Under ``frozen_dtype: bfloat16`` each frozen
weight of the base model's blocks is copied to bfloat16 once and swapped in while an edit call
runs; the LoRA adapters stay in float32, and outside the call the model has its own weights back,
so using and evaluating the edited model is done in the model's own dtype.

The input embeddings and the output layer keep their own dtype: the logits are made in float32,
as the losses read them (bfloat16 logits near 20 are rounded to steps of 0.125, several percent
of each probability), and the embedding lookup costs nothing to keep. The hidden states are cast
to ``dtype`` as they leave the embeddings and back as they enter the output layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from icelora.output_layer import output_layer, with_input

log = logging.getLogger(__name__)


def fast_on_this_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (bfloat16: AVX512-BF16 or AMX)."""
    if dtype != torch.bfloat16:
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


class FrozenWeights:
    """Copies of ``model``'s weights in ``dtype`` (all but its input embeddings' and output
    layer's), made on first use and kept while the weights are unchanged (same storage, same
    version), swapped in by :meth:`swapped`. Call before adapters are added: every parameter the
    model has then is frozen."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self.embeddings = model.get_input_embeddings()
        self.head = output_layer(model)
        kept = {id(p) for module in (self.embeddings, self.head) for p in module.parameters()}
        self.parameters = [p for p in model.parameters() if id(p) not in kept]  # tied weights once
        self._copies: dict[int, tuple[int, int, torch.Tensor]] = {}
        devices = {p.device.type for p in self.parameters}
        if dtype is not None and "cpu" in devices and not fast_on_this_cpu(dtype):
            log.warning("frozen_dtype %s: this CPU has no hardware support for it; products may run slower "
                        "than in the model's own dtype", str(dtype).removeprefix("torch."))

    def _copy(self, param: nn.Parameter) -> torch.Tensor:
        key = (param.data_ptr(), param._version)
        kept = self._copies.get(id(param))
        if kept is None or kept[:2] != key:
            kept = (*key, param.detach().to(self.dtype))
            self._copies[id(param)] = kept
        return kept[2]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the frozen weights are the ``dtype`` copies, the hidden states cast to
        ``dtype`` after the embeddings and back before the output layer; after it, the originals.
        Nothing happens when ``dtype`` is ``None`` or the weights are in it already (a nested
        block changes nothing)."""
        swap = [p for p in self.parameters if p.dtype != self.dtype] if self.dtype is not None else []
        if not swap:
            yield
            return
        with ExitStack() as undo:
            for param in swap:
                undo.callback(setattr, param, "data", param.data)
                param.data = self._copy(param)
            undo.callback(self.embeddings.register_forward_hook(
                lambda module, args, out: out.to(self.dtype)).remove)
            undo.callback(self.head.register_forward_pre_hook(
                lambda module, args, kwargs: with_input(module, args, kwargs, lambda x: x.to(module.weight.dtype)),
                with_kwargs=True).remove)
            yield
