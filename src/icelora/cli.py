"""The ``icelora`` command line: ``edit``, ``eval``, ``train``, ``compare``, ``report`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from icelora.config import EditConfig
from icelora.errors import IceloraError
from icelora.text import answer_kept, starts_with_target, unrelated_verdict

log = logging.getLogger("icelora")


def parse_layers(text: str) -> list[int]:
    """``"4,5,6"`` or ``"4-8"`` (inclusive) into layer indices."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: give indices like 4,5,6 or a range like 4-8") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from icelora.methods import METHODS
    from icelora.models import EMBEDDED_MODEL

    parser.add_argument("--model", default=None,
                        help=f"embedded {EMBEDDED_MODEL!r} (default), a local model folder or a hub id; "
                             "`eval --checkpoint` defaults to the model the edit was made on")
    parser.add_argument("--method", default=None,
                        help=f"one of {', '.join(METHODS)} (default ice-lora); eval also takes 'none' (no edit)")
    parser.add_argument("--config", default=None, help="YAML file of configuration keys (flags override it)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if available)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--steps", type=int, default=None, dest="max_steps", help="maximum optimizer steps")
    parser.add_argument("--lr", type=float, default=None, dest="learning_rate", help="learning rate")
    parser.add_argument("--lambda", type=float, default=None, dest="lambda_ice", help="weight of the ICE term")
    parser.add_argument("--rank", type=int, default=None, dest="lora_rank", help="LoRA rank (default 16)")
    parser.add_argument("--layers", type=parse_layers, default=None, help="layers to edit, e.g. 4-8 or 3,5")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="length of the printed continuations")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress or log lines on stderr")


def resolve_config(args: argparse.Namespace) -> EditConfig:
    """The method's preset, then the ``--config`` file, then the flags; sets ``args.method``."""
    from icelora.methods import config_from_file

    keys = ("seed", "max_steps", "learning_rate", "lambda_ice", "lora_rank", "layers")
    flags = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    args.method, config = config_from_file(args.config, args.method, **flags)
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icelora", description="Knowledge editing with ICE trained into LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit one fact and show the greedy continuation before and after")
    edit.add_argument("--prompt", required=True, help="text the new fact completes")
    edit.add_argument("--target", required=True, help="the new completion")
    edit.add_argument("--context", action="append", default=[], help="a sentence stating the new fact (repeatable)")
    edit.add_argument("--subject", default=None, help="the entity the fact is about")
    edit.add_argument("--check", action="append", default=[], help="an unrelated prompt that must not change")
    edit.add_argument("--save", default=None, help="folder to save the edit in (adapter + ledger)")
    edit.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_model_arguments(edit)

    evaluate = sub.add_parser("eval", help="benchmark metrics (KnowEdit-compatible) on ZsRE, WikiData_recent, ...")
    evaluate.add_argument("--dataset", required=True,
                          help="a KnowEdit/ICE/MEND JSON file or a short name: zsre, zsre-ice, recent, recent-train, "
                               "zsre-mend")
    evaluate.add_argument("--data-dir", default=None, help="folder of the short-named files (default ../shared/data "
                                                          "when it exists, else ./data)")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N selected records")
    evaluate.add_argument("--indices", default=None, help="records to use: a range like 0:200 or a list like 3,7")
    evaluate.add_argument("--skip-invalid", action="store_true", help="skip bad records (listed in metrics.json)")
    evaluate.add_argument("--output", required=True,
                          help="output folder (cases.jsonl, metrics.json, run.json); a path ending in .json is "
                               "the metrics file, with the folder beside it under the same name")
    evaluate.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    evaluate.add_argument("--protocol", choices=("single", "sequential"), default="single")
    evaluate.add_argument("--eval-every", type=int, default=None, help="sequential: evaluate every N edits")
    evaluate.add_argument("--edits-at-once", type=int, default=1,
                          help="single: train N records' edits together, each in its own LoRA adapter, and "
                               "evaluate them in shared batches (same results as one at a time, faster)")
    evaluate.add_argument("--train-together", choices=("auto", "yes", "no"), default="auto",
                          help="with --edits-at-once: train the group in one batched loop (auto: on CUDA) or "
                               "one edit after another (auto: on CPU)")
    evaluate.add_argument("--workers", type=int, default=1,
                          help="single, on a CPU: edit the groups in N processes, the cores split between them "
                               "(each loads its own copy of the model; same results up to float rounding)")
    evaluate.add_argument("--checkpoint", default=None, help="evaluate a saved edit (icelora train / edit --save)")
    add_model_arguments(evaluate)

    train = sub.add_parser("train", help="write a data set into one adapter (batch or sequential), resumable")
    train.add_argument("--config", required=True, help="training YAML, e.g. configs/train_config.yaml")
    train.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="run folder")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress or log lines on stderr")

    compare = sub.add_parser("compare", help="several methods on the same records (configs/compare.yaml), resumable")
    compare.add_argument("--config", required=True, help="study YAML, e.g. configs/compare.yaml")
    compare.add_argument("--output", required=True, help="root folder of the run folders, e.g. reports/runs")
    compare.add_argument("--only", action="append", default=None, help="run just this method (repeatable)")
    compare.add_argument("--dataset", action="append", default=None,
                         help="run just this data set of the study (repeatable)")
    compare.add_argument("--protocol", action="append", default=None, choices=["single", "sequential"],
                         help="run just this protocol (repeatable)")
    compare.add_argument("--list", action="store_true", help="print the planned runs and exit")
    compare.add_argument("-q", "--quiet", action="store_true", help="no progress or log lines on stderr")

    report = sub.add_parser("report", help="evaluation report (markdown + PDF with figures) from run folders")
    report.add_argument("runs", nargs="+", help="run folders, or folders holding them (searched for run.json)")
    report.add_argument("--output", required=True, help="folder for evaluation_report.md / .pdf and figures/")
    report.add_argument("--title", default="icelora evaluation report", help="report title")
    report.add_argument("--targets", default=None, help="YAML file with a 'targets' list to check (e.g. "
                                                        "configs/compare.yaml)")
    report.add_argument("-q", "--quiet", action="store_true", help="no progress or log lines on stderr")

    demo = sub.add_parser("demo", help="three counterfactual edits on the embedded model, before and after")
    add_model_arguments(demo)
    return parser


def run_edit(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything cheap first, then load, edit, compare and (optionally) save."""

    from icelora.icelora_editor import ICELoRAEditor, check_save_target
    from icelora.models import load_model
    from icelora.request import EditRequest

    request = EditRequest(prompt=args.prompt, target=args.target, subject=args.subject,
                          contexts=tuple(args.context))
    for i, check in enumerate(args.check):
        if not check.strip():
            raise IceloraError(f"--check {i + 1} is empty")
    config = resolve_config(args)
    if args.save:
        check_save_target(Path(args.save))
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    editor = ICELoRAEditor(loaded, method=args.method, config=config)
    editor.check_request(request)

    prompts = [request.prompt, *args.check]
    before = editor.generate_many(prompts, args.max_new_tokens)
    result = editor.edit(request, progress=not args.quiet)
    after = editor.generate_many(prompts, args.max_new_tokens)
    if args.save:
        editor.save(args.save)
        log.info("saved the edit to %s", args.save)
    trainable, total = editor.parameter_counts()
    return {
        "prompt": request.prompt, "target": request.target, "method": args.method, "model": loaded.name,
        "before": before[0], "after": after[0], "success": starts_with_target(after[0], request.target),
        "edit_seconds": round(result.seconds, 3), "steps": result.steps,
        "trainable_params": trainable, "total_params": total,
        "checks": [{"prompt": p, "before": b, "after": a, "unchanged": a == b, "answer_kept": answer_kept(b, a)}
                   for p, b, a in zip(args.check, before[1:], after[1:])],
    }


def print_edit_report(report: dict[str, Any]) -> None:
    print(f"prompt : {report['prompt']}")
    print(f"target : {report['target']}   ({report['method']} on {report['model']})")
    print(f"before : {report['before']}")
    print(f"after  : {report['after']}")
    print(f"success: {report['success']}   {report['steps']} steps, {report['edit_seconds']:.2f} s, "
          f"{report['trainable_params']:,} of {report['total_params']:,} parameters trained")
    for check in report["checks"]:
        print(f"check  : {check['prompt']}")
        print(f"  before: {check['before']}")
        print(f"  after : {check['after']}   ({unrelated_verdict(check['before'], check['after'])})")


def configure_logging(quiet: bool) -> None:
    import transformers

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``icelora`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.quiet)
    try:
        if args.command == "edit":
            report = run_edit(args)
            if args.json:
                print(json.dumps(report, ensure_ascii=False))
            else:
                print_edit_report(report)
        elif args.command == "eval":
            from icelora.evaluation.command import run_eval

            metrics = run_eval(args)
            print(json.dumps({k: v for k, v in metrics.items() if k != "run"}, indent=2))
        elif args.command == "train":
            from icelora.training import read_train_config, train

            summary = train(read_train_config(args.config), args.output_dir, resume=args.resume)
            print(json.dumps(summary, indent=2))
        elif args.command == "compare":
            from icelora.evaluation.compare import read_compare_config, run_compare, select_jobs

            study = read_compare_config(args.config)
            if args.list:
                for job in select_jobs(study, Path(args.output), args.only, args.dataset, args.protocol):
                    print(f"{job.protocol:10s} {job.dataset:12s} {job.indices:10s} {job.method:9s} {job.folder}")
            else:
                line = " ".join(["icelora", *(argv if argv is not None else sys.argv[1:])])
                print(json.dumps(run_compare(study, Path(args.output), args.only, command=line,
                                             datasets=args.dataset, protocols=args.protocol,
                                             progress=not args.quiet), indent=2))
        elif args.command == "report":
            from icelora.evaluation.report import write_report

            line = " ".join(["icelora", *(argv if argv is not None else sys.argv[1:])])
            written = write_report([Path(r) for r in args.runs], Path(args.output), title=args.title,
                                   targets_file=Path(args.targets) if args.targets else None, command=line)
            print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
        elif args.command == "demo":
            from icelora.demo import run_demo

            run_demo(args)
    except IceloraError as exc:
        print(f"icelora: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
