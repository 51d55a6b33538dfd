"""Null-space LoRA (``lora_projection_energy``): the update vanishes on the anchors' leading input directions."""

from __future__ import annotations

import pytest
import torch

from icelora import ICELoRAEditor
from icelora.anchors import relation_anchors
from icelora.config import EditConfig
from icelora.errors import InvalidConfigError
from icelora.input_projection import (
    distinct_inputs,
    gram_directions,
    gram_directions_each,
    leading_directions,
    leading_directions_each,
    module_inputs,
    per_distinct_input,
    project_off,
    svd_directions,
)
from icelora.lora_utils import lora_layers
from icelora.request import EditRequest
from icelora.tokenization import pad_rows
from tests.conftest import TINY_BUILDERS, tiny_llama

REQUEST = EditRequest(prompt="The Eiffel Tower is located in the city of", target="Rome", subject="The Eiffel Tower",
                      contexts=("The Eiffel Tower is in Rome.", "Rome is home to the Eiffel Tower."))
SETTINGS = {"max_steps": 6, "layers": [1, 2], "learning_rate": 5e-2, "early_stopping": False,
            "lambda_locality": 0.5, "locality_anchor_kind": "relation"}


def test_leading_directions_hold_the_asked_share_of_energy():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(8, 8))
    scales = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1, 0.1, 0.1])
    inputs = torch.randn(200, 8) @ torch.diag(scales) @ basis.T  # energy mostly along basis[:, 0], then [:, 1]
    share = (scales**2).cumsum(0) / (scales**2).sum()
    for energy in (0.5, 0.9, 0.99):
        u = leading_directions(inputs, energy)
        expected = int((share < energy).sum()) + 1
        assert abs(u.shape[1] - expected) <= 1  # the sample's spectrum is near the scales'
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-5)
        _, s, _ = torch.linalg.svd(inputs.T.double(), full_matrices=False)
        held = (s[: u.shape[1]] ** 2).sum() / (s**2).sum()
        assert held >= energy and (u.shape[1] == 1 or (s[: u.shape[1] - 1] ** 2).sum() / (s**2).sum() < energy)
    with pytest.raises(ValueError, match="energy"):
        leading_directions(inputs, 1.0)


def _decaying_inputs(positions: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(positions, features, generator=generator) * torch.logspace(0, -2, features)


@pytest.mark.parametrize("positions", [40, 300], ids=["fewer-positions", "more-positions"])
def test_gram_directions_span_what_the_svd_spans(positions):
    """Both shapes of the Gram route (``X X^T`` when positions are fewer than features, ``X^T X``
    otherwise) give the SVD's k and its subspace: the same projector up to float32 rounding."""
    inputs = _decaying_inputs(positions, 96, seed=positions)
    for energy in (0.5, 0.9, 0.98):
        svd = svd_directions(inputs, energy)
        gram = gram_directions(inputs, energy)
        assert gram.shape == svd.shape and gram.dtype == inputs.dtype
        assert torch.allclose(gram.T @ gram, torch.eye(gram.shape[1]), atol=1e-5)
        assert torch.allclose(gram @ gram.T, svd @ svd.T, atol=1e-5)
    with pytest.raises(ValueError, match="energy"):
        gram_directions(inputs, 0.0)


@pytest.mark.parametrize("positions", [10, 40], ids=["fewer-positions", "more-positions"])
def test_gram_directions_stay_finite_where_the_inputs_are_degenerate(positions):
    """All-zero inputs (no energy) and a direction far weaker than the largest: the Gram route
    hands over to the SVD instead of dividing by a vanishing singular value."""
    zeros = gram_directions(torch.zeros(positions, 32), 0.9)
    assert zeros.isfinite().all() and zeros.shape == svd_directions(torch.zeros(positions, 32), 0.9).shape
    weak = _decaying_inputs(positions, 32, seed=4)
    weak[:, 0] *= 1e7  # one direction holds all but ~1e-12 of the energy
    for energy in (0.9, 1 - 1e-14):
        directions = gram_directions(weak, energy)
        assert directions.isfinite().all()
        assert torch.allclose(directions.T @ directions, torch.eye(directions.shape[1]), atol=1e-5)


def test_gram_directions_of_several_inputs_at_once_are_each_ones_own(monkeypatch):
    """Several adapters' inputs of one module decomposed together (fewer and more positions than
    features, zero-padded Gram matrices, an all-zero input handed to the SVD): each gets the
    directions it gets alone, and the host decomposes each group in one call."""
    inputs = [_decaying_inputs(p, 48, seed=p) for p in (10, 30, 17, 60, 48)] + [torch.zeros(12, 48)]
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(tuple(a.shape)) or eigh(a))
    for energy in (0.5, 0.9, 0.98):
        calls.clear()
        together = gram_directions_each(inputs, energy)
        assert calls == [(4, 30, 30), (2, 48, 48)]  # the four with fewer positions padded to 30; the rest
        for x, mine, each in zip(inputs, together, [svd_directions(x, energy) for x in inputs]):
            assert mine.shape == each.shape and mine.isfinite().all()
            assert torch.allclose(mine @ mine.T, each @ each.T, atol=1e-5)
            assert torch.allclose(mine @ mine.T, gram_directions(x, energy) @ gram_directions(x, energy).T, atol=1e-6)
    assert gram_directions_each([], 0.9) == [] == leading_directions_each([], 0.9)


@pytest.mark.slow
def test_gram_directions_match_the_svd_on_the_embedded_models_anchor_inputs(embedded):
    """On real inputs (every edited module of the embedded model, over the relation anchors of a
    ZsRE-like edit: hundreds of positions), the Gram route keeps the SVD's k and subspace."""
    editor = ICELoRAEditor(embedded, method="ice-lora")
    anchors = relation_anchors(editor.model, editor.tokenizer, editor.tokenizer.pad_token_id, [REQUEST])
    inputs = module_inputs(editor.model, editor.params.base_modules(), anchors.rows, editor.tokenizer.pad_token_id)
    assert next(iter(inputs.values())).shape[0] > 100
    for name, x in inputs.items():
        svd, gram = svd_directions(x, 0.98), gram_directions(x, 0.98)
        assert gram.shape == svd.shape, name
        assert torch.allclose(gram @ gram.T, svd @ svd.T, atol=1e-6), name


def test_the_directions_come_from_the_gram_route_and_span_what_the_svd_spans(monkeypatch):
    """On the CPU as elsewhere: one input and several (fewer and more positions than features)."""
    import icelora.input_projection

    calls = []
    gram = icelora.input_projection.gram_directions_each
    monkeypatch.setattr(icelora.input_projection, "gram_directions_each", lambda *a: calls.append(1) or gram(*a))
    inputs = [_decaying_inputs(p, 256, seed=p) for p in (120, 40, 300)]
    each = leading_directions_each(inputs, 0.98)
    assert torch.equal(leading_directions(inputs[0], 0.98), each[0])
    assert len(calls) == 2
    for mine, x in zip(each, inputs):
        svd = svd_directions(x, 0.98)
        assert mine.shape == svd.shape
        assert torch.allclose(mine @ mine.T, svd @ svd.T, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_directions_match_the_cpu():
    """One input and several (fewer and more positions than features) at once."""
    inputs = [_decaying_inputs(p, 256, seed=p) for p in (120, 40, 300)]
    on_cpu = leading_directions_each(inputs, 0.98)
    on_cuda = [leading_directions(inputs[0].cuda(), 0.98), *leading_directions_each([x.cuda() for x in inputs], 0.98)]
    for mine, theirs in zip(on_cuda, [on_cpu[0], *on_cpu]):
        assert mine.is_cuda and mine.shape == theirs.shape
        assert torch.allclose(mine.cpu() @ mine.cpu().T, theirs @ theirs.T, atol=1e-5)


def test_project_off_makes_the_rows_orthogonal_to_the_directions():
    torch.manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(16, 3))
    weight = torch.randn(4, 16)
    kept = weight - weight @ u @ u.T
    project_off(weight, u)
    assert (weight @ u).abs().max() < 1e-5
    assert torch.allclose(weight, kept)


def test_project_off_can_hold_the_coefficients_at_earlier_values():
    torch.manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(16, 3))
    earlier = torch.randn(4, 16)
    weight = earlier + torch.randn(4, 16)  # what changed since: the second term
    change = weight - earlier
    expected = earlier + change - change @ u @ u.T
    project_off(weight, u, earlier @ u)
    assert torch.allclose(weight @ u, earlier @ u, atol=1e-5)
    assert torch.allclose(weight, expected, atol=1e-5)


def test_module_inputs_ignore_padding(tiny):
    editor = ICELoRAEditor(tiny, method="ice-lora", **SETTINGS, lora_projection_energy=0.9)
    modules = editor.params.base_modules()
    rows = [tuple(editor.tokenizer(t)["input_ids"]) for t in ("The Eiffel Tower is", "Rome is the capital of Italy")]
    both = module_inputs(editor.model, modules, rows, editor.tokenizer.pad_token_id)
    each = [module_inputs(editor.model, modules, [row], editor.tokenizer.pad_token_id) for row in rows]
    for name in modules:
        assert both[name].shape[0] == sum(len(r) for r in rows)
        assert torch.allclose(both[name], torch.cat([alone[name] for alone in each]), atol=1e-5)


def test_module_inputs_make_no_logits(tiny):
    """The output layer reads no position, and each module gets what it gets in a whole pass."""
    editor = ICELoRAEditor(tiny, method="ice-lora", **SETTINGS, lora_projection_energy=0.9)
    modules = editor.params.base_modules()
    rows = [tuple(editor.tokenizer(t)["input_ids"]) for t in ("The Eiffel Tower is", "Rome is the capital of Italy")]
    read: list[tuple[int, ...]] = []
    head = editor.model.get_output_embeddings().register_forward_hook(lambda _m, _args, out: read.append(out.shape))
    stopped = module_inputs(editor.model, modules, rows, editor.tokenizer.pad_token_id)
    assert len(read) == 1 and read[0][1] == 0 and set(stopped) == set(modules)
    head.remove()
    whole: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: whole.__setitem__(name, args[0]))
             for name, m in modules.items()]
    batch = pad_rows(rows, editor.tokenizer.pad_token_id)
    editor.model(**batch.forward_kwargs())
    for hook in hooks:
        hook.remove()
    rows_at, positions_at = batch.real_positions(torch.device("cpu"))
    for name in modules:
        assert torch.equal(stopped[name], whole[name][rows_at, positions_at].float())


def test_per_distinct_input_derives_once_per_object_in_the_inputs_order():
    """Names mapping to the very same object get one derived value between them; equal but
    distinct objects are derived each on their own; the names keep their order."""
    shared, alone, equal = torch.ones(2), torch.zeros(2), torch.ones(2)
    inputs = {"gate": shared, "down": alone, "up": shared, "other": equal}
    calls: list[torch.Tensor] = []
    derived = per_distinct_input(inputs, lambda x: calls.append(x) or [x * 2])
    assert [id(x) for x in calls] == [id(shared), id(alone), id(equal)]
    assert list(derived) == ["gate", "down", "up", "other"]
    assert derived["gate"] is derived["up"] and derived["other"] is not derived["gate"]
    assert distinct_inputs(inputs) == [["gate", "up"], ["down"], ["other"]]


def test_modules_handed_the_same_input_share_it_and_its_directions(monkeypatch):
    """A gated MLP's gate and up projections read the same input: it is kept once, its leading
    directions are computed once, and both modules are protected on the directions their own
    input gives."""
    import icelora.icelora_editor as editor_module

    editor = ICELoRAEditor(tiny_llama(), method="ice-lora", **SETTINGS, target_modules=["mlp_in", "mlp_out"],
                           lora_projection_energy=0.9)
    modules = editor.params.base_modules()
    anchors = relation_anchors(editor.model, editor.tokenizer, editor.tokenizer.pad_token_id, [REQUEST])
    inputs = module_inputs(editor.model, modules, anchors.rows, editor.tokenizer.pad_token_id)
    groups = distinct_inputs(inputs)
    assert sorted(len(names) for names in groups) == [1, 1, 2, 2]  # per layer: gate and up together, down
    for names in groups:
        assert all(inputs[name] is inputs[names[0]] for name in names)
        assert {name.rpartition(".")[2] for name in names} in ({"gate_proj", "up_proj"}, {"down_proj"})
    decomposed, protected = [], {}
    each = editor_module.leading_directions_each
    monkeypatch.setattr(editor_module, "leading_directions_each",
                        lambda xs, energy: decomposed.append(len(xs)) or each(xs, energy))
    protect = editor.params.protect
    monkeypatch.setattr(editor.params, "protect", lambda directions, adapter="default", **options: (
        protected.update(directions) if directions else None) or protect(directions, adapter, **options))
    editor.edit(REQUEST, progress=False)
    assert len(decomposed) == len(groups)
    assert set(protected) == set(modules)
    for names in groups:
        assert all(protected[name] is protected[names[0]] for name in names)
    for name, x in inputs.items():
        assert torch.equal(protected[name], leading_directions(x, 0.9)), name


def test_module_inputs_read_nothing_back_from_the_device(tiny):
    """The real positions come from the host's row lengths, not from a mask on the device (on CUDA
    a boolean mask makes the host wait, once per module)."""
    from tests.test_host_reads import HostReads

    editor = ICELoRAEditor(tiny, method="ice-lora", **SETTINGS, lora_projection_energy=0.9)
    rows = [tuple(editor.tokenizer(t)["input_ids"]) for t in ("The Eiffel Tower is", "Rome is the capital of Italy")]
    watch = HostReads()
    with watch:
        module_inputs(editor.model, editor.params.base_modules(), rows, editor.tokenizer.pad_token_id)
    reads = {line: n for line, n in watch.lines.items() if "input_projection.py" in line}
    # the rows and their real positions are made on the host (pad_rows, PaddedBatch.real_positions); nothing else
    assert all(n == 1 for n in reads.values()) and len(reads) <= 2, reads


def _update_on(editor: ICELoRAEditor, name: str, directions: torch.Tensor, adapter: str = "default") -> float:
    """||B A U|| / ||B A||: the share of the adapter's update that acts on ``directions``."""
    module = lora_layers(editor.model)[name]
    delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight  # [out, in]
    return ((delta @ directions).norm() / delta.norm()).item()


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_an_edit_leaves_the_anchors_leading_directions_alone(tiny, weight, monkeypatch):
    """With the locality term (``lambda_locality`` 0.5) or without it (0: the anchors are made for
    the projection alone and no KL is computed on them), the update stays off their directions."""
    import icelora.losses

    kl_calls = []
    kl = icelora.losses.anchor_kl_from_logits
    monkeypatch.setattr(icelora.losses, "anchor_kl_from_logits", lambda *a, **k: kl_calls.append(1) or kl(*a, **k))
    editor = ICELoRAEditor(tiny, method="ice-lora", **{**SETTINGS, "lambda_locality": weight},
                           lora_projection_energy=0.9)
    modules = editor.params.base_modules()
    anchors = relation_anchors(editor.model, editor.tokenizer, editor.tokenizer.pad_token_id, [REQUEST])
    inputs = module_inputs(editor.model, modules, anchors.rows, editor.tokenizer.pad_token_id)
    before = editor.model(torch.tensor([editor.tokenizer(REQUEST.prompt)["input_ids"]])).logits
    editor.edit(REQUEST, progress=False)
    after = editor.model(torch.tensor([editor.tokenizer(REQUEST.prompt)["input_ids"]])).logits
    assert (after - before).abs().max() > 1e-3  # the edit did something
    for name, x in inputs.items():
        directions = leading_directions(x, 0.9)
        assert _update_on(editor, name, directions) < 1e-5, name
    assert editor.params.protected == {}  # lifted when the edit ends
    assert len(kl_calls) == (SETTINGS["max_steps"] if weight else 0)


def test_without_the_constraint_the_update_acts_on_those_directions(tiny):
    editor = ICELoRAEditor(tiny, method="ice-lora", **SETTINGS, lora_projection_energy=None)
    modules = editor.params.base_modules()
    anchors = relation_anchors(editor.model, editor.tokenizer, editor.tokenizer.pad_token_id, [REQUEST])
    inputs = module_inputs(editor.model, modules, anchors.rows, editor.tokenizer.pad_token_id)
    editor.edit(REQUEST, progress=False)
    assert max(_update_on(editor, name, leading_directions(x, 0.9)) for name, x in inputs.items()) > 0.1


SECOND = EditRequest(prompt="The Louvre is located in the city of", target="Berlin", subject="The Louvre",
                     contexts=("The Louvre is in Berlin.",))


def _a_weights(editor: ICELoRAEditor) -> dict[str, torch.Tensor]:
    return {name: m.lora_A["default"].weight.detach().clone() for name, m in lora_layers(editor.model).items()}


@pytest.mark.parametrize("scope", ["adapter", "edit"])
def test_the_projection_scope_decides_whether_a_later_edit_may_erase_an_earlier_ones_part(tiny, scope, monkeypatch):
    """Editing twice on one adapter: under scope ``adapter`` the second edit's projection clears the
    whole of ``A`` along its anchors' leading directions (the first edit's part too); under
    ``edit`` those coefficients stay where the first edit left them. The first edit (``B = 0``
    before it) is the same under both."""
    editor = ICELoRAEditor(tiny, method="ice-lora", **SETTINGS, lora_projection_energy=0.9,
                           lora_projection_scope=scope)
    fresh = TINY_BUILDERS[tiny.name.removeprefix("tiny-")]()
    reference = ICELoRAEditor(fresh, method="ice-lora", **SETTINGS, lora_projection_energy=0.9)
    editor.edit(REQUEST, progress=False)
    reference.edit(REQUEST, progress=False)
    first = _a_weights(editor)
    assert all(torch.equal(first[n], a) for n, a in _a_weights(reference).items())
    used = []
    protect = editor.params.protect

    def spy(directions, *args, **options):
        used.append(directions)
        return protect(directions, *args, **options)

    monkeypatch.setattr(editor.params, "protect", spy)
    editor.edit(SECOND, progress=False)
    second = _a_weights(editor)
    assert len(used) == 2 and used[1] is None
    for name, u in used[0].items():
        assert (second[name] - first[name]).abs().max() > 0, name  # the second edit trained A
        held = first[name] @ u if scope == "edit" else torch.zeros_like(first[name] @ u)
        assert (first[name] @ u).abs().max() > 1e-3, name  # something there to keep or erase
        assert torch.allclose(second[name] @ u, held, atol=1e-5), name


@pytest.mark.parametrize("gradients", [False, True])
def test_projected_gradients_reach_the_optimizer_without_the_protected_part(tiny, gradients, monkeypatch):
    """Under ``lora_projection_gradients`` the optimizer sees gradients of ``A`` with nothing on
    the protected directions; without it they carry a part there, which only the projection after
    the step removes. Either way the edit ends blind to those directions."""
    editor = ICELoRAEditor(tiny, method="ice-lora", **SETTINGS, lora_projection_energy=0.9,
                           lora_projection_gradients=gradients)
    seen: list[float] = []
    before_step = editor.params.before_step

    def spy():
        before_step()
        seen.extend(float((w.grad @ u).abs().max()) for held in editor.params.protected.values()
                    for w, u, _ in held)

    monkeypatch.setattr(editor.params, "before_step", spy)
    modules = editor.params.base_modules()
    anchors = relation_anchors(editor.model, editor.tokenizer, editor.tokenizer.pad_token_id, [REQUEST])
    inputs = module_inputs(editor.model, modules, anchors.rows, editor.tokenizer.pad_token_id)
    editor.edit(REQUEST, progress=False)
    assert len(seen) == SETTINGS["max_steps"] * len(inputs)
    if gradients:
        assert max(seen) < 1e-6
    else:
        assert max(seen) > 1e-3
    for name, x in inputs.items():
        assert _update_on(editor, name, leading_directions(x, 0.9)) < 1e-5, name


def test_config_rejects_an_unknown_projection_scope():
    with pytest.raises(InvalidConfigError, match="lora_projection_scope"):
        EditConfig(lora_projection_scope="layer")


@pytest.mark.parametrize("changes, message", [
    ({"lora_projection_energy": 1.0}, "in \\(0, 1\\)"),
    ({"lora_projection_energy": 0.9, "lambda_locality": 1.0, "parameterization": "full"}, "parameterization lora"),
    ({"lora_projection_scope": "edit"}, "needs lora_projection_energy"),
    ({"lora_projection_gradients": True}, "needs lora_projection_energy"),
    ({"lora_projection_gradients": "yes"}, "true or false"),
])
def test_config_rejects_a_projection_it_cannot_make(changes, message):
    with pytest.raises(InvalidConfigError, match=message):
        EditConfig(**changes)


def test_the_directions_script_counts_each_modules_protected_directions(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    from tests.conftest import tiny_llama
    from tests.test_dataset import KNOWEDIT_ZSRE

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import protected_directions

    loaded = tiny_llama()
    loaded.model.save_pretrained(tmp_path / "model")
    loaded.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data.json").write_text(json.dumps(KNOWEDIT_ZSRE[:1]))
    protected_directions.main(["--dataset", str(tmp_path / "data.json"), "--index", "0", "--energy", "0.5", "0.99",
                               "--model", str(tmp_path / "model"), "--layers", "0", "1"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 6  # gate, up and down projections of layers 0 and 1
    for name, positions, size, low, high in rows:
        assert int(positions) > 0 and 1 <= int(low) < int(high.rstrip(" |")) <= int(size), name
