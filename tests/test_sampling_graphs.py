"""Fixed-shape sampling passes (the CUDA-graph path) against the plain cached decode."""

from __future__ import annotations

import pytest
import torch

from icelora.icelora_editor import ICELoRAEditor
from icelora.losses import Objective, build_plan, graphs_apply
from icelora.methods import method_config
from icelora.request import EditRequest
from icelora.sampling import sample_from_batch
from icelora.sampling_graphs import FixedShapeSampler, fixed_shape_supported, prepared_mask
from icelora.tokenization import pad_rows
from tests.conftest import TINY_BUILDERS

ROWS = ["Now: the answer is new. The Eiffel Tower is located in the city of Rome",
        "The Eiffel Tower is located in the city of Rome",
        "Q: A: It is well known that the latest records show. The Eiffel Tower is in Rome"]
REQUEST = {"prompt": "The Eiffel Tower is located in the city of", "target": "Rome", "subject": "Eiffel Tower"}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _batch(tiny, device="cpu"):
    rows = [tiny.tokenizer(text)["input_ids"] for text in ROWS]
    return pad_rows(rows, tiny.tokenizer.pad_token_id, side="left", device=device)


def _draws(sampler, model, batch, seed, length=3, temperature=1.0):
    generator = torch.Generator(device=batch.input_ids.device).manual_seed(seed)
    return sampler(model, batch, length, temperature, [generator], {0}, None, None)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fixed_shape_passes_equal_the_cached_decode(tiny, attention):
    tiny.model.set_attn_implementation(attention)
    batch = _batch(tiny)
    assert len(set(batch.offsets)) > 1  # rows of different lengths: the masks must carry the padding
    sampler = FixedShapeSampler(tiny.model, batch, 3, graphs=True)  # no CUDA here: eager passes
    for seed in (0, 1, 2):
        ours, plain = _draws(sampler, tiny.model, batch, seed), _draws(sample_from_batch, tiny.model, batch, seed)
        assert torch.equal(ours.tokens, plain.tokens)
        assert torch.equal(ours.alive, plain.alive)
        torch.testing.assert_close(ours.teacher_logits, plain.teacher_logits, atol=1e-5, rtol=1e-5)
    assert sampler.recorded is None


def test_fixed_shape_passes_without_padding_with_groups_and_a_temperature(tiny):
    text = "The Eiffel Tower is located in the city of Rome"
    batch = pad_rows([tiny.tokenizer(text)["input_ids"]] * 4, tiny.tokenizer.pad_token_id, side="left")
    assert set(batch.offsets) == {0}  # no padding: the model's own path takes its causal shortcut
    sampler = FixedShapeSampler(tiny.model, batch, 4, graphs=False)
    groups = [torch.tensor([0, 2]), torch.tensor([1, 3])]
    for seed in (0, 1):
        draws = []
        for sample in (sampler, sample_from_batch):
            generators = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 10)]
            draws.append(sample(tiny.model, batch, 4, 0.7, generators, {0}, groups, None))
        assert torch.equal(draws[0].tokens, draws[1].tokens)
        torch.testing.assert_close(draws[0].teacher_logits, draws[1].teacher_logits, atol=1e-5, rtol=1e-5)


def test_models_whose_rotary_embedding_reads_positions_on_the_host_are_left_out():
    tiny = TINY_BUILDERS["llama"]()
    assert fixed_shape_supported(tiny.model)
    tiny.model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not fixed_shape_supported(tiny.model)


def test_prepared_masks_hide_padding_and_the_future(tiny):
    tiny.model.set_attn_implementation("sdpa")
    padding = torch.tensor([[0, 1, 1], [1, 1, 1]])
    prefill = prepared_mask(tiny.model, padding, 3, torch.float32)
    assert prefill.shape == (2, 1, 3, 3)
    assert prefill[0, 0].tolist() == [[False, False, False], [False, True, False], [False, True, True]]
    assert prefill[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    decode = prepared_mask(tiny.model, torch.cat([padding, torch.ones(2, 1, dtype=torch.long)], dim=1), 1,
                           torch.float32)
    assert decode[:, 0, 0].tolist() == [[False, True, True, True], [True, True, True, True]]
    tiny.model.set_attn_implementation("eager")
    additive = prepared_mask(tiny.model, padding, 3, torch.float32)
    assert additive.dtype == torch.float32 and additive[0, 0, 1, 1] == 0 and additive[0, 0, 1, 0] < -1e30


def test_a_sampler_refuses_another_batch(tiny):
    batch = _batch(tiny)
    sampler = FixedShapeSampler(tiny.model, batch, 3, graphs=False)
    with pytest.raises(ValueError, match="only the batch and length"):
        _draws(sampler, tiny.model, _batch(tiny), 0)
    with pytest.raises(ValueError, match="only the batch and length"):
        _draws(sampler, tiny.model, batch, 0, length=2)


def test_graphs_only_where_they_apply(tiny):
    assert fixed_shape_supported(tiny.model)
    config = method_config("ice-lora")
    request = EditRequest(**REQUEST)
    plan = build_plan(tiny.tokenizer, [request], config)
    assert graphs_apply(tiny.model, plan, [0], torch.device("cuda"))
    assert not graphs_apply(tiny.model, plan, [0], torch.device("cpu"))
    routed = build_plan(tiny.tokenizer, [request, request], config, independent=True, adapter_names=["a", "b"])
    assert not graphs_apply(tiny.model, routed, [0, 1], torch.device("cuda"))
    objective = Objective(plan, config.replace(lambda_locality=0.0, lora_projection_energy=None), torch.device("cpu"))
    assert objective.samples_from_graphs(torch.device("cuda"))
    assert not objective.samples_from_graphs(torch.device("cpu"))
    objective.cuda_graphs = False
    assert not objective.samples_from_graphs(torch.device("cuda"))


@needs_cuda
@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_graphs_equal_eager_passes_on_cuda(arch, dtype):
    tiny = TINY_BUILDERS[arch]()
    model = tiny.model.to("cuda", dtype)
    batch = _batch(tiny, "cuda")
    graphed = FixedShapeSampler(model, batch, 3, graphs=True)
    eager = FixedShapeSampler(model, batch, 3, graphs=False)
    for seed in range(4):
        assert (graphed.recorded is None) == (seed == 0)  # the first call warms up and records
        ours, plain = _draws(graphed, model, batch, seed), _draws(eager, model, batch, seed)
        assert torch.equal(ours.tokens, plain.tokens)
        torch.testing.assert_close(ours.teacher_logits, plain.teacher_logits)
        with torch.no_grad():  # the replays read the weights where they live: an in-place update shows
            for param in model.parameters():
                param.mul_(0.9)


@needs_cuda
@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_an_edit_with_graphed_sampling_equals_one_without(arch, monkeypatch):
    replays = []
    replay = FixedShapeSampler._replay
    monkeypatch.setattr(FixedShapeSampler, "_replay", lambda self, index: replays.append(index) or replay(self, index))
    losses = {}
    for graphs in (False, True):
        tiny = TINY_BUILDERS[arch]()
        tiny.model.to("cuda")
        editor = ICELoRAEditor(tiny, method="ice-lora", early_stopping=False, max_steps=6)
        editor.cuda_graphs = graphs
        losses[graphs] = [(h.loss, h.ft, h.ice) for h in editor.edit(REQUEST, progress=False).history]
        assert len(replays) == (3 * 5 if graphs else 0)  # steps 2-6, three passes each
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), atol=1e-4, rtol=1e-4)


@needs_cuda
def test_memory_held_does_not_grow_edit_after_edit():
    tiny = TINY_BUILDERS["gpt2"]()
    tiny.model.to("cuda")
    editor = ICELoRAEditor(tiny, method="ice-lora", early_stopping=False, max_steps=3)
    held = []
    for _ in range(6):
        editor.edit(REQUEST, progress=False)
        editor.revert()
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated())
    assert held[-1] <= held[1], held  # recordings, pools and streams of earlier edits are let go


@needs_cuda
def test_a_failed_recording_leaves_eager_passes_for_good(monkeypatch):
    tiny = TINY_BUILDERS["gpt2"]()
    model = tiny.model.to("cuda")
    batch = _batch(tiny, "cuda")
    sampler = FixedShapeSampler(model, batch, 3, graphs=True)

    def fail(self, model):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(FixedShapeSampler, "_record", fail)
    first = _draws(sampler, model, batch, 0)
    plain = _draws(sample_from_batch, model, batch, 0)
    assert torch.equal(first.tokens, plain.tokens) and sampler.recorded is None and not sampler.graphs
    assert not fixed_shape_supported(model)  # not tried again for this model
