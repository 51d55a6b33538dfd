"""Attention in float32 for the passes that train on the CPU with bfloat16 or float16 activations.

PyTorch's CPU flash-attention kernel, the one ``scaled_dot_product_attention`` picks there, runs a
forward and backward pass 3.6 to 4.8 times slower on bfloat16 inputs than on the same inputs cast
to float32: for the 80 rows of 14 tokens (9 heads of 64) of 16 edits trained together, 30.6
against 6.4 ms; for one edit's 5 rows, 2.2 against 0.55 ms (``benchmarks/attention_backward_speed.py``,
``benchmarks/results/attention_backward_speed_cpu.txt``; the math kernel in bfloat16 is about as
fast as the cast, with the same rounding). Editing on bfloat16 weights (``frozen_dtype``, or a
model loaded in bfloat16) spent a tenth of a single edit's step and a tenth of the time of 16
edits trained together in that backward (``benchmarks/results/profile_smollm2_cpu_ice-lora_bf16.log``,
``..._bf16_x16_before_split.log``, made by ``benchmarks/profile_edit.py``). Within :func:`float32_training_attention`,
transformers' ``sdpa`` attention casts query, key and value to float32 in every pass that records
gradients on the CPU and casts its output back: a float32 softmax (as the kernel's own
accumulation) and the float32 backward. Passes without gradients (sampling, evaluation), float32
activations and other devices go to transformers' own function unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: The attention implementation this module stands in for, by its name in transformers.
SDPA = "sdpa"
#: Activation dtypes whose CPU attention backward runs faster in float32.
NARROW = (torch.bfloat16, torch.float16)


def trains_in_float32(query: torch.Tensor) -> bool:
    """Whether the attention over ``query`` runs in float32: a pass that records gradients, on the
    CPU, on bfloat16 or float16 activations."""
    return torch.is_grad_enabled() and query.device.type == "cpu" and query.dtype in NARROW


def sdpa_float32_when_training(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' ``sdpa`` attention, in float32 where :func:`trains_in_float32` says so."""
    if not trains_in_float32(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                             **kwargs)
    return output.to(query.dtype), weights


@contextmanager
def float32_training_attention() -> Iterator[None]:
    """Within the block, models whose attention is transformers' ``sdpa`` run it through
    :func:`sdpa_float32_when_training`; the previous function is back afterwards."""
    before = ALL_ATTENTION_FUNCTIONS._local_mapping.get(SDPA)
    ALL_ATTENTION_FUNCTIONS[SDPA] = sdpa_float32_when_training
    try:
        yield
    finally:
        if before is None:
            del ALL_ATTENTION_FUNCTIONS[SDPA]
        else:
            ALL_ATTENTION_FUNCTIONS[SDPA] = before
