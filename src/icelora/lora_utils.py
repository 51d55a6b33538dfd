"""LoRA adapters through PEFT: the adapter config for chosen layers and roles, and merged weights."""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from icelora.architecture import ArchitectureMap
from icelora.config import EditConfig

ADAPTER_NAME = "default"
#: The name PEFT's ``adapter_names`` routing gives rows that go through no adapter.
BASE_ROWS = "__base__"


def build_lora_config(arch: ArchitectureMap, config: EditConfig, layers: list[int]) -> LoraConfig:
    """A PEFT ``LoraConfig`` on the exact module names of ``config.target_modules`` in ``layers``."""
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=arch.module_names(layers, config.target_modules),
        fan_in_fan_out=arch.uses_conv1d,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: nn.Module, lora_config: LoraConfig, seed: int) -> PeftModel:
    """Wrap ``model`` with fresh adapters (seeded initialisation); the base weights stay frozen."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT reads the model's deprecated ``is_gradient_checkpointing``; the warning is PEFT's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, lora_config, adapter_name=ADAPTER_NAME)


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The adapted modules of ``model`` by their name in the base model."""
    return {name: module for name, module in model.get_base_model().named_modules()
            if isinstance(module, LoraLayer)}


def merged_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded into its weight, under the base names.

    Nothing in ``model`` is changed (unlike ``merge_and_unload``), so editing can go on after export.
    """
    base = model.get_base_model()
    adapted = lora_layers(model)
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        merged[key.replace(".base_layer.", ".")] = tensor
    with torch.no_grad():
        for name, module in adapted.items():
            weight = module.get_base_layer().weight
            merged[f"{name}.weight"] = (weight + module.get_delta_weight(ADAPTER_NAME).to(weight.dtype)).detach()
    return merged
