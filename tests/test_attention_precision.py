"""Float32 attention in passes that train on the CPU with bfloat16 activations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from icelora import ICELoRAEditor
from icelora.attention_precision import float32_training_attention, sdpa_float32_when_training, trains_in_float32
from tests.conftest import TINY_BUILDERS
from tests.test_frozen_weights import SETTINGS
from tests.test_input_projection import REQUEST


@pytest.fixture
def attention_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, bool]]:
    """(query dtype, gradients recorded) of every call of torch's scaled_dot_product_attention."""
    calls: list[tuple[torch.dtype, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def recorded(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append((query.dtype, torch.is_grad_enabled()))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    return calls


def test_only_passes_that_train_on_narrow_activations_on_the_cpu_run_in_float32():
    narrow, wide = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16), torch.zeros(1, 2, 3, 4)
    assert trains_in_float32(narrow) and trains_in_float32(narrow.half())
    assert not trains_in_float32(wide)
    with torch.no_grad():
        assert not trains_in_float32(narrow)


def test_the_context_puts_transformers_own_function_back_also_when_nested():
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    with float32_training_attention():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_float32_when_training
        with float32_training_attention():
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_float32_when_training
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_float32_when_training
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    with pytest.raises(RuntimeError), float32_training_attention():
        raise RuntimeError
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_a_bfloat16_model_trains_its_attention_in_float32_and_gives_what_it_gave(arch, attention_calls):
    """Within the block a bfloat16 model's passes with gradients see float32 attention and give the
    float32 model's logits and gradients up to bfloat16 rounding, as they did outside it; its
    passes without gradients and a float32 model's passes are exactly what they were."""
    model = TINY_BUILDERS[arch]().model
    ids = torch.tensor([[5, 17, 30, 41, 12, 9, 60]])
    weight = next(p for p in model.parameters() if p.dim() == 2 and p.shape[0] != p.shape[1])

    def logits_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        logits = model(ids).logits
        logits.float().logsumexp(-1).sum().backward()
        return logits.detach().float(), weight.grad.float()

    reference, reference_grad = logits_and_grad()
    with float32_training_attention():
        assert torch.equal(model(ids).logits, reference)
    model.to(torch.bfloat16)
    attention_calls.clear()
    before, before_grad = logits_and_grad()
    assert {dtype for dtype, _ in attention_calls} == {torch.bfloat16}
    attention_calls.clear()
    with float32_training_attention():
        after, after_grad = logits_and_grad()
        assert attention_calls and {dtype for dtype, _ in attention_calls} == {torch.float32}
        attention_calls.clear()
        with torch.no_grad():
            untrained = model(ids).logits.float()
        assert {dtype for dtype, _ in attention_calls} == {torch.bfloat16}
    assert not torch.equal(after, before)
    for logits, grad in ((before, before_grad), (after, after_grad)):  # bfloat16 rounding, either way
        assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
        assert (grad - reference_grad).abs().max() < 0.05 * reference_grad.abs().max()
    with torch.no_grad():
        assert torch.equal(untrained, model(ids).logits.float())


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_an_edit_on_bfloat16_frozen_weights_trains_with_float32_attention(arch, attention_calls):
    """Every attention call of an edit under ``frozen_dtype`` that records gradients runs in
    float32, its sampling passes stay in bfloat16; afterwards transformers' function is back."""
    editor = ICELoRAEditor(TINY_BUILDERS[arch](), method="ice-lora", frozen_dtype="bfloat16", **SETTINGS)
    editor.edit(REQUEST, progress=False)
    trained = {dtype for dtype, grad in attention_calls if grad}
    sampled = {dtype for dtype, grad in attention_calls if not grad}
    assert trained == {torch.float32} and torch.bfloat16 in sampled
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


def test_the_attention_benchmark_times_every_way_with_bfloat16_rounding_only(capsys):
    """``benchmarks/attention_backward_speed.py``: a row per shape and way; every bfloat16 way's
    output and gradient differ from float32's by rounding (under 5%), never by nothing."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import attention_backward_speed

    assert attention_backward_speed.main(["--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == len(attention_backward_speed.SHAPES) * len(attention_backward_speed.WAYS)
    for row in rows:
        milliseconds, out_diff, grad_diff = (float(x) for x in row[-3:])
        assert milliseconds > 0
        if row[2] == "float32":
            assert out_diff == grad_diff == 0
        else:
            assert 0 < out_diff < 0.05 and 0 < grad_diff < 0.05
