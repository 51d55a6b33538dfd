"""Where the editable matrices of a decoder-only transformer live, found by inspecting the model.

All architecture knowledge of icelora is in this module. Nothing here looks at a model's name:
the decoder blocks are the ``nn.ModuleList`` with one entry per hidden layer, the attention and
MLP sub-modules are recognised by their child names inside a block, and the MLP output projection
is the linear map from the intermediate width back to the hidden width.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from icelora.errors import ModelLoadError

ATTENTION_CHILD_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_CHILD_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
QUERY_NAMES = ("q_proj", "query", "q")
VALUE_NAMES = ("v_proj", "value", "v")
FUSED_QKV_NAMES = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv")

#: Roles a user can ask to edit, and what each covers.
MODULE_ROLES = ("attn_qv", "mlp_in", "mlp_out")


def unwrap(module: nn.Module) -> nn.Module:
    """The original layer inside an adapter wrapper (PEFT's ``get_base_layer``), else the module."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2's transposed ``Conv1D`` (also inside an adapter wrapper)."""
    return isinstance(unwrap(module), (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    module = unwrap(module)
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


@dataclass(frozen=True)
class ArchitectureMap:
    """Names (relative to the model root) of the editable parts of every decoder layer.

    ``attn_query`` and ``attn_value`` are the same module when the model fuses q, k and v into
    one projection (GPT-2's ``c_attn``).
    """

    layers_path: str
    num_layers: int
    hidden_size: int
    attn_query: str
    attn_value: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    uses_conv1d: bool

    def layer_prefix(self, layer: int) -> str:
        """Full module name of decoder layer ``layer``."""
        return f"{self.layers_path}.{layer}"

    def module_names(self, layers: list[int], roles: list[str]) -> list[str]:
        """Full module names of the given roles in the given layers, in a stable order."""
        for layer in layers:
            if not 0 <= layer < self.num_layers:
                raise ModelLoadError(
                    f"layer {layer} does not exist: the model has layers 0..{self.num_layers - 1}"
                )
        unknown = sorted(set(roles) - set(MODULE_ROLES))
        if unknown:
            raise ModelLoadError(f"unknown module role(s) {unknown}; choose from {list(MODULE_ROLES)}")
        names: list[str] = []
        for layer in layers:
            prefix = self.layer_prefix(layer)
            relative: list[str] = []
            if "attn_qv" in roles:
                relative += [self.attn_query, self.attn_value]
            if "mlp_in" in roles:
                relative += list(self.mlp_in)
            if "mlp_out" in roles:
                relative.append(self.mlp_out)
            for rel in dict.fromkeys(relative):  # keeps order, drops the fused duplicate
                names.append(f"{prefix}.{rel}")
        return names


def find_decoder_layers(model: nn.Module, num_layers: int) -> str:
    """Name of the ``nn.ModuleList`` holding the decoder blocks (the longest list of that length)."""
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name
    ]
    if not candidates:
        raise ModelLoadError(f"no list of {num_layers} decoder layers found in {type(model).__name__}")
    return min(candidates, key=lambda n: n.count("."))


def _child(block: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    children = dict(block.named_children())
    for name in names:
        if name in children:
            return name, children[name]
    return None


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return model.get_input_embeddings().weight.shape[1]


def _num_layers(model: nn.Module) -> int:
    config = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ModelLoadError(f"{type(model).__name__}: its config names no number of layers")


def base_model(model: nn.Module) -> nn.Module:
    """The model inside an adapter wrapper (PEFT's ``get_base_model``), else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def inspect_architecture(model: nn.Module) -> ArchitectureMap:
    """Find the decoder layers, attention query/value and MLP projections of ``model``."""
    base = base_model(model)
    num_layers = _num_layers(base)
    hidden = _hidden_size(base)
    layers_path = find_decoder_layers(base, num_layers)
    block = base.get_submodule(f"{layers_path}.0")
    model_name = type(base).__name__
    if base.get_output_embeddings() is None:  # every loss reads its logits through it (icelora.output_layer)
        raise ModelLoadError(f"{model_name}: no output layer (get_output_embeddings() is None); "
                             "a causal language model with its language-modelling head is needed")

    attention = _child(block, ATTENTION_CHILD_NAMES)
    if attention is None:
        raise ModelLoadError(f"{model_name}: no attention module among {list(dict(block.named_children()))}")
    attn_name, attn = attention
    query = _child(attn, QUERY_NAMES)
    value = _child(attn, VALUE_NAMES)
    if query is None or value is None:
        fused = _child(attn, FUSED_QKV_NAMES)
        if fused is None:
            raise ModelLoadError(f"{model_name}: no query/value projection in {attn_name}")
        query = value = fused

    mlp = _child(block, MLP_CHILD_NAMES)
    if mlp is None:
        raise ModelLoadError(f"{model_name}: no MLP module among {list(dict(block.named_children()))}")
    mlp_name, mlp_module = mlp
    mlp_in: list[str] = []
    mlp_out: str | None = None
    for child_name, child in mlp_module.named_children():
        if not is_linear(child):
            continue
        fan_in, fan_out = linear_shape(child)
        if fan_out == hidden and fan_in != hidden:
            mlp_out = child_name
        else:
            mlp_in.append(child_name)
    if mlp_out is None or not mlp_in:
        raise ModelLoadError(f"{model_name}: could not tell the MLP input and output projections apart")

    uses_conv1d = any(isinstance(unwrap(m), Conv1D) for m in block.modules())
    return ArchitectureMap(
        layers_path=layers_path,
        num_layers=num_layers,
        hidden_size=hidden,
        attn_query=f"{attn_name}.{query[0]}",
        attn_value=f"{attn_name}.{value[0]}",
        mlp_in=tuple(f"{mlp_name}.{n}" for n in mlp_in),
        mlp_out=f"{mlp_name}.{mlp_out}",
        uses_conv1d=uses_conv1d,
    )


@contextmanager
def first_layers_only(model: nn.Module, arch: ArchitectureMap, count: int) -> Iterator[None]:
    """Within the block ``model`` (or the base model of an adapter wrapper) runs only its first
    ``count`` decoder layers, for a pass that needs no more than what those layers see: the rest
    are skipped, and the final norm and output layer read the last one kept. The model's own list
    of layers is put back after the block, also on an error."""
    parent_path, _, name = arch.layers_path.rpartition(".")
    parent = base_model(model).get_submodule(parent_path)
    layers = getattr(parent, name)
    setattr(parent, name, layers[:count])
    try:
        yield
    finally:
        setattr(parent, name, layers)


def default_edit_layers(num_layers: int, count: int = 5) -> list[int]:
    """``count`` consecutive layers starting at ~15% depth (layers 4-8 of a 30- or 32-layer model).

    This is where the ICE reference code edits Llama-2-7B (layers 4..8 of 32).
    """
    count = min(count, num_layers)
    start = min(round(0.15 * num_layers), num_layers - count)
    return list(range(start, start + count))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device
