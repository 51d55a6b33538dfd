"""Edit-aligned LoRA input projections: an adapter's ``A`` starts on the inputs of the edit itself.

A LoRA update ``dW = B A`` acts on an input ``k`` through ``A k``. PEFT starts ``A`` at random, so
on the edit's own inputs ``A k`` is about ``sqrt(r / n)`` of what it is on a row of ``A`` aligned
with ``k`` (``r`` rows, ``n`` input features), and the first steps of ``B`` (Adam moves each of its
elements by about the learning rate, whatever the gradient's size) change the edit's output that
much less. Starting the leading rows of ``A`` on the leading directions of the inputs the module
receives on the edit's prompt and target (ROME's key, in LoRA's terms), with ``B = 0`` still (the
adapter's update is zero until it trains), makes each step of ``B`` act on those inputs at full
strength and on inputs unlike them less. Under the null-space constraint
(:mod:`icelora.input_projection`) the edit's inputs are first projected off the protected
directions, so the aligned rows are blind to the anchors' inputs from the start.
"""

from __future__ import annotations

import torch

from icelora.input_projection import project_off

#: Directions whose singular value is under this share of the largest are left out (rounding).
RELATIVE_FLOOR = 1e-6


def leading_input_rows(inputs: torch.Tensor, rank: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal rows [m, in_features], ``m <= rank``: the leading right singular vectors of
    ``inputs`` [positions, in_features] (float64), after ``inputs`` are projected off the
    orthonormal columns ``protected`` [in_features, k] where given. Each row is signed so that the
    inputs' coefficients on it sum to a positive number (the SVD's sign is arbitrary); directions
    with a singular value under :data:`RELATIVE_FLOOR` of the largest are left out."""
    x = inputs.to(torch.float64, copy=True)
    if protected is not None:
        project_off(x, protected.to(x.device, x.dtype))
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    if not s.numel() or not s[0] > 0:
        return x.new_zeros(0, x.shape[1])
    kept = min(rank, int((s > RELATIVE_FLOOR * s[0]).sum()))
    rows = vh[:kept]
    signs = torch.where((x @ rows.T).sum(0) < 0, -1.0, 1.0).to(rows.dtype)
    return rows * signs[:, None]


@torch.no_grad()
def align_rows(weight: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: the first ``len(rows)`` rows of ``weight`` [r, in_features] become ``rows``, each
    scaled to the norm of the row it replaces (so the adapter's scale at initialisation is kept)."""
    m = rows.shape[0]
    norms = weight[:m].norm(dim=1, keepdim=True)
    weight[:m] = (rows.to(weight.device, weight.dtype) * norms)
