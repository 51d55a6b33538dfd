"""How many input directions ``lora_projection_energy`` protects, module by module, for one record.

    python benchmarks/protected_directions.py --dataset zsre-ice --index 1000 --energy 0.9 0.98

The record's anchors are made as an edit makes them (the ``ice-lora`` preset's relation anchors),
the unedited model runs over them once, and for each adapted module the table gives the anchor
positions, the module's input size and, per energy, the number of protected directions.
"""

from __future__ import annotations

import argparse

from icelora import ICELoRAEditor
from icelora.data_utils.dataset import load_dataset, resolve_dataset
from icelora.input_projection import leading_directions, module_inputs
from icelora.losses import build_plan
from icelora.models import EMBEDDED_MODEL


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a short name (zsre-ice, ...) or a path")
    parser.add_argument("--index", type=int, required=True, help="the record's index in the file")
    parser.add_argument("--energy", type=float, nargs="+", default=[0.9])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="edited layers (default: the preset's)")
    args = parser.parse_args(argv)
    (record,) = load_dataset(resolve_dataset(args.dataset), indices=f"{args.index}:{args.index + 1}").records
    editor = ICELoRAEditor(args.model, layers=args.layers, lora_projection_energy=args.energy[0])
    (teacher,) = editor.anchor_teachers(build_plan(editor.tokenizer, [record.request], editor.config))
    inputs = module_inputs(editor.model, editor.params.base_modules(), teacher.rows, editor.tokenizer.pad_token_id)
    print(f"| module | positions | inputs | {' | '.join(f'directions at {e}' for e in args.energy)} |")
    print("|---|---|---|" + "---|" * len(args.energy))
    for name, x in inputs.items():
        counts = " | ".join(str(leading_directions(x, e).shape[1]) for e in args.energy)
        print(f"| {name} | {x.shape[0]} | {x.shape[1]} | {counts} |")


if __name__ == "__main__":
    main()
