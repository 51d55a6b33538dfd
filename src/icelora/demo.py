"""``icelora demo``: three counterfactual edits, each shown before and after on the edit prompt, a
paraphrase it was not trained on, and an unrelated prompt that must not change."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from icelora.cli import resolve_config, starts_with_target
from icelora.icelora_editor import ICELoRAEditor
from icelora.models import load_model


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
    times = []
    for n, case in enumerate(DEMO_EDITS, 1):
        prompts = [case.prompt, case.paraphrase, case.unrelated]
        before = editor.generate_many(prompts, args.max_new_tokens)
        result = editor.edit({"prompt": case.prompt, "target": case.target, "subject": case.subject},
                             progress=not args.quiet)
        after = editor.generate_many(prompts, args.max_new_tokens)
        editor.revert()
        times.append(result.seconds)
        print(f"[{n}] {case.prompt} -> {case.target}   ({result.steps} steps, {result.seconds:.1f} s)")
        verdicts = (f"edited: {starts_with_target(after[0], case.target)}",
                    f"paraphrase follows: {starts_with_target(after[1], case.target)}",
                    f"unchanged: {after[2] == before[2]}")
        for label, prompt, b, a, verdict in zip(("edit", "paraphrase", "unrelated"), prompts, before, after,
                                                verdicts):
            print(f"  {label:<10} {prompt}")
            print(f"    before: {b!r}")
            print(f"    after : {a!r}   [{verdict}]")
        print()
    print(f"time per edit: {', '.join(f'{t:.1f} s' for t in times)} (mean {sum(times) / len(times):.1f} s); "
          f"whole demo {time.perf_counter() - started:.1f} s")
