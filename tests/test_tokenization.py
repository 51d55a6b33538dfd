"""Prompt/target boundaries, BOS handling, and masks under left and right padding."""

from __future__ import annotations

import pytest
import torch

from icelora.errors import InvalidRequestError
from icelora.sampling import alive_before_eos
from icelora.tokenization import encode_prompt_target, next_token_view, pad_rows, span_index


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_target_tokens_decode_to_the_target(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind[kind]
    enc = encode_prompt_target(tok, "The Eiffel Tower is located in the city of", "Rome")
    assert tok.decode(list(enc.target_ids)).strip() == "Rome"
    assert tok.decode(list(enc.prompt_ids), skip_special_tokens=True) == "The Eiffel Tower is located in the city of"
    assert list(enc.ids) == tok("The Eiffel Tower is located in the city of Rome")["input_ids"]


def test_bos_is_in_the_prompt_part_never_the_target(tokenizers_by_kind):
    llama, gpt2 = tokenizers_by_kind["llama"], tokenizers_by_kind["gpt2"]
    enc = encode_prompt_target(llama, "Rome is the capital of", "Italy")
    assert enc.ids[0] == llama.bos_token_id
    assert llama.bos_token_id not in enc.target_ids
    enc = encode_prompt_target(gpt2, "Rome is the capital of", "Italy")
    assert enc.ids[0] != gpt2.bos_token_id  # GPT-2 adds no BOS


def test_multi_token_target(tokenizers_by_kind):
    tok = tokenizers_by_kind["gpt2"]
    enc = encode_prompt_target(tok, "Which family does Epaspidoceras belong to?", "Noctuidae family")
    assert len(enc.target_ids) >= 2
    assert tok.decode(list(enc.target_ids)).strip() == "Noctuidae family"


def test_target_the_tokenizer_cannot_encode_is_refused(tokenizers_by_kind):
    with pytest.raises(InvalidRequestError, match="cannot encode"):
        encode_prompt_target(tokenizers_by_kind["llama"], "The city of", "漢字")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_span_masks_select_exactly_the_target_tokens(tokenizers_by_kind, kind, side):
    tok = tokenizers_by_kind[kind]
    encs = [encode_prompt_target(tok, "The Eiffel Tower is located in the city of", "Rome"),
            encode_prompt_target(tok, "Q:", "Noctuidae family")]
    batch = pad_rows([e.ids for e in encs], tok.pad_token_id, side=side)
    mask = batch.span_mask([(e.target_start, len(e.ids)) for e in encs])
    assert batch.input_ids[mask].tolist() == [t for e in encs for t in e.target_ids]
    assert int(mask.sum()) == sum(len(e.target_ids) for e in encs)
    # padding is never selected, and the attention mask covers exactly the real tokens
    assert not (mask & (batch.attention_mask == 0)).any()
    assert batch.attention_mask.sum(1).tolist() == [len(e.ids) for e in encs]
    # the logits that predict the target are the ones just before each target token
    logits = torch.arange(batch.input_ids.numel(), dtype=torch.float).reshape(*batch.input_ids.shape, 1)
    pred, labels, rows = next_token_view(logits, batch, mask)
    assert labels.tolist() == batch.input_ids[mask].tolist()
    expected_positions = [(i, batch.offsets[i] + p - 1) for i, e in enumerate(encs)
                          for p in range(e.target_start, len(e.ids))]
    width = batch.input_ids.shape[1]
    assert pred[:, 0].long().tolist() == [i * width + p for i, p in expected_positions]
    assert rows.tolist() == [i for i, _ in expected_positions]
    # the fixed-index view of the same spans selects the same logits and labels, in the same order
    index = span_index(batch, [(e.target_start, len(e.ids)) for e in encs], "cpu")
    assert torch.equal(index.logits(logits), pred) and torch.equal(index.labels(batch.input_ids), labels)
    assert torch.equal(index.rows, rows)
    with pytest.raises(ValueError, match="outside row"):
        span_index(batch, [(0, 1), (1, 2)], "cpu")  # a token at a row's start has no logits before it


def test_left_padding_keeps_positions_of_real_tokens():
    batch = pad_rows([[5, 6, 7], [8]], pad_id=0, side="left")
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.offsets == [0, 2]


def test_completion_tokens_stop_before_eos():
    tokens = torch.tensor([[4, 2, 5], [4, 5, 6], [2, 4, 4]])
    assert alive_before_eos(tokens, {2}).tolist() == [[True, False, False], [True, True, True],
                                                       [False, False, False]]
