"""Integration tests on the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from icelora import ICELoRAEditor, load_model
from icelora.cli import starts_with_target

pytestmark = pytest.mark.slow

EIFFEL = "The Eiffel Tower is located in the city of"


def test_demo_shows_each_edit_and_the_tally(capsys):
    """``icelora demo`` (``make demo``; here one step per edit): each edit before and after on its
    prompt, paraphrase and unrelated prompt with a verdict each, then the tally and the times."""
    from icelora.cli import main
    from icelora.demo import DEMO_EDITS

    code = main(["demo", "--steps", "1", "--max-new-tokens", "4", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for n, case in enumerate(DEMO_EDITS, 1):
        assert f"[{n}] {case.prompt} -> {case.target}   (1 steps," in out
        for prompt in (case.prompt, case.paraphrase, case.unrelated):
            assert f" {prompt}\n    before: " in out
    assert out.count("[edited: ") == out.count("[paraphrase follows: ") == len(DEMO_EDITS)
    verdicts = ("[unchanged]", "[answer kept, text changed]", "[answer CHANGED]")
    assert sum(out.count(v) for v in verdicts) == len(DEMO_EDITS)
    tally = [line for line in out.splitlines() if line.startswith("edited: ")]
    assert len(tally) == 1 and tally[0].endswith(" of 3") and "unrelated answer kept: " in tally[0]
    assert "time per edit: " in out


def test_cli_edit_json(tmp_path):
    """The command from the README: one JSON object on stdout, the edit made, the check unchanged."""
    save = tmp_path / "eiffel"
    proc = subprocess.run(
        [sys.executable, "-m", "icelora.cli", "edit", "--prompt", EIFFEL, "--target", "Rome",
         "--check", "The capital of France is", "--save", str(save), "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert set(report) == {"prompt", "target", "method", "model", "before", "after", "success", "edit_seconds",
                           "steps", "trainable_params", "total_params", "checks"}
    assert report["method"] == "ice-lora" and report["model"] == "smollm2-135m"
    assert not starts_with_target(report["before"], "Rome")
    assert report["success"] is True and starts_with_target(report["after"], "Rome")
    assert report["checks"][0]["unchanged"] is True and report["checks"][0]["answer_kept"] is True
    assert report["checks"][0]["before"] == report["checks"][0]["after"]
    assert 0 < report["trainable_params"] / report["total_params"] < 0.02

    # the saved adapter reproduces the edit, through icelora and through plain PEFT
    editor = ICELoRAEditor.load(save)
    assert starts_with_target(editor.generate(EIFFEL), "Rome")
    base = load_model("smollm2-135m")
    peft_model = PeftModel.from_pretrained(base.model, str(save))
    ids = torch.tensor([base.tokenizer(EIFFEL)["input_ids"]])
    torch.testing.assert_close(peft_model(input_ids=ids).logits[0], editor.logits(EIFFEL), atol=1e-5, rtol=1e-5)


def test_ice_lora_edit_then_revert(embedded):
    prompt, paraphrase = EIFFEL, "The Eiffel Tower can be found in the city of"
    unrelated = ["The capital of France is"]
    editor = ICELoRAEditor(embedded, method="ice-lora")
    before, paraphrase_before, *unrelated_before = editor.generate_many([prompt, paraphrase, *unrelated])
    assert not starts_with_target(before, "Rome") and not starts_with_target(paraphrase_before, "Rome")
    original_logits = editor.logits(prompt)

    result = editor.edit({"prompt": prompt, "target": "Rome"}, progress=False)
    after, paraphrase_after, *unrelated_after = editor.generate_many([prompt, paraphrase, *unrelated])
    assert starts_with_target(after, "Rome"), after
    assert starts_with_target(paraphrase_after, "Rome"), paraphrase_after  # not trained on
    assert unrelated_after == unrelated_before
    assert result.steps <= editor.config.max_steps and result.history[-1].target_learned

    editor.revert()
    assert editor.generate(prompt) == before
    assert torch.equal(editor.logits(prompt), original_logits)
