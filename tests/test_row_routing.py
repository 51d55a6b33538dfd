"""Mixed batches through separate adapters: the concatenated form against PEFT's own routing."""

from __future__ import annotations

import pytest
import torch

from icelora import ICELoRAEditor
from icelora.row_routing import install_row_routing, row_mask
from tests.conftest import tiny_gpt2, tiny_llama
from tests.test_host_reads import HostReads

ROUTING = ["edit_0", "__base__", "edit_2", "edit_0", "edit_1"]
TEXTS = ["The Eiffel Tower is located in", "Rome is a city", "Paris", "The mother tongue of", "Epaspidoceras is"]


def _editor_with_separate_adapters(builder) -> tuple[ICELoRAEditor, list[str]]:
    loaded = builder()
    loaded.model.double()
    editor = ICELoRAEditor(loaded, method="lora", layers=[0, 1])
    names = editor.params.add_separate_adapters(3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at 0: give every adapter its own non-zero update
        for param in editor.params.separate_tensors(names).values():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
    return editor, names


def _routed_layers(editor: ICELoRAEditor) -> list[torch.nn.Module]:
    return [m for m in editor.model.modules() if "_mixed_batch_forward" in vars(m)]


def _logits_and_grads(editor: ICELoRAEditor, names: list[str], batch: dict) -> tuple[torch.Tensor, dict]:
    tensors = editor.params.separate_tensors(names)
    for param in tensors.values():
        param.grad = None
    logits = editor.model(**batch, adapter_names=ROUTING).logits
    (logits.double() ** 2).mean().backward()
    return logits.detach(), {k: None if p.grad is None else p.grad.clone() for k, p in tensors.items()}


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_routed_rows_equal_peft_routing_in_outputs_and_gradients(builder):
    editor, names = _editor_with_separate_adapters(builder)
    tokenizer = editor.tokenizer
    tokenizer.padding_side = "left"
    batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    layers = _routed_layers(editor)
    assert layers, "separate adapters did not install the row routing"
    assert install_row_routing(editor.model) == 0  # installing again routes no layer twice
    ours = _logits_and_grads(editor, names, batch)
    for module in layers:  # back to PEFT's own list-indexed routing
        del module._mixed_batch_forward
    theirs = _logits_and_grads(editor, names, batch)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-10)
    assert ours[1].keys() == theirs[1].keys()
    for key, grad in theirs[1].items():
        assert grad is not None and ours[1][key] is not None, key
        torch.testing.assert_close(ours[1][key], grad, rtol=1e-9, atol=1e-12)
        assert grad.abs().sum() > 0, key  # every adapter has rows of its own


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_routed_rows_make_no_tensor_from_host_data_after_the_first_pass(builder):
    editor, names = _editor_with_separate_adapters(builder)
    batch = dict(editor.tokenizer(TEXTS[:1] * len(ROUTING), return_tensors="pt"))
    _logits_and_grads(editor, names, batch)  # the first pass makes the routing's mask
    hits = row_mask.cache_info().hits
    watch = HostReads()
    with watch:
        _logits_and_grads(editor, names, batch)
    assert row_mask.cache_info().hits > hits
    assert not {line: n for line, n in watch.lines.items() if "/peft/" in line or "/icelora/" in line}, \
        dict(watch.lines)
    for module in _routed_layers(editor):  # the watch sees PEFT's own routing copy indices from the host
        del module._mixed_batch_forward
    with watch:
        _logits_and_grads(editor, names, batch)
    assert any("/peft/" in line for line in watch.lines), dict(watch.lines)


def test_row_mask_scales_each_rows_own_adapter_columns():
    mask = row_mask(("b", "__base__", "a", "b"), ("a", "b"), (2, 3), (0.5, 2.0), "cpu")
    expected = torch.tensor([[0, 0, 2, 2, 2], [0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0, 0, 2, 2, 2]])
    assert torch.equal(mask, expected)
