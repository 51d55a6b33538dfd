"""``icelora demo``: three counterfactual edits, each shown before and after on the edit prompt, a
paraphrase it was not trained on, and an unrelated prompt whose answer must not change; then how
many edits took, carried to the paraphrase, and kept the unrelated answer."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from icelora.cli import resolve_config
from icelora.icelora_editor import ICELoRAEditor
from icelora.models import load_model
from icelora.text import answer_kept, starts_with_target, unrelated_verdict


@dataclass(frozen=True)
class DemoEdit:
    """A counterfactual edit with a paraphrase and an unrelated prompt to look at."""

    prompt: str
    target: str
    subject: str
    paraphrase: str
    unrelated: str


DEMO_EDITS = (
    DemoEdit("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower",
             "The Eiffel Tower can be found in the city of", "The capital of Japan is"),
    DemoEdit("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux",
             "The native language of Danielle Darrieux is", "The Mona Lisa was painted by"),
    DemoEdit("The iPhone is produced by", "Microsoft", "The iPhone",
             "The iPhone is made by the company", "The Statue of Liberty is located in"),
)


def run_demo(args: argparse.Namespace) -> None:
    """Run the demo edits from the unedited model each time and print what changed."""
    config = resolve_config(args)
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    editor = ICELoRAEditor(loaded, method=args.method, config=config)
    trainable, total = editor.parameter_counts()
    print(f"icelora demo: {args.method} on {loaded.name}, {trainable:,} of {total:,} parameters trainable "
          f"({100 * trainable / total:.2f}%), loaded in {time.perf_counter() - started:.1f} s\n")
    times, tally = [], {"edited": 0, "paraphrase follows": 0, "unrelated answer kept": 0}
    for n, case in enumerate(DEMO_EDITS, 1):
        prompts = [case.prompt, case.paraphrase, case.unrelated]
        before = editor.generate_many(prompts, args.max_new_tokens)
        result = editor.edit({"prompt": case.prompt, "target": case.target, "subject": case.subject},
                             progress=not args.quiet)
        after = editor.generate_many(prompts, args.max_new_tokens)
        editor.revert()
        times.append(result.seconds)
        print(f"[{n}] {case.prompt} -> {case.target}   ({result.steps} steps, {result.seconds:.1f} s)")
        outcome = {"edited": starts_with_target(after[0], case.target),
                   "paraphrase follows": starts_with_target(after[1], case.target),
                   "unrelated answer kept": answer_kept(before[2], after[2])}
        tally = {k: tally[k] + outcome[k] for k in tally}
        verdicts = (f"edited: {outcome['edited']}", f"paraphrase follows: {outcome['paraphrase follows']}",
                    unrelated_verdict(before[2], after[2]))
        for label, prompt, b, a, verdict in zip(("edit", "paraphrase", "unrelated"), prompts, before, after,
                                                verdicts):
            print(f"  {label:<10} {prompt}")
            print(f"    before: {b!r}")
            print(f"    after : {a!r}   [{verdict}]")
        print()
    print(", ".join(f"{k}: {v} of {len(DEMO_EDITS)}" for k, v in tally.items()))
    print(f"time per edit: {', '.join(f'{t:.1f} s' for t in times)} (mean {sum(times) / len(times):.1f} s); "
          f"whole demo {time.perf_counter() - started:.1f} s")
