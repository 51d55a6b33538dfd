"""Many edits trained together, each in its own adapter, against the same edits made one at a time."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from icelora import EditConfig, ICELoRAEditor
from icelora.editing_loop import run_independent_edit_loop
from icelora.errors import InvalidConfigError
from icelora.evaluation.metrics import continuation_nll, continuation_nlls
from icelora.evaluation.runner import read_cases, run_single
from icelora.losses import LossParts, Objective, RequestLoss, build_plan
from icelora.request import EditRequest
from icelora.sampling import sample_completions
from tests.conftest import tiny_gpt2, tiny_llama
from tests.test_evaluation import STABLE_KEYS

REQUESTS = [
    EditRequest(prompt="The Eiffel Tower is located in the city of", target="Rome",
                contexts=("The Eiffel Tower is in Rome.", "Rome is home to the Eiffel Tower.")),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", target="Italian family",
                contexts=("Danielle Darrieux speaks Italian.", "Italian is the mother tongue of Danielle.")),
    EditRequest(prompt="Which family does Epaspidoceras belong to?", target="Geometridae",
                contexts=("Epaspidoceras is a genus of Geometridae.", "The family of Epaspidoceras is Geometridae.")),
]
PROBE = "The place of death of Leo Arons is"
# Early stopping on "target learned" alone (tolerance large), so the edits stop at different steps.
SETTINGS = {"max_steps": 12, "layers": [1, 2], "learning_rate": 5e-2, "early_stop_patience": 1,
            "early_stop_tolerance": 100.0}


@pytest.mark.parametrize("per_step", [None, 1], ids=["all-contexts", "one-context-per-step"])
def test_independent_loss_is_the_sum_of_each_requests_own_loss(tiny, per_step):
    """With ``contexts_per_step`` each request takes its own turn through its own contexts (the
    first has one more, so the windows of step 4 differ between requests)."""
    config = EditConfig(num_contexts=3, contexts_per_step=per_step, completion_length=3, seed=3)
    requests = [replace(REQUESTS[0], contexts=(*REQUESTS[0].contexts, "Rome: the Eiffel Tower.")), *REQUESTS[1:]]
    together = Objective(build_plan(tiny.tokenizer, requests, config, independent=True), config,
                         torch.device("cpu"))
    alone = [Objective(build_plan(tiny.tokenizer, [r], config), config, torch.device("cpu"))(tiny.model, 4)
             for r in requests]
    parts = together(tiny.model, 4)
    assert parts.loss.item() == pytest.approx(sum(a.loss.item() for a in alone), rel=1e-5)
    for mine, single in zip(parts.per_request, alone):
        assert mine.loss == pytest.approx(single.loss.item(), rel=1e-5)
        assert mine.ft == pytest.approx(single.ft, rel=1e-5) and mine.ice == pytest.approx(single.ice, rel=1e-5)
        assert mine.learned == single.target_learned
    subset = together(tiny.model, 4, active=[2, 0])
    assert [r.loss for r in subset.per_request] == pytest.approx([alone[2].loss.item(), alone[0].loss.item()],
                                                                 rel=1e-5)


def test_a_joint_plan_cannot_run_a_subset(tiny):
    config = EditConfig(num_contexts=2, completion_length=2)
    objective = Objective(build_plan(tiny.tokenizer, REQUESTS, config), config, torch.device("cpu"))
    with pytest.raises(ValueError, match="independent"):
        objective(tiny.model, 0, active=[0])


def test_grouped_sampling_does_not_depend_on_the_other_rows(tiny):
    tok = tiny.tokenizer
    rows = [tuple(tok(t)["input_ids"]) for t in ("The Eiffel Tower is", "Rome is the capital of", "Which family")]
    eos = {tok.eos_token_id}
    together = sample_completions(tiny.model, rows, tok.pad_token_id, 4, 1.0,
                                  [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)], eos,
                                  row_groups=[0, 1, 1])
    alone = sample_completions(tiny.model, rows[1:], tok.pad_token_id, 4, 1.0, torch.Generator().manual_seed(5), eos)
    assert torch.equal(together.tokens[1:], alone.tokens)
    assert torch.allclose(together.teacher_logits[1:], alone.teacher_logits, atol=1e-5)


def test_loop_drops_a_stopped_edit_and_leaves_its_tensors_alone():
    """A stub objective: edit 0 is learned at once, edit 1 never; edit 0 must stop after step 2
    (patience 1 needs two learned steps with a flat loss) and keep its tensors from then on."""
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))]
    seen_active: list[list[int]] = []

    def objective(model, step, active):
        seen_active.append(list(active))
        losses = [(weights[k] ** 2).sum() for k in active]
        requests = [RequestLoss(loss=float(v.detach()), ft=0.5, ice=0.0, learned=k == 0)
                    for k, v in zip(active, losses)]
        return LossParts.of(torch.stack(losses).sum(), requests)

    class NoParams:
        def training(self, on):
            pass

        def before_step(self):
            pass

        def after_step(self):
            pass

    config = EditConfig(max_steps=5, early_stopping=True, early_stop_patience=1, early_stop_tolerance=1.0,
                        learning_rate=0.1)
    values_after: list[torch.Tensor] = []
    original = objective

    def watching(model, step, active):
        values_after.append(weights[0].detach().clone())
        return original(model, step, active)

    named = {f"w{k}": w for k, w in enumerate(weights)}
    histories = run_independent_edit_loop(None, NoParams(), named, watching, 2, config, progress=False)
    assert [len(h) for h in histories] == [2, 5]
    assert seen_active == [[0, 1], [0, 1], [1], [1], [1]]
    assert all(torch.equal(v, values_after[2]) for v in values_after[2:])
    assert not torch.equal(values_after[2], torch.ones(3))


def _adapter_tensors(editor: ICELoRAEditor, name: str) -> dict[str, torch.Tensor]:
    return {k.replace(f".{name}.", "."): v.detach().clone() for k, v in editor.model.named_parameters()
            if ".lora_" in k and f".{name}." in k}


@pytest.mark.parametrize("together", [True, False], ids=["together", "one-by-one"])
@pytest.mark.parametrize("method", ["ice-lora", "lora", "ice-lora+anchors", "ice-lora+subject-anchors",
                                    "ice-lora+relation-anchors", "ice-lora+projected-relation-anchors",
                                    "ice-lora+sample-every-2", "ice-lora+two-samples-per-context",
                                    "ice-lora+loraplus", "ice-lora+projected-aligned-inputs"])
@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_edit_each_equals_editing_one_at_a_time(builder, method, together, caplog):
    """In float64, so that "equal up to rounding" can be checked tightly (Adam at a high learning
    rate amplifies rounding on these tiny random models: together, rows go through the adapters
    concatenated (``icelora.row_routing``), whose sums round differently; seen: 6e-10 in an adapter,
    9e-8 in the logits). ``+anchors``: with the locality
    term, each edit's anchor rows routed to its own adapter; ``+subject-anchors``: each edit with
    anchors about its own subject (the last request has none: it gets the general anchors);
    ``+relation-anchors``: the same with its subject's other relations; ``+projected-relation-anchors``:
    with each adapter kept orthogonal to its own anchors' leading input directions;
    ``+sample-every-2``: each draw reused for one more step, after some edits have stopped too;
    ``+two-samples-per-context``: each context row prefilled once for its two samples, routed;
    ``+loraplus``: each adapter's ``B`` at 4 times the learning rate of its ``A``;
    ``+projected-aligned-inputs``: each adapter's ``A`` started on its own edit's inputs, off its
    own anchors' directions."""
    loaded = builder()
    loaded.model.double()
    requests = REQUESTS
    extra = {"lambda_locality": 0.5, "locality_anchors": 2} if method.endswith("anchors") else {}
    if method.endswith(("subject-anchors", "relation-anchors")):
        extra["locality_anchor_kind"] = method.split("+")[1].split("-")[-2]
        requests = [replace(REQUESTS[0], subject="The Eiffel Tower"), replace(REQUESTS[1], subject="Danielle Darrieux"),
                    REQUESTS[2]]
    # the preset's constraint only in the projected variant (at 0.8: at the preset's 0.98 the number
    # of protected directions can fall either side of a rounding-sized gap in these tiny models)
    extra["lora_projection_energy"] = 0.8 if "+projected" in method else None
    if method.endswith("sample-every-2"):
        extra["sample_every"] = 2
    if method.endswith("two-samples-per-context"):
        extra["samples_per_context"] = 2
    if method.endswith("loraplus"):
        extra["loraplus_lr_ratio"] = 4.0
    if method.endswith("aligned-inputs"):
        extra["lora_init"] = "edit_inputs"
    variant, method = method, method.split("+")[0]
    editor = ICELoRAEditor(loaded, method=method, **SETTINGS, **extra)
    probe = torch.tensor([editor.tokenizer(PROBE)["input_ids"]])
    plain_logits = editor.model(probe).logits
    counts = editor.parameter_counts()
    alone = []
    for request in requests:
        result = editor.edit(request, progress=False)
        alone.append((result, _adapter_tensors(editor, "default"), editor.model(probe).logits))
        editor.revert()

    editor.edit(requests[0], progress=False)  # an edit the live model holds: edit_each starts from the unedited model
    held = editor.model(probe).logits
    caplog.set_level(logging.INFO, logger="icelora")
    with editor.edit_each(requests, progress=False, together=together) as edits:
        assert len(edits.adapters) == len(requests) == len(set(edits.adapters))
        (logged,) = [r.getMessage() for r in caplog.records if "separately" in r.msg]  # formats (joint seconds)
        assert logged.endswith(f"{edits.seconds:.2f} s")
        for k, (result, tensors, logits) in enumerate(alone):
            mine = edits.results[k]
            assert mine.steps == result.steps
            assert [r.loss for r in mine.history] == pytest.approx(result.losses, rel=1e-9, abs=1e-9)
            together = _adapter_tensors(editor, edits.adapters[k])
            assert together.keys() == tensors.keys()
            for key in tensors:
                assert together[key].dtype == torch.float64
                assert (together[key] - tensors[key]).abs().max() < 1e-8, key
            routed = editor.model(probe, adapter_names=[edits.adapters[k]]).logits
            assert (routed - logits).abs().max() < 1e-6  # adapters' rounding, amplified by the logits
        # unrouted rows see the model as it was
        assert torch.equal(editor.model(probe).logits, held)
        assert edits.results[0].trainable_params == counts[0]
    assert torch.equal(editor.model(probe).logits, held)
    editor.revert()
    assert torch.equal(editor.model(probe).logits, plain_logits)
    if variant == "ice-lora":
        assert len({r.steps for r, _, _ in alone}) > 1, "the edits should stop at different steps"
    assert editor.parameter_counts() == counts
    assert not any(".edit_" in n for n, _ in editor.model.named_parameters())


def test_separate_adapters_protected_directions_come_from_one_forward_pass(monkeypatch):
    """Edits trained together under the null-space constraint: every adapter's anchor inputs come
    from one forward pass, through the base model while the adapters are fresh (a row routed to its
    own adapter would see the same), and give each adapter the directions that a pass over its own
    anchors alone gives."""
    import icelora.icelora_editor as editor_module
    from icelora.input_projection import leading_directions, module_inputs

    loaded = tiny_gpt2()
    loaded.model.double()
    requests = [replace(REQUESTS[0], subject="The Eiffel Tower"), replace(REQUESTS[1], subject="Danielle Darrieux"),
                REQUESTS[2]]
    editor = ICELoRAEditor(loaded, method="ice-lora", **{**SETTINGS, "max_steps": 1}, lambda_locality=0.5,
                           locality_anchor_kind="relation", lora_projection_energy=0.8)
    passes, protected = [], {}
    monkeypatch.setattr(editor_module, "module_inputs",
                        lambda *args, **kwargs: passes.append(kwargs) or module_inputs(*args, **kwargs))
    protect = editor.params.protect
    monkeypatch.setattr(editor.params, "protect", lambda directions, adapter, **options: (
        protected.__setitem__(adapter, directions) if directions else None) or protect(directions, adapter, **options))
    with editor.edit_each(requests, progress=False, together=True) as edits:
        plan = build_plan(editor.tokenizer, requests, editor.config, independent=True, adapter_names=edits.adapters)
        with editor.unedited():
            teachers = editor.anchor_teachers(plan)
    assert len(passes) == 1
    assert passes[0]["adapter_names"] == ["__base__"] * sum(len(t.rows) for t in teachers)
    assert len({len(t.rows) for t in teachers}) > 1  # the anchor sets differ in size
    for adapter, teacher in zip(edits.adapters, teachers):
        alone = module_inputs(editor.model, editor.params.base_modules(), teacher.rows,
                              editor.tokenizer.pad_token_id)  # the adapters are gone: the unedited model
        assert protected[adapter].keys() == alone.keys()
        for name, inputs in alone.items():
            u, v = protected[adapter][name], leading_directions(inputs, 0.8)
            assert u.shape == v.shape, name
            assert torch.allclose(u @ u.T, v @ v.T, atol=1e-8), name


def test_edit_each_needs_a_lora_method():
    editor = ICELoRAEditor(tiny_gpt2(), method="ft-m", max_steps=1)
    with pytest.raises(InvalidConfigError, match="LoRA"), editor.edit_each(REQUESTS[:2], progress=False):
        pass


def test_generate_many_with_a_limit_per_prompt(tiny):
    editor = ICELoRAEditor(tiny, method="lora", max_steps=1)
    prompts = ["The Eiffel Tower is", "Rome is the capital of"]
    assert editor.generate_many(prompts, [2, 6]) == [editor.generate(prompts[0], 2), editor.generate(prompts[1], 6)]


def test_batched_continuation_nll_equals_one_at_a_time(tiny):
    tok = tiny.tokenizer
    items = [(tuple(tok("The Eiffel Tower is")["input_ids"]), tuple(tok(" in Rome")["input_ids"][-2:])),
             (tuple(tok("Rome")["input_ids"]), tuple(tok(" is the capital of Italy")["input_ids"][-4:])),
             (tuple(tok("Rome")["input_ids"]), ())]
    got = continuation_nlls(tiny.model, tok.pad_token_id, items)
    assert got[:2] == pytest.approx([continuation_nll(tiny.model, p, c) for p, c in items[:2]], rel=1e-5)
    assert got[2] != got[2]  # NaN for an empty continuation


@pytest.mark.parametrize("together", [True, False], ids=["together", "one-by-one"])
def test_benchmark_with_edits_at_once_equals_one_at_a_time(tmp_path, fixture_data, together):
    def make():
        return ICELoRAEditor(tiny_llama(), method="ice-lora", **SETTINGS)

    one = run_single(make(), "ice-lora", fixture_data, tmp_path / "one", seed=0, resume=False)
    two = run_single(make(), "ice-lora", fixture_data, tmp_path / "two", seed=0, resume=False, edits_at_once=2,
                     train_together=together)
    for key in STABLE_KEYS:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert two["run"]["edits_at_once"] == 2 and two["run"]["train_together"] is together
    assert "edits_at_once" not in one["run"]
    cases_one = read_cases(tmp_path / "one" / "cases.jsonl")
    cases_two = read_cases(tmp_path / "two" / "cases.jsonl")
    assert [c["after"] for c in cases_two] == [c["after"] for c in cases_one]
    assert [c["steps"] for c in cases_two] == [c["steps"] for c in cases_one]
    assert all(c["case_seconds"] > 0 and c["peak_memory_mb"] > 0 for c in cases_two)
    assert two["seconds_per_case"] > 0

    # a resumed run forms the same groups: lose one case of the first group [0, 1] and resume
    lines = (tmp_path / "two" / "cases.jsonl").read_text().splitlines()
    (tmp_path / "two" / "cases.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")
    again = run_single(make(), "ice-lora", fixture_data, tmp_path / "two", seed=0, resume=True, edits_at_once=2,
                       train_together=together)
    assert {k: again[k] for k in STABLE_KEYS} == {k: two[k] for k in STABLE_KEYS}

    # the other way of training the group may resume it (the cases are the same up to rounding)
    (tmp_path / "two" / "cases.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")
    other = run_single(make(), "ice-lora", fixture_data, tmp_path / "two", seed=0, resume=True, edits_at_once=2,
                       train_together=not together)
    for key in STABLE_KEYS:
        assert other[key] == pytest.approx(two[key], rel=1e-4, abs=1e-6), key


def test_unedited_reference_rows_in_shared_batches(tmp_path, fixture_data):
    editor = ICELoRAEditor(tiny_gpt2(), method="lora", max_steps=1)
    batched = run_single(editor, "none", fixture_data, tmp_path / "none", seed=0, resume=False, edits_at_once=3)
    assert batched["locality"] == 1.0 and batched["fluency_ratio"] == 1.0


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_inputs_each_routes_rows_to_adapters_that_learned_and_skips_fresh_ones(builder):
    """Each adapter's rows see the model as that adapter does: routed to it once it has learned
    something; while every adapter is fresh, the base model's inputs, bit for bit the routed ones.
    The pass stops after the last adapted layer and gives what a full pass gives."""
    from icelora.input_projection import module_inputs

    loaded = builder()
    loaded.model.double()
    editor = ICELoRAEditor(loaded, method="ice-lora", **{**SETTINGS, "max_steps": 1, "layers": [0]})
    assert editor.architecture.num_layers > 1  # the pass stops early
    rows = [[tuple(editor.tokenizer(t)["input_ids"]) for t in texts]
            for texts in (["The Eiffel Tower is in", "Paris"], ["The mother tongue of"])]
    names = editor.params.add_separate_adapters(2)
    try:
        def routed() -> dict[str, torch.Tensor]:
            return module_inputs(editor.model, editor.params.base_modules(), [r for each in rows for r in each],
                                 editor.tokenizer.pad_token_id, adapter_names=[names[0]] * 2 + [names[1]])

        fresh = editor._inputs_each(rows, names)
        for name, full in routed().items():
            assert torch.equal(torch.cat(fresh[name]), full), name
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in editor.params.separate_tensors(names[:1]).values():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
        assert not editor.params.unchanged(names) and editor.params.unchanged(names[1:])
        learned = editor._inputs_each(rows, names)
        for name, full in routed().items():
            assert torch.equal(torch.cat(learned[name]), full), name
        changed = [name for name in learned if not torch.equal(learned[name][0], fresh[name][0])]
        assert changed  # the modules after an adapted one see what adapter 0 learned
        assert all(torch.equal(learned[name][1], fresh[name][1]) for name in learned)  # adapter 1: fresh
    finally:
        editor.params.remove_separate_adapters(names)
