"""PEFT adapters: seeded, attached without warnings of PEFT's making."""

import warnings

import torch
from peft import get_peft_model

from icelora.architecture import inspect_architecture
from icelora.config import EditConfig
from icelora.lora_utils import attach_lora, build_lora_config, lora_layers
from tests.conftest import tiny_llama


def _lora_config():
    model = tiny_llama().model
    return model, build_lora_config(inspect_architecture(model), EditConfig(lora_rank=4), [1])


def test_peft_itself_warns_about_gradient_checkpointing():
    model, config = _lora_config()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(model, config)
    assert any("is_gradient_checkpointing" in str(w.message) for w in caught)


def test_attach_lora_is_quiet_and_seeded():
    model, config = _lora_config()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = attach_lora(model, config, seed=3)
    a = {name: layer.lora_A["default"].weight.clone() for name, layer in lora_layers(first).items()}
    assert a
    second = attach_lora(tiny_llama().model, config, seed=3)
    for name, layer in lora_layers(second).items():
        torch.testing.assert_close(layer.lora_A["default"].weight, a[name])
