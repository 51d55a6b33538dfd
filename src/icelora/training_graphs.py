"""The training pass of an ICE step, forward and backward, replayed from CUDA graphs.

Once the sampling passes replay from CUDA graphs (:mod:`icelora.sampling_graphs`), what is left
of a step on a GPU is the training pass: the student rows ``q + x* + x_c`` and the locality
anchors riding along with them, forward and backward. Its shape is the same at every step of an
edit too: the student rows are fixed by the edit's layout, and the anchors a step draws are as
many at every step and are padded to the widest row of the edit's anchor set. Only the tokens, the
padding and the LoRA weights (updated in place) change.

:class:`FixedShapeForward` runs that pass with a 4-D attention mask prepared from the padding
(so the model asks the host nothing). On CUDA, the first call of a shape runs eagerly (kernel
choice and other first-call work); the second records the forward and the backward to the
trainable tensors as two CUDA graphs sharing one memory pool, and that call and every later one
replay them through an autograd function: the forward graph gives the logits, and the backward
graph, run when the loss is back-propagated, gives the trainable tensors' gradients. The loss
itself (cross-entropy, KL terms) stays eager. A recording that fails is logged and the pass runs
eagerly from then on.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from icelora.sampling_graphs import capturing, compute_dtype, prepared_mask, recorded

log = logging.getLogger(__name__)

#: Models whose training pass failed to record: it is not tried again for them (their sampling
#: passes, with a set of their own in :mod:`icelora.sampling_graphs`, may still be recorded).
_UNRECORDABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass
class Recording:
    """The recorded forward and backward of one shape, with the tensors they read and write."""

    inputs: dict[str, torch.Tensor]
    trainable: tuple[torch.Tensor, ...]
    logits: torch.Tensor
    grad_logits: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]
    forward_graph: torch.cuda.CUDAGraph
    backward_graph: torch.cuda.CUDAGraph

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.inputs["input_ids"].shape)


class ReplayedPass(torch.autograd.Function):
    """The recorded forward as an autograd function of the trainable tensors: its backward
    replays the recorded backward with the incoming gradient of the logits."""

    @staticmethod
    def forward(ctx, recording: Recording, *trainable: torch.Tensor) -> torch.Tensor:
        ctx.recording = recording
        recording.forward_graph.replay()
        return recording.logits.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        recording: Recording = ctx.recording
        recording.grad_logits.copy_(grad)
        recording.backward_graph.replay()
        # copies: the recorded gradients are overwritten by the next replay
        return None, *(None if g is None else g.clone() for g in recording.grads)


def trainable_aliases(model: nn.Module) -> dict[str, torch.Tensor]:
    """A fresh alias of each trainable tensor of ``model`` (same storage: in-place updates of the
    tensor show in the alias), a leaf of its own for autograd."""
    return {name: p.detach().requires_grad_() for name, p in model.named_parameters() if p.requires_grad}


def aliased_logits(model: nn.Module, aliases: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
                   ) -> torch.Tensor:
    """``model(**inputs).logits`` with the trainable tensors seen through ``aliases``."""
    return functional_call(model, aliases, args=(), kwargs={**inputs, "use_cache": False}).logits


def record(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Recording:
    """Record ``model(**inputs).logits`` and the backward from those logits to the model's
    trainable tensors as CUDA graphs (on the shared capture stream, one pool for both).

    The recorded passes see the trainable tensors through aliases made for the capture: the
    tensors' own gradient accumulators were made on another stream by earlier eager passes, and a
    backward reaching them from the capture stream would wait on that stream, which a capture may
    not do."""
    static = {name: tensor.clone() for name, tensor in inputs.items()}
    trainable = tuple(p for p in model.parameters() if p.requires_grad)
    forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with capturing(inputs["input_ids"].device) as pool:
        aliases = trainable_aliases(model)
        logits = recorded(forward_graph, pool, lambda: aliased_logits(model, aliases, static))
        grad_logits = torch.zeros_like(logits)
        grads = recorded(backward_graph, pool, lambda: torch.autograd.grad(
            logits, tuple(aliases.values()), grad_logits, allow_unused=True))
    return Recording(static, trainable, logits, grad_logits, grads, forward_graph, backward_graph)


class FixedShapeForward:
    """The logits of right-padded rows, computed with a prepared 4-D attention mask; with
    ``graphs`` on CUDA, recorded at the second call of a shape and replayed from then on (calls of
    another shape run eagerly). Made once per edit: a recording holds that edit's tensors."""

    def __init__(self, graphs: bool) -> None:
        self.graphs = graphs
        self.seen: tuple[int, ...] | None = None
        self.recording: Recording | None = None
        self.replays = 0

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, width, vocab]``; ``attention_mask``: [rows, width], 1 on real tokens."""
        mask = prepared_mask(model, attention_mask, input_ids.shape[1], compute_dtype(model))
        inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
        shape = tuple(input_ids.shape)
        usable = self.graphs and input_ids.is_cuda and torch.is_grad_enabled()
        if usable and self.recording is None and self.seen == shape and model not in _UNRECORDABLE:
            try:
                self.recording = record(model, inputs)
            except Exception as error:  # any failure to record leaves the eager pass
                log.warning("training pass not recorded as CUDA graphs (%s); running it eagerly from now on", error)
                _UNRECORDABLE.add(model)
                self.graphs = False
        recording = self.recording
        if usable and recording is not None and recording.shape == shape:
            for name, tensor in inputs.items():
                recording.inputs[name].copy_(tensor)
            self.replays += 1
            return ReplayedPass.apply(recording, *recording.trainable)
        self.seen = shape
        return model(**inputs, use_cache=False).logits
