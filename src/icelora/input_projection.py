"""Null-space LoRA: keep an adapter blind to the inputs its module sees on the locality anchors.

A LoRA update of a module is ``dW = B A``; on an input ``k`` it adds ``B A k``. If every row of
``A`` is orthogonal to a set of inputs ``K``, the update leaves the module's output on them exactly
as it was: ``B A k = 0`` for every ``k`` in ``span(K)``. This is the null-space idea of AlphaEdit
(Fang et al., 2024) applied to LoRA's input projection, with ``K`` the inputs the module receives
(before the edit) at every position of the edit's locality anchors, so the constraint is hard
where the locality term's KL is soft.

All the anchors' inputs together span nearly the whole input space, so only their leading
directions are removed: the fewest left singular vectors of ``K`` holding ``energy`` of its
squared singular values (the uncentred second moment), which include the directions that every
token's input shares. After each optimizer step, ``A <- A - (A U) U^T``; in sequential editing
under ``lora_projection_scope`` ``edit``, ``A <- A - (A U - A_0 U) U^T`` with ``A_0`` the adapter
before the edit, so earlier edits' part of ``A`` is kept and only the new edit's change is blind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from icelora.output_layer import OutputLayerNotCalledError, output_layer_reads
from icelora.tokenization import pad_rows, to_device


@torch.no_grad()
def module_inputs(model: nn.Module, modules: dict[str, nn.Module], rows: Sequence[Sequence[int]], pad_id: int,
                  **forward_kwargs: Any) -> dict[str, torch.Tensor]:
    """The input each of ``modules`` receives at every real (unpadded) position of token ``rows``
    in one forward pass of ``model`` (given ``forward_kwargs`` too, e.g. adapter routing):
    name -> [positions, in_features], in float32. Modules handed the very same input one after
    the other (a gated MLP's gate and up projections) share one tensor, so that what is derived
    from it can be derived once (:func:`per_distinct_input`). The output layer reads no position: no
    logits are needed (over the anchors of 16 edits, 7,840 padded positions, that product alone
    took 0.43 s on 2 CPU cores)."""
    device = next(model.parameters()).device
    batch = pad_rows([tuple(r) for r in rows], pad_id, device=device)
    rows_at, positions_at = batch.real_positions(device)
    seen: dict[str, torch.Tensor] = {}
    last: list[torch.Tensor] = []  # the latest input handed over and what was kept of it (held: no id reuse)

    def keep(name: str, given: torch.Tensor) -> None:
        if not last or last[0] is not given:
            last[:] = [given, given[rows_at, positions_at].float()]
        seen[name] = last[1]

    hooks = [module.register_forward_pre_hook(lambda _m, args, name=name: keep(name, args[0]))
             for name, module in modules.items()]
    try:
        with output_layer_reads(model, lambda hidden: hidden[:, :0]):
            model(**batch.forward_kwargs(), use_cache=False, **forward_kwargs)
    except OutputLayerNotCalledError:
        pass  # the model makes its logits another way: made in full, and not needed
    finally:
        for hook in hooks:
            hook.remove()
        last.clear()
    return seen


def distinct_inputs(inputs: dict[str, Any]) -> list[list[str]]:
    """The names of ``inputs`` grouped by the object each maps to (modules sharing an input, as
    :func:`module_inputs` returns them), in first-seen order."""
    groups: dict[int, list[str]] = {}
    for name, value in inputs.items():
        groups.setdefault(id(value), []).append(name)
    return list(groups.values())


def per_distinct_input(inputs: dict[str, Any], derive: Callable[[Any], Any]) -> dict[str, Any]:
    """``derive`` of each value of ``inputs``, called once per distinct object (in first-seen
    order): names sharing an input (:func:`distinct_inputs`) share what is derived from it."""
    made: dict[str, Any] = {}
    for names in distinct_inputs(inputs):
        made.update(dict.fromkeys(names, derive(inputs[names[0]])))
    return {name: made[name] for name in inputs}


#: The smallest eigenvalue of the Gram matrix, relative to its largest, that :func:`gram_directions`
#: divides by (a singular value 1e-5 of the largest); below it the SVD is taken.
GRAM_FLOOR = 1e-10


def leading_directions(inputs: torch.Tensor, energy: float) -> torch.Tensor:
    """Orthonormal columns [in_features, k]: the fewest left singular vectors of ``inputs.T``
    ([positions, in_features] given) whose squared singular values hold ``energy`` of the total.

    Through :func:`gram_directions`, the same subspace as :func:`svd_directions` from a smaller
    eigendecomposition: 0.3-0.4 of the float64 SVD's time on an H200
    (``benchmarks/results/cuda-h200-relation-anchors/2-directions.txt``), 0.2-0.6 on 2 CPU cores
    at one edit's sizes (``benchmarks/results/direction_speed_cpu_xeon.txt``); both made with
    ``benchmarks/direction_speed.py``."""
    return leading_directions_each([inputs], energy)[0]


def leading_directions_each(inputs: Sequence[torch.Tensor], energy: float) -> list[torch.Tensor]:
    """:func:`leading_directions` of each of ``inputs`` (one module's inputs for several adapters,
    all on one device, of one width), through :func:`gram_directions_each`, which decomposes them
    all in one batched call on the host."""
    return gram_directions_each(inputs, energy)


def svd_directions(inputs: torch.Tensor, energy: float) -> torch.Tensor:
    """:func:`leading_directions` from the float64 SVD of ``inputs.T``, on the device of ``inputs``."""
    u, s, _ = torch.linalg.svd(inputs.T.double(), full_matrices=False)
    return u[:, :directions_kept(s**2, energy)].to(directions_dtype(inputs.dtype))


def gram_directions(inputs: torch.Tensor, energy: float) -> torch.Tensor:
    """:func:`leading_directions` through the smaller Gram matrix of ``X = inputs`` [P, n], in float64:
    for ``P >= n`` the eigenvectors of ``X^T X`` [n, n] are the directions themselves; for ``P < n``
    those of ``X X^T`` [P, P] are the right singular vectors ``V``, and ``U = X^T V S^-1``. The
    Gram matrix is formed on the device of ``inputs``, decomposed on the host (one copy, and ``k``
    read there), and the directions are formed back on the device. Where the last direction kept
    is too weak for ``S^-1`` to be accurate (its eigenvalue under :data:`GRAM_FLOOR` of the largest;
    all-zero inputs too), :func:`svd_directions` of a host copy is taken instead."""
    return gram_directions_each([inputs], energy)[0]


def gram_directions_each(inputs: Sequence[torch.Tensor], energy: float) -> list[torch.Tensor]:
    """:func:`gram_directions` of each of ``inputs`` (all on one device, of one width ``n``), with
    one host copy and one batched eigendecomposition for those with fewer positions than ``n``
    and one for the rest. Within the first group each ``X X^T`` is zero-padded to the group's most
    positions: a zero row of ``X`` adds a zero eigenvalue and leaves the others and their
    eigenvectors (zero on the padding) as they were."""
    directions: dict[int, torch.Tensor] = {}
    wide = [i for i, x in enumerate(inputs) if x.shape[0] < x.shape[1]]
    tall = [i for i, x in enumerate(inputs) if x.shape[0] >= x.shape[1]]
    for group, is_tall in ((wide, False), (tall, True)):
        if not group:
            continue
        xs = [inputs[i].double() for i in group]
        side = xs[0].shape[1] if is_tall else max(x.shape[0] for x in xs)
        grams = xs[0].new_zeros(len(xs), side, side)
        for gram, x in zip(grams, xs):
            if is_tall:
                gram.copy_(x.T @ x)
            else:
                gram[: x.shape[0], : x.shape[0]] = x @ x.T
        values, vectors = torch.linalg.eigh(grams.cpu())  # ascending
        values, vectors = values.flip(-1).clamp(min=0), vectors.flip(-1)
        for i, x, value, vector in zip(group, xs, values, vectors):
            k = directions_kept(value, energy)
            if not value[k - 1] > GRAM_FLOOR * value[0]:
                directions[i] = svd_directions(inputs[i].detach().cpu(), energy).to(inputs[i].device)
            elif is_tall:
                directions[i] = to_device(vector[:, :k].contiguous(), x.device).to(directions_dtype(inputs[i].dtype))
            else:
                scaled = to_device((vector[: x.shape[0], :k] / value[:k].sqrt()).contiguous(), x.device)
                directions[i] = (x.T @ scaled).to(directions_dtype(inputs[i].dtype))
    return [directions[i] for i in range(len(inputs))]


def directions_dtype(inputs_dtype: torch.dtype) -> torch.dtype:
    """The dtype directions are returned in: the inputs', but at least float32 (the adapters' own;
    orthonormal directions rounded to bfloat16 would let 0.4% of them through the projection)."""
    return torch.promote_types(inputs_dtype, torch.float32)


def directions_kept(squares: torch.Tensor, energy: float) -> int:
    """The fewest leading directions whose squared singular values (``squares``, descending) hold
    ``energy`` of their sum."""
    if not 0 < energy < 1:
        raise ValueError(f"energy must be in (0, 1), got {energy!r}")
    share = squares.cumsum(0) / squares.sum()
    return int((share < energy).sum().item()) + 1


@torch.no_grad()
def project_off(weight: torch.Tensor, directions: torch.Tensor, held: torch.Tensor | None = None) -> None:
    """In place: ``weight [r, in] <- weight - (weight U - H) U^T``, so that ``weight U = H``
    (``directions`` U [in, k] orthonormal, in the weight's dtype; ``held`` H [r, k], zero when
    ``None``: the rows made orthogonal to ``U``). With ``H`` the value of ``weight U`` at some
    earlier time, only what changed since then is projected off."""
    coefficients = weight @ directions
    if held is not None:
        coefficients = coefficients - held
    weight.sub_(coefficients @ directions.T)
