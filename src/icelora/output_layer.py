"""The model's output layer on chosen hidden states only.

A causal language model ends with an output layer (vocabulary x hidden: 28M parameters, 113 MB in
float32, for SmolLM2-135M) applied to the hidden state of every position it is given. A training
pass that needs logits at a few positions of each row (the target tokens, the completion tokens,
the anchors' real tokens) pays for every padded or unused position, forward and backward; and on a
CPU each call reads the whole weight from memory, whatever the number of positions.

:func:`output_layer_reads` puts a forward pre-hook on the layer the model names as its output
embeddings: the layer reads what a given function makes of the hidden states it was handed (chosen
positions gathered into one row, say) instead. The model's own output layer, and whatever the model
does to its logits after it (soft-capping, scaling), still make the logits, so they equal the full
pass's at the positions chosen (up to float rounding: a matrix product over fewer rows may round
differently); the model returns the logits of what the layer read. A model whose forward pass
does not call that layer (one that multiplies by the embedding weight itself, say) is refused
when the block ends, instead of having its logits silently read at the wrong positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


def output_layer(model: nn.Module) -> nn.Module:
    """The module that turns ``model``'s last hidden states into logits."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} names no output layer (get_output_embeddings() is None)")
    return head


def with_input(module: nn.Module, args: tuple, kwargs: dict,
               change: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
    """A call's ``(args, kwargs)`` (as a forward pre-hook with kwargs sees them) with the layer's
    input, its first argument or ``input=``, replaced by ``change(input)``."""
    if args:
        return (change(args[0]), *args[1:]), kwargs
    if "input" not in kwargs:
        raise TypeError(f"{type(module).__name__} was called without its input as 'input' or first argument")
    return args, {**kwargs, "input": change(kwargs["input"])}


class OutputLayerNotCalledError(RuntimeError):
    """A forward pass inside :func:`output_layer_reads` never called the model's output layer."""


@contextlib.contextmanager
def output_layer_reads(model: nn.Module, select: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within it, ``model``'s output layer reads ``select(hidden)`` in place of the hidden states
    [B, T, H] each forward pass hands it; the pass's logits are then the layer's output on that.
    ``select`` may keep what it is given for a later pass (gradients flow through it).

    Raises :class:`OutputLayerNotCalledError` when the block ends without the layer having been
    called (the model makes its logits some other way, so the selection would not apply)."""
    calls = 0

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        nonlocal calls
        calls += 1
        return with_input(module, args, kwargs, select)

    handle = output_layer(model).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
    if calls == 0:
        raise OutputLayerNotCalledError(
            f"{type(model).__name__}'s forward pass did not call the layer get_output_embeddings() names "
            f"({type(output_layer(model)).__name__}); icelora reads logits at chosen positions through that layer")
