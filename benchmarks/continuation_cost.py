"""What the ICE training pass's continuation pass costs one edit on a CPU, as an upper bound.

    python benchmarks/continuation_cost.py --config configs/ice-lora-frozen-bf16.yaml --edit 2 --steps 10 --rounds 4

On a CPU the ICE training pass runs as two passes (:mod:`icelora.shared_prefix`): the prefix pass
(each request's ``q + x*``, the locality anchors riding along) and the continuation pass (the
first ``m - 1`` sampled completion tokens of every student row, from the prefix's KV cache). Any
way of folding the second into the first (one packed row per request under a custom attention
mask, say) still has to run those tokens, so it can save at most what the continuation pass
costs, forward and backward. This measures that (on the embedded model unless ``--model``):
one benchmark edit with early stopping off, for
``--steps`` steps, timed as it is and with the continuation pass replaced by nothing (the output
layer reads zero hidden states at its positions, so the loss still has the completion terms but
nothing flows back through the cache), and, for comparison, the two ways the objective can run
the pass in one go: whole student rows ``q + x* + x_c`` with the anchors in a pass of their own
(the objective's ``shared_prefix`` off), and whole rows with the anchors riding in them
(``main_pass_anchors`` on too). The ways are alternated for ``--rounds`` rounds. The edits
timed with the pass left out are not edits anyone should use; only their time is of interest.
Printed: each round's milliseconds per step (the edit call's wall time, its once-per-edit work
included, over its steps) each way, then the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch
from edit_speed import benchmark_requests
from torch import nn

import icelora.shared_prefix
from icelora import ICELoRAEditor, load_model
from icelora.losses import Objective
from icelora.methods import config_from_file
from icelora.output_layer import output_layer
from icelora.shared_prefix import PrefixLayout


def continuation_left_out(model: nn.Module, cache: Any, prefix_mask: torch.Tensor, layout: PrefixLayout,
                          tokens: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
    """Stands in for :func:`icelora.shared_prefix.continue_from_prefix`: the output layer on zero
    hidden states at the continuation's positions, no pass through the model."""
    head = output_layer(model)
    hidden = torch.zeros(len(layout.row_owner), layout.continued, model.config.hidden_size,
                         dtype=head.weight.dtype, device=head.weight.device)
    return head(hidden)


def whole_rows() -> Any:
    """The objective runs whole student rows ``q + x* + x_c`` in one pass (``shared_prefix`` off)."""
    return mock.patch.object(Objective, "encodes_prefix_once", lambda self, device: False)


#: each way's changes for the time of its edit (``mock.patch`` objects, undone after it)
WAYS: dict[str, Callable[[], list[Any]]] = {
    "as it is": lambda: [],
    "left out": lambda: [mock.patch.object(icelora.shared_prefix, "continue_from_prefix", continuation_left_out)],
    "whole rows": lambda: [whole_rows()],
    "whole rows, anchors riding": lambda: [whole_rows(), mock.patch.object(Objective, "anchors_in_main_pass",
                                                                           lambda self, device: True)],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model name or folder (default: the embedded model)")
    parser.add_argument("--config", default=None, help="YAML of configuration keys (default: the ice-lora preset)")
    parser.add_argument("--edit", type=int, default=2, help="which benchmark edit (0-based, as edit_speed.py)")
    parser.add_argument("--steps", type=int, default=10, help="steps per edit (early stopping off)")
    parser.add_argument("--rounds", type=int, default=4, help="times each way is timed, alternated")
    args = parser.parse_args(argv)
    method, config = config_from_file(args.config, early_stopping=False, max_steps=args.steps)
    editor = ICELoRAEditor(load_model(args.model, device="cpu"), method=method, config=config)
    request = benchmark_requests(args.edit + 1)[args.edit]
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for round_ in range(args.rounds):
        for name, patches in WAYS.items():
            editor.revert()
            with ExitStack() as patched:
                for patch in patches():
                    patched.enter_context(patch)
                start = time.perf_counter()
                result = editor.edit(request, progress=False)
                times[name].append((time.perf_counter() - start) / result.steps * 1000)
            editor.revert()
        print(f"round {round_}: " + ", ".join(f"{n} {t[-1]:.0f}" for n, t in times.items()) + " ms per step",
              flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    saved = medians["as it is"] - medians["left out"]
    print(f"median over {args.rounds} rounds: " + ", ".join(f"{n} {m:.0f}" for n, m in medians.items())
          + f" ms per step; the continuation pass costs {saved:.0f} ms, {saved / medians['as it is']:.0%} of a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
