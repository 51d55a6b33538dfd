"""The output layer on chosen hidden states: the same logits as the full pass at those positions,
gradients through what a hook kept, and the hook gone afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icelora.output_layer import OutputLayerNotCalledError, output_layer, output_layer_reads


def test_chosen_positions_give_the_full_pass_logits(tiny):
    model = tiny.model.double()
    ids = torch.tensor([[5, 9, 13, 2, 7], [4, 8, 3, 11, 6]])
    full = model(input_ids=ids).logits
    rows, positions = torch.tensor([0, 1, 1, 0]), torch.tensor([4, 0, 3, 1])
    with output_layer_reads(model, lambda hidden: hidden[rows, positions][None]):
        chosen = model(input_ids=ids).logits
    assert chosen.shape == (1, 4, full.shape[-1])
    torch.testing.assert_close(chosen[0], full[rows, positions], rtol=1e-12, atol=1e-12)
    # the hook is removed on leaving: the next pass gives every position again
    assert model(input_ids=ids).logits.shape == full.shape


def test_hidden_states_kept_by_one_pass_are_scored_by_the_next(tiny):
    model = tiny.model.double()
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    weight = output_layer(model).weight
    weight.requires_grad_(True)
    expected = model(input_ids=ids).logits[0, [1, 2]].sum() + model(input_ids=ids[:, :2]).logits[0, 0].sum()
    (grad_expected,) = torch.autograd.grad(expected, weight)
    kept = []

    def keep(hidden):
        kept.append(hidden[0, [1, 2]])
        return hidden[:, :0]

    with output_layer_reads(model, keep):
        assert model(input_ids=ids).logits.shape[1] == 0
    with output_layer_reads(model, lambda hidden: torch.cat([kept[0], hidden[0, :1]])[None]):
        joined = model(input_ids=ids[:, :2]).logits
    (grad_joined,) = torch.autograd.grad(joined.sum(), weight)
    weight.requires_grad_(False)
    assert joined.sum().item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad_joined, grad_expected, rtol=1e-12, atol=1e-12)


def test_a_model_without_an_output_layer_is_refused():
    class Headless(nn.Module):
        def get_output_embeddings(self) -> None:
            return None

    with pytest.raises(ValueError, match="Headless names no output layer"), \
            output_layer_reads(Headless(), lambda hidden: hidden):
        pass


def test_the_hook_is_removed_when_the_block_raises(tiny):
    model = tiny.model
    ids = torch.tensor([[5, 9, 13]])
    with pytest.raises(KeyError), output_layer_reads(model, lambda hidden: hidden[:, :1]):
        assert model(input_ids=ids).logits.shape[1] == 1
        raise KeyError("inside")
    assert model(input_ids=ids).logits.shape[1] == 3


class _OwnProduct(nn.Module):
    """Names an output layer but makes its logits from the embedding weight itself."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) @ self.embed.weight.T


class _KeywordHead(_OwnProduct):
    """Calls its output layer with the hidden states as a keyword argument."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(input=self.embed(ids))


def test_a_model_that_bypasses_its_output_layer_is_refused():
    model = _OwnProduct()
    with pytest.raises(OutputLayerNotCalledError, match="_OwnProduct's forward pass did not call"), \
            output_layer_reads(model, lambda hidden: hidden[:, :1]):
        model(torch.tensor([[1, 2, 3]]))


def test_a_keyword_call_of_the_output_layer_reads_the_selection():
    model = _KeywordHead()
    ids = torch.tensor([[1, 2, 3]])
    full = model(ids)
    with output_layer_reads(model, lambda hidden: hidden[:, 1:]):
        part = model(ids)
    torch.testing.assert_close(part, full[:, 1:])
