"""How selective a protected input subspace is: which share of the locality prompts' and of the
edit prompt's input energy falls in it, per module and energy, for three sources of directions.

    python benchmarks/protection_selectivity.py --dataset zsre-ice --indices 1000:1008 --energy 0.9 0.98 0.99

Under ``lora_projection_energy`` an edit's adapter is blind to the leading input directions of its
own locality anchors (``anchors`` below; the ``ice-lora`` preset's relation anchors). The other two
sources are fixed, the same for every edit (the "preserved knowledge" form of AlphaEdit, which in
sequential editing would let no edit's projection remove another's part):

- ``general-texts``: the general anchor texts (``icelora.anchors.ANCHOR_TEXTS``);
- ``general-relations``: the relation anchors of :data:`SUBJECTS` (a fixed list taken from no
  record) together with the general texts.

For each record and module, a share is ``||X U||^2 / ||X||^2``: ``X`` the module's inputs (unedited
model) at every position of the record's locality prompts followed by their answers (``loc``), or
of its edit prompt followed by its target (``edit``), ``U`` the protected directions. A useful
subspace holds much of ``loc`` and little of ``edit``: what it holds of ``loc`` no edit can change,
what it holds of ``edit`` the edit cannot use. The table gives means over the records.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from icelora import ICELoRAEditor
from icelora.anchors import ANCHOR_TEXTS, relation_anchors
from icelora.data_utils.dataset import load_dataset, resolve_dataset
from icelora.input_projection import leading_directions, module_inputs
from icelora.losses import build_plan
from icelora.models import EMBEDDED_MODEL
from icelora.request import EditRequest

SUBJECTS = (
    "Albert Einstein", "Paris", "the Amazon River", "Microsoft", "William Shakespeare", "Japan", "the Beatles",
    "Mount Kilimanjaro", "Marie Curie", "Toyota", "the Roman Empire", "Lionel Messi", "the Nile", "Google",
    "Frida Kahlo", "Canada", "the Great Wall of China", "Ludwig van Beethoven", "Harvard University", "the Moon",
    "Nelson Mandela", "Barcelona", "the Mississippi River", "Apple Inc.",
)


def share_in(inputs: torch.Tensor, directions: torch.Tensor) -> float:
    """The share of ``inputs``' ([positions, in]) squared norm inside the span of ``directions``."""
    return ((inputs @ directions).norm() ** 2 / inputs.norm() ** 2).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a short name (zsre-ice, ...) or a path")
    parser.add_argument("--indices", required=True, help="records START:STOP")
    parser.add_argument("--energy", type=float, nargs="+", default=[0.98])
    parser.add_argument("--layer", type=int, default=6, help="the edited layer whose modules are measured")
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    args = parser.parse_args(argv)
    records = load_dataset(resolve_dataset(args.dataset), indices=args.indices).records
    editor = ICELoRAEditor(args.model, lora_projection_energy=args.energy[0])
    tokenizer, pad = editor.tokenizer, editor.tokenizer.pad_token_id
    modules = {n: m for n, m in editor.params.base_modules().items() if f".layers.{args.layer}." in n}

    def rows(texts: list[str]) -> list[tuple[int, ...]]:
        return [tuple(tokenizer(t)["input_ids"]) for t in texts]

    texts = module_inputs(editor.model, modules, rows(list(ANCHOR_TEXTS)), pad)
    subjects = [EditRequest(prompt="?", target="?", subject=s) for s in SUBJECTS]
    relations = module_inputs(editor.model, modules, relation_anchors(editor.model, tokenizer, pad, subjects).rows, pad)
    fixed = {(name, e): {"general-texts": leading_directions(texts[name], e),
                         "general-relations": leading_directions(torch.cat([relations[name], texts[name]]), e)}
             for name in modules for e in args.energy}
    sums: dict[tuple[str, float, str], list[list[float]]] = defaultdict(list)
    for record in records:
        (teacher,) = editor.anchor_teachers(build_plan(tokenizer, [record.request], editor.config))
        anchors = module_inputs(editor.model, modules, teacher.rows, pad)
        loc = module_inputs(editor.model, modules, rows([f"{i.prompt} {i.answer}" for i in record.locality]), pad)
        edit = module_inputs(editor.model, modules, rows([f"{record.request.prompt} {record.request.target}"]), pad)
        for name in modules:
            for e in args.energy:
                for source, u in {"anchors": leading_directions(anchors[name], e), **fixed[(name, e)]}.items():
                    sums[(name, e, source)].append([u.shape[1], share_in(loc[name], u), share_in(edit[name], u)])
    print(f"{len(records)} records ({args.dataset} {args.indices}), layer {args.layer}")
    print("| module | energy | directions from | directions | loc share | edit share |")
    print("|---|---|---|---|---|---|")
    for (name, e, source), values in sums.items():
        k, loc_share, edit_share = (sum(v) / len(v) for v in zip(*values))
        print(f"| {name.split('.', 1)[1]} | {e} | {source} | {k:.0f} | {loc_share:.3f} | {edit_share:.3f} |")


if __name__ == "__main__":
    main()
