"""The one editing loop every method runs: objective, optimizer step, optional clamp, early stop."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from icelora.config import AUTOCAST_DTYPES, EditConfig
from icelora.losses import LossParts
from icelora.parameterization import Parameterization

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """Loss parts of one optimizer step (measured before the step's update)."""

    step: int
    loss: float
    ft: float
    ice: float
    target_learned: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        """The record as a JSON-ready mapping."""
        return asdict(self)


def should_stop(history: list[StepRecord], config: EditConfig) -> bool:
    """Early stop once the target is learned, its loss is flat and, where set, low enough.

    Learned: the greedy, teacher-forced, context-free prediction of every target token is right in
    each of the last ``early_stop_patience`` steps. Flat: over those steps the target cross-entropy
    (``ft``, nats per token) moved by at most ``early_stop_tolerance`` from step to step. Low
    enough (``early_stop_target_loss`` set): ``ft`` is at most that in each of those steps; a target
    just past the argmax is not yet learned firmly enough to hold under a rephrased prompt. The
    ICE term is left out of the test: it is a sampled estimate and never settles. Patience 0
    looks at the last step alone, with no flatness test.
    """
    k = config.early_stop_patience
    bound = config.early_stop_target_loss
    if k == 0:
        return bool(history) and history[-1].target_learned and (bound is None or history[-1].ft <= bound)
    if len(history) < k + 1:
        return False
    recent = history[-(k + 1):]
    if not all(r.target_learned and (bound is None or r.ft <= bound) for r in recent[1:]):
        return False
    return all(abs(b.ft - a.ft) <= config.early_stop_tolerance for a, b in itertools.pairwise(recent))


def autocast(model: nn.Module, config: EditConfig) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on the model's device in ``config.autocast_dtype`` (or nothing)."""
    dtype = AUTOCAST_DTYPES[config.autocast_dtype]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def make_optimizer(params: Parameterization | dict[str, torch.Tensor], config: EditConfig) -> torch.optim.Optimizer:
    """Adam over the trainable tensors (the ICE reference code's optimizer).

    With ``loraplus_lr_ratio`` other than 1 (LoRA+, Hayou et al., arXiv 2402.12354) the LoRA
    output projections ``B`` (tensors named ``.lora_B.``) form a second group whose learning rate
    is that many times ``learning_rate``; otherwise there is one group.
    """
    named = params if isinstance(params, dict) else params.named_trainable()
    ratio = config.loraplus_lr_ratio
    if ratio == 1:
        return torch.optim.Adam(list(named.values()), lr=config.learning_rate, weight_decay=config.weight_decay)
    outputs = [p for n, p in named.items() if ".lora_B." in n]
    inputs = [p for n, p in named.items() if ".lora_B." not in n]
    groups = [{"params": inputs}, {"params": outputs, "lr": config.learning_rate * ratio}]
    return torch.optim.Adam(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def run_edit_loop(model: nn.Module, params: Parameterization, objective: Callable[[nn.Module, int], LossParts],
                  config: EditConfig, progress: bool = True, optimizer: torch.optim.Optimizer | None = None,
                  start_step: int = 0, on_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
    """Minimise ``objective`` over ``params`` for at most ``config.max_steps`` Adam steps.

    ``optimizer`` and ``start_step`` continue a run from a checkpoint; ``on_step`` is called after
    every step (logging, checkpoints).
    """
    optimizer = optimizer or make_optimizer(params, config)
    history: list[StepRecord] = []
    bar = tqdm(range(start_step, config.max_steps), desc="editing", leave=False, disable=not progress or None)
    params.training(True)
    try:
        for step in bar:
            with autocast(model, config):
                parts = objective(model, step)
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            params.before_step()
            optimizer.step()
            params.after_step()
            # the step's numbers are read only now, after its update is queued on the device
            history.append(StepRecord(step, parts.total, parts.ft, parts.ice, parts.target_learned))
            bar.set_postfix(loss=f"{history[-1].loss:.3f}")
            log.debug("step %d loss %.4f ft %.4f ice %.4f learned %s", step, history[-1].loss,
                      parts.ft, parts.ice, parts.target_learned)
            if on_step is not None:
                on_step(history[-1])
            if config.early_stopping and should_stop(history, config):
                break
    finally:
        params.training(False)
        bar.close()
    return history


def run_independent_edit_loop(model: nn.Module, params: Parameterization, tensors: dict[str, torch.Tensor],
                              objective: Callable[[nn.Module, int, list[int]], LossParts], count: int,
                              config: EditConfig, progress: bool = True) -> list[list[StepRecord]]:
    """Train ``count`` independent edits together: one batched forward/backward per step.

    ``objective(model, step, active)`` returns the summed loss of the edits still running, each
    edit's rows going through its own adapter, so each adapter's gradient is the one it would get
    alone. An edit that stops early leaves the batch: its tensors get no gradient from then on,
    and Adam skips tensors without a gradient, so they keep their values. ``tensors``: every
    edit's trainable tensors, by parameter name. Returns each edit's step history.
    """
    optimizer = make_optimizer(tensors, config)
    histories: list[list[StepRecord]] = [[] for _ in range(count)]
    active = list(range(count))
    bar = tqdm(range(config.max_steps), desc=f"editing {count} at once", leave=False,
               disable=not progress or None)
    params.training(True)
    try:
        for step in bar:
            with autocast(model, config):
                parts = objective(model, step, active)
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            params.before_step()
            optimizer.step()
            params.after_step()
            for k, part in zip(active, parts.per_request):
                histories[k].append(StepRecord(step, part.loss, part.ft, part.ice, part.learned))
            if config.early_stopping:
                active = [k for k in active if not should_stop(histories[k], config)]
            bar.set_postfix(running=len(active))
            if not active:
                break
    finally:
        params.training(False)
        bar.close()
    return histories
