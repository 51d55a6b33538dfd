"""Optimizer state in safetensors (tensors) plus JSON (everything else), for resumable training."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write ``optimizer.state_dict()`` without pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    (folder / OPTIMIZER_JSON).write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore a state written by :func:`save_optimizer` into an optimizer over the same parameters."""
    meta = json.loads((folder / OPTIMIZER_JSON).read_text())
    state: dict[int, dict] = {}
    for key, value in load_file(str(folder / OPTIMIZER_TENSORS)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
