"""Metrics against hand-computed values, aggregation, and resumable benchmark runs on tiny models."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from icelora import ICELoRAEditor
from icelora.evaluation.metrics import (
    AnswerPrediction,
    agreement,
    batches_by_length,
    continuation_nll,
    continuation_nlls,
    ngram_entropy,
    perplexity_ratio,
    predict_answers,
    scored_logits,
    word_tokenize,
)
from icelora.evaluation.runner import RunFolderError, aggregate, read_cases, run_sequential, run_single
from icelora.tokenization import next_token_view, pad_rows
from tests.conftest import tiny_gpt2, tiny_llama


def test_token_accuracy_with_bos_and_padding():
    loaded = tiny_llama()
    tok = loaded.tokenizer
    pairs = [("The city of", "Rome"), ("Which family does Epaspidoceras belong to?", "Noctuidae family")]
    preds = predict_answers(loaded.model, tok, pairs, batch_size=2)  # one padded batch
    for (prompt, answer), pred in zip(pairs, preds):
        ids = tok(f"{prompt} {answer}")["input_ids"]
        assert ids[0] == tok.bos_token_id
        n = len(pred.answer_ids)
        assert tok.decode(list(pred.answer_ids)).strip() == answer  # BOS never counted
        logits = loaded.model(torch.tensor([ids])).logits[0]  # unpadded, alone
        expected = logits[len(ids) - n - 1: len(ids) - 1].argmax(-1).tolist()
        assert list(pred.predicted_ids) == expected
        assert pred.accuracy == sum(a == b for a, b in zip(pred.answer_ids, expected)) / n


PAIRS = [("The city of", "Rome"), ("Which family does Epaspidoceras belong to?", "Noctuidae family"),
         ("Rome is the capital of", "Italy"), ("Danielle Darrieux", "speaks French"),
         ("The", "Eiffel Tower is in Paris")]


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_answers_and_continuations_scored_in_batches_by_length_equal_each_alone(builder):
    """Rows batched shortest first (two to a batch here) come back in their own order, each with
    what it gives alone."""
    loaded = builder()
    tok = loaded.tokenizer
    assert batches_by_length([5, 2, 9, 2, 7], 2) == [[1, 3], [0, 4], [2]]
    batched = predict_answers(loaded.model, tok, PAIRS, batch_size=2)
    assert batched == [predict_answers(loaded.model, tok, [pair], batch_size=1)[0] for pair in PAIRS]
    items = [(tuple(tok(p)["input_ids"]), tuple(tok(" " + a, add_special_tokens=False)["input_ids"])) for p, a in PAIRS]
    items.append((items[0][0], ()))
    got = continuation_nlls(loaded.model, tok.pad_token_id, items, batch_size=2)
    assert got[:-1] == pytest.approx([continuation_nll(loaded.model, p, c) for p, c in items[:-1]], rel=1e-5)
    assert math.isnan(got[-1])


class _LogitsFromEmbeddings(nn.Module):
    """A tiny model whose logits are its hidden states times the input embeddings: the layer it
    names as its output layer is never called."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs: torch.Tensor) -> SimpleNamespace:
        hidden = self.inner.base_model(**kwargs).last_hidden_state
        return SimpleNamespace(logits=hidden @ self.inner.get_input_embeddings().weight.T)


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("own_product", [False, True], ids=["output-layer", "own-product"])
def test_scored_logits_are_the_full_pass_logits_at_the_scored_positions(builder, own_product):
    """Only the positions that predict a scored token reach the output layer, and their logits,
    labels and rows are those of the whole pass; a model that makes its logits without its output
    layer has them read from its full logits."""
    loaded = builder()
    model = _LogitsFromEmbeddings(loaded.model) if own_product else loaded.model
    tok = loaded.tokenizer
    rows = [tuple(tok(t)["input_ids"]) for t in ("The Eiffel Tower is in Rome", "Rome", "Danielle Darrieux speaks")]
    batch = pad_rows(rows, tok.pad_token_id, side="right")
    spans = [(1, len(rows[0])), (0, len(rows[1])), (len(rows[2]) - 2, len(rows[2]))]
    mask = batch.span_mask(spans)
    read: list[torch.Size] = []
    hook = loaded.model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: read.append(out.shape))
    with torch.no_grad():
        logits, labels, owners = scored_logits(model, batch, spans)
    hook.remove()
    scored = int(mask[:, 1:].sum())
    assert read == ([] if own_product else [torch.Size([1, scored, len(tok)])])
    with torch.no_grad():
        full = next_token_view(model(**batch.forward_kwargs()).logits, batch, mask)
    assert logits.shape[0] == scored
    torch.testing.assert_close(logits, full[0])
    assert torch.equal(labels, full[1]) and torch.equal(owners, full[2])


def test_accuracy_and_agreement_by_hand():
    pred = AnswerPrediction(answer_ids=(5, 6, 7, 8), predicted_ids=(5, 0, 7, 0))
    assert pred.accuracy == 0.5
    other = AnswerPrediction(answer_ids=(5, 6, 7, 8), predicted_ids=(5, 0, 1, 1))
    assert agreement(pred, other) == 0.5
    assert agreement(pred, pred) == 1.0


def test_ngram_entropy_of_a_known_string():
    # words: a b a b a b -> bigrams ab x3, ba x2; trigrams aba x2, bab x2
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    h3 = 1.0
    assert ngram_entropy("a b a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("same same same same") == 0.0
    assert word_tokenize("It is Rome. It isn't Paris.") == ["It", "is", "Rome", ".", "It", "is", "n't", "Paris", "."]


def test_perplexity_ratio():
    assert perplexity_ratio(math.log(20.0), math.log(4.0)) == pytest.approx(5.0)
    assert perplexity_ratio(float("nan"), 1.0) is None  # nothing generated to score: no value, not NaN
    cases = [{**case, "ppl_r": value} for case, value in zip(
        [{"edit_success": 1.0, "rephrase": None, "portability": None, "portability_by_type": {}, "locality": None,
          "locality_by_type": {}, "fluency": 5.0, "fluency_unedited": 5.0, "exact_match": 1.0}] * 3, [1.0, None, 3.0])]
    assert aggregate(cases)["ppl_r"] == 2.0 and aggregate(cases)["ppl_r_median"] == 2.0


def _case(index, portability, locality):
    pooled = [v for values in portability.values() for v in values]
    return {"index": index, "edit_success": 1.0, "rephrase": None, "fluency": 5.0, "fluency_unedited": 5.0,
            "ppl_r": 1.0, "exact_match": 1.0, "seconds": 1.0, "steps": 3,
            "portability": sum(pooled) / len(pooled) if pooled else None,
            "portability_by_type": {k: sum(v) / len(v) for k, v in portability.items()},
            "locality": 1.0 if locality else None,
            "locality_by_type": {"Relation_Specificity": 1.0} if locality else {}}


def test_pooled_versus_per_type_portability():
    cases = [_case(0, {"Reasoning": [1.0, 0.0], "Subject_Aliasing": [1.0]}, True),  # pooled 2/3
             _case(1, {"Reasoning": [0.0]}, True),                                  # pooled 0
             _case(2, {}, False)]                                                  # no portability
    metrics = aggregate(cases)
    assert metrics["portability"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert metrics["portability_by_type"] == {"Reasoning": pytest.approx(0.25), "Subject_Aliasing": 1.0}
    assert metrics["locality"] == 1.0 and metrics["n_cases"] == 3
    assert metrics["fluency_ratio"] == 1.0


def test_locality_is_one_when_the_model_is_unchanged(tmp_path, fixture_data):
    editor = ICELoRAEditor(tiny_gpt2(), method="lora", max_steps=1)
    metrics = run_single(editor, "none", fixture_data, tmp_path / "none", seed=0, resume=False)
    assert metrics["locality"] == 1.0
    assert metrics["locality_by_type"] == {"Forgetfulness": 1.0, "Relation_Specificity": 1.0}
    assert metrics["fluency_ratio"] == 1.0
    assert metrics["n_cases"] == 3 and metrics["run"]["method"] == "none"


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bars_only_when_asked(tmp_path, fixture_data, capsys, progress):
    editor = ICELoRAEditor(tiny_gpt2(), method="lora", max_steps=1)
    run_single(editor, "none", fixture_data, tmp_path / "none", seed=0, resume=False, progress=progress)
    run_sequential(ICELoRAEditor(tiny_gpt2(), method="lora", max_steps=1), fixture_data, tmp_path / "seq", seed=0,
                   resume=False, eval_every=2, progress=progress)
    stderr = capsys.readouterr().err
    for bar in ("unedited baselines", "none single", "sequential edits", "eval after 2", "final eval"):
        assert (bar in stderr) == progress, bar


STABLE_KEYS = ("n_cases", "edit_success", "rephrase", "portability", "portability_by_type", "locality",
               "locality_by_type", "fluency", "fluency_ratio", "ppl_r", "exact_match", "median_steps")


def test_resume_equals_uninterrupted(tmp_path, fixture_data, monkeypatch):
    def make():
        return ICELoRAEditor(tiny_llama(), method="ice-lora", max_steps=3, learning_rate=1e-2)

    full = run_single(make(), "ice-lora", fixture_data, tmp_path / "full", seed=0, resume=False)

    editor = make()
    real_edit, calls = editor.edit, {"n": 0}

    def dying_edit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_edit(*args, **kwargs)

    monkeypatch.setattr(editor, "edit", dying_edit)
    with pytest.raises(KeyboardInterrupt):
        run_single(editor, "ice-lora", fixture_data, tmp_path / "resumed", seed=0, resume=False)
    assert len(read_cases(tmp_path / "resumed" / "cases.jsonl")) == 1
    with open(tmp_path / "resumed" / "cases.jsonl", "a") as handle:
        handle.write('{"index": 9, "cut off')  # a line half-written when the process died
    with pytest.raises(RunFolderError, match="--resume"):
        run_single(make(), "ice-lora", fixture_data, tmp_path / "resumed", seed=0, resume=False)
    resumed = run_single(make(), "ice-lora", fixture_data, tmp_path / "resumed", seed=0, resume=True)
    assert {k: resumed[k] for k in STABLE_KEYS} == {k: full[k] for k in STABLE_KEYS}
    assert [c["index"] for c in read_cases(tmp_path / "resumed" / "cases.jsonl")] == [0, 1, 2]
    with pytest.raises(RunFolderError, match="differs"):
        run_single(make(), "ice-lora", fixture_data, tmp_path / "resumed", seed=1, resume=True)


def test_replay_keys_matter_for_resuming_only_where_edits_accumulate(tmp_path, fixture_data):
    def make(replay_edits: int, learning_rate: float = 1e-2):
        return ICELoRAEditor(tiny_gpt2(), method="lora", max_steps=2, learning_rate=learning_rate,
                             replay_edits=replay_edits)

    single = run_single(make(0), "lora", fixture_data, tmp_path / "single", seed=0, resume=False)
    again = run_single(make(4), "lora", fixture_data, tmp_path / "single", seed=0, resume=True)  # inert there
    assert again["n_cases"] == single["n_cases"]
    with pytest.raises(RunFolderError, match="differs"):
        run_single(make(4, learning_rate=2e-2), "lora", fixture_data, tmp_path / "single", seed=0, resume=True)
    run_sequential(make(0), fixture_data, tmp_path / "seq", seed=0, resume=False, eval_every=None)
    with pytest.raises(RunFolderError, match="differs"):
        run_sequential(make(4), fixture_data, tmp_path / "seq", seed=0, resume=True, eval_every=None)


def test_metrics_file_has_every_key(tmp_path, fixture_data):
    editor = ICELoRAEditor(tiny_gpt2(), method="ice-lora", max_steps=2)
    run_single(editor, "ice-lora", fixture_data, tmp_path / "run", seed=0, resume=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("n_cases", "edit_success", "rephrase", "portability", "portability_by_type", "locality",
                "locality_by_type", "fluency", "fluency_ratio", "ppl_r", "exact_match", "seconds_per_edit",
                "peak_memory_mb", "run"):
        assert key in metrics, key
    run = metrics["run"]
    assert run["config"]["lora_rank"] == 16 and run["indices"] == [0, 1, 2] and len(run["data_sha256"]) == 64
    case = json.loads((tmp_path / "run" / "cases.jsonl").read_text().splitlines()[0])
    assert {"before", "after", "edit_success", "locality_by_type"} <= set(case)


def test_sequential_keeps_earlier_edits_and_resumes(tmp_path, fixture_data):
    def make():
        return ICELoRAEditor(tiny_llama(), method="ice-lora", max_steps=2, learning_rate=1e-2)

    metrics = run_sequential(make(), fixture_data, tmp_path / "seq", seed=0, resume=False, eval_every=2)
    assert metrics["n_cases"] == 3
    curve = read_cases(tmp_path / "seq" / "curve.jsonl")
    assert [c["n_edits"] for c in curve] == [2, 3]
    again = run_sequential(make(), fixture_data, tmp_path / "seq", seed=0, resume=True, eval_every=2)
    assert {k: again[k] for k in STABLE_KEYS} == {k: metrics[k] for k in STABLE_KEYS}
    assert all(e["peak_memory_mb"] > 0 for e in read_cases(tmp_path / "seq" / "edits.jsonl"))
    # re-reading a finished run keeps the peak it was measured at, even one above this process's
    written = json.loads((tmp_path / "seq" / "metrics.json").read_text())
    (tmp_path / "seq" / "metrics.json").write_text(json.dumps({**written, "peak_memory_mb": 1e7}))
    third = run_sequential(make(), fixture_data, tmp_path / "seq", seed=0, resume=True, eval_every=2)
    assert third["peak_memory_mb"] == 1e7


def test_sequential_resume_without_the_saved_state_refuses_instead_of_measuring_the_unedited_model(
        tmp_path, fixture_data):
    import shutil

    def make():
        return ICELoRAEditor(tiny_llama(), method="ice-lora", max_steps=1, learning_rate=1e-2)

    folder = tmp_path / "seq"
    run_sequential(make(), fixture_data, folder, seed=0, resume=False, eval_every=2)
    shutil.rmtree(folder / "state")
    # finished: nothing left that needs the edited model, so the run is re-read without it
    assert run_sequential(make(), fixture_data, folder, seed=0, resume=True, eval_every=2)["n_cases"] == 3
    (folder / "metrics.json").unlink()
    (folder / "cases.jsonl").write_text("")  # killed before the final evaluation
    with pytest.raises(RunFolderError, match="state"):
        run_sequential(make(), fixture_data, folder, seed=0, resume=True, eval_every=2)


def test_read_cases_drops_only_an_unfinished_last_line(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"ind')
    assert read_cases(path) == [{"index": 0}, {"index": 1}]
    assert path.read_text().endswith('{"ind')  # reading alone (a report) leaves the file as it is
    assert read_cases(path, repair=True) == [{"index": 0}, {"index": 1}]
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n'  # cut before a run appends to it
    path.write_text('{"index": 0}\n{"index": 1}')  # whole, but its newline never written
    assert read_cases(path, repair=True) == [{"index": 0}] and path.read_text() == '{"index": 0}\n'
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(RunFolderError, match=r"cases.jsonl, line 2"):
        read_cases(path, repair=True)
    assert path.read_text().endswith('{"index": 2}\n')  # nothing after the bad line is lost


def test_a_run_from_before_a_config_key_existed_resumes(tmp_path):
    import json

    from icelora.config import EditConfig
    from icelora.evaluation.runner import BenchmarkRun, RunFolderError

    config = EditConfig().to_dict()
    run = {"method": "ice-lora", "config": config, "indices": [0, 1]}
    older = {**run, "config": {k: v for k, v in config.items() if k not in ("lambda_locality", "locality_anchors")}}
    (tmp_path / "run.json").write_text(json.dumps(older))
    BenchmarkRun(tmp_path, run, resume=True)  # the missing keys were at their defaults: same run
    changed = {**run, "config": {**config, "lambda_locality": 1.0}}
    with pytest.raises(RunFolderError, match="config"):
        BenchmarkRun(tmp_path, changed, resume=True)
