"""Editable modules are found by inspecting the model, for GPT-2 (Conv1D) and Llama (Linear)."""

from __future__ import annotations

import pytest
import torch

from icelora.architecture import count_parameters, default_edit_layers, first_layers_only, inspect_architecture
from icelora.errors import ModelLoadError
from icelora.input_projection import module_inputs
from tests.conftest import tiny_gpt2, tiny_llama


def test_gpt2_layout():
    arch = inspect_architecture(tiny_gpt2().model)
    assert arch.layers_path == "transformer.h"
    assert arch.attn_query == arch.attn_value == "attn.c_attn"
    assert arch.mlp_in == ("mlp.c_fc",)
    assert arch.mlp_out == "mlp.c_proj"
    assert arch.uses_conv1d
    assert arch.module_names([1], ["attn_qv", "mlp_out"]) == ["transformer.h.1.attn.c_attn",
                                                              "transformer.h.1.mlp.c_proj"]


def test_llama_layout():
    arch = inspect_architecture(tiny_llama().model)
    assert arch.layers_path == "model.layers"
    assert (arch.attn_query, arch.attn_value) == ("self_attn.q_proj", "self_attn.v_proj")
    assert arch.mlp_in == ("mlp.gate_proj", "mlp.up_proj")
    assert arch.mlp_out == "mlp.down_proj"
    assert not arch.uses_conv1d
    assert arch.module_names([0, 2], ["mlp_out"]) == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]


def test_layers_out_of_range_are_refused():
    arch = inspect_architecture(tiny_llama().model)
    with pytest.raises(ModelLoadError, match="layer 7 does not exist"):
        arch.module_names([7], ["mlp_out"])


def test_default_layers():
    assert default_edit_layers(32) == [5, 6, 7, 8, 9]
    assert default_edit_layers(30) == [4, 5, 6, 7, 8]
    assert default_edit_layers(48) == [7, 8, 9, 10, 11]
    assert default_edit_layers(3) == [0, 1, 2]


def test_parameter_count_counts_tied_weights_once():
    model = tiny_gpt2().model  # lm_head is tied to the token embedding
    _trainable, total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert total < sum(p.numel() for p in model.state_dict().values())


def test_layout_is_the_same_inside_lora_wrappers():
    from icelora import ICELoRAEditor

    loaded = tiny_llama()
    plain = inspect_architecture(loaded.model)
    editor = ICELoRAEditor(loaded, method="ice-lora", layers=[0, 1])
    assert inspect_architecture(editor.model) == plain


def test_a_model_without_an_output_layer_is_refused():
    model = tiny_gpt2().model.transformer  # the decoder alone, no language-modelling head
    assert model.get_output_embeddings() is None
    with pytest.raises(ModelLoadError, match="no output layer"):
        inspect_architecture(model)


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_first_layers_only_runs_the_first_layers_and_gives_their_inputs_unchanged(builder):
    loaded = builder()
    model, arch = loaded.model, inspect_architecture(loaded.model)
    blocks = model.get_submodule(arch.layers_path)
    ran: list[int] = []
    for k, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda _m, _a, k=k: ran.append(k))
    modules = {f"layer {k}": model.get_submodule(f"{arch.layer_prefix(k)}.{arch.mlp_out}") for k in (0, 1)}
    rows = [tuple(loaded.tokenizer(t)["input_ids"]) for t in ("The Eiffel Tower is in", "Paris")]
    full = module_inputs(model, modules, rows, loaded.tokenizer.pad_token_id)
    assert ran == list(range(arch.num_layers)) and arch.num_layers > 2
    ran.clear()
    with first_layers_only(model, arch, 2):
        early = module_inputs(model, modules, rows, loaded.tokenizer.pad_token_id)
    assert ran == [0, 1]
    assert full.keys() == early.keys() and all(torch.equal(full[k], early[k]) for k in full)
    assert model.get_submodule(arch.layers_path) is blocks
    with pytest.raises(RuntimeError, match="inside"), first_layers_only(model, arch, 1):
        assert len(model.get_submodule(arch.layers_path)) == 1
        raise RuntimeError("inside")
    assert model.get_submodule(arch.layers_path) is blocks
