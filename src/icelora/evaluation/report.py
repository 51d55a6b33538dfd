"""``icelora report``: the evaluation report (markdown, PDF, PNG figures) from run folders.

Every table is followed by the commands that produced its runs (from their ``run.json``); every
number comes from the runs' ``metrics.json`` (or, for an unfinished run, from its finished cases,
marked "partial").
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from icelora.evaluation.locality_conflicts import locality_split, records_asking_edited_fact
from icelora.evaluation.published import PUBLISHED_KNOWEDIT_LLAMA2
from icelora.evaluation.report_data import (
    COST_COLUMNS,
    MAIN_COLUMNS,
    RunSummary,
    by_type_columns,
    by_type_rows,
    commands,
    example_cases,
    find_run_folders,
    format_value,
    group_runs,
    on_shared_records,
    read_run,
    row_label,
    table_rows,
)
from icelora.evaluation.targets import Target, check_targets, read_targets

log = logging.getLogger(__name__)

BAR_METRICS = ("edit_success", "rephrase", "portability", "locality", "fluency_ratio", "exact_match")
COST_METRICS = (("seconds_per_edit", "seconds per edit"), ("peak_memory_mb", "peak memory (MB)"),
                ("trainable_params", "trainable parameters"))
CURVE_METRICS = ("edit_success", "rephrase", "portability", "locality", "fluency_ratio")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (``|`` inside a cell escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_block(runs: list[RunSummary]) -> str:
    """The "Reproduce:" block under a table: the commands recorded in its runs' ``run.json``."""
    found = commands(runs)
    if not found:
        return ""
    return "Reproduce:\n\n```bash\n" + "\n".join(found) + "\n```\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_figure(runs: list[RunSummary], metrics: tuple[str, ...], title: str) -> Any:
    """Grouped bars: one group per metric, one bar per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        values = [missing_as_nan(run.metrics.get(m)) for m in metrics]  # no bar where a run has no value
        ax.bar([x + i * width for x in range(len(metrics))], values, width, label=row_label(run))
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(metrics))], list(metrics))
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(7, len(runs)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    return fig


def missing_as_nan(value: Any) -> float:
    """A bar's height: NaN (no bar drawn) for a value the run does not have."""
    return float("nan") if value is None else float(value)


def cost_figure(runs: list[RunSummary], title: str) -> Any:
    """Time per edit, peak memory and trainable parameters per method (log scale where it spans)."""
    plt = _plt()
    edited = [r for r in runs if r.method != "none"]
    fig, axes = plt.subplots(1, len(COST_METRICS), figsize=(12, 3.6))
    for ax, (key, name) in zip(axes, COST_METRICS):
        values = [missing_as_nan(r.metrics.get(key)) for r in edited]
        ax.bar([row_label(r) for r in edited], values, color="tab:gray")
        if key == "trainable_params" and all(v > 0 for v in values if not math.isnan(v)):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def curve_figure(runs: list[RunSummary], title: str) -> Any:
    """Sequential editing: each metric against the number of edits made so far."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(14, 3.4), sharey=True)
    for ax, metric in zip(axes, CURVE_METRICS):
        for run in runs:
            points = [(p["n_edits"], p.get(metric)) for p in run.curve if p.get(metric) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=run.label)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("edits")
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def table_figure(title: str, header: list[str], rows: list[list[str]], note: str = "") -> Any:
    """A table as a PDF page."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11.7, 1.6 + 0.32 * len(rows) + 0.25 * note.count("\n")))
    ax.axis("off")
    ax.set_title(title, loc="left", fontsize=11)
    if rows:
        table = ax.table(cellText=rows, colLabels=header, loc="upper center", cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(7.5)
        table.scale(1, 1.3)
    if note:
        fig.text(0.01, 0.02, note, fontsize=7, family="monospace", va="bottom", wrap=True)
    return fig


def text_figure(title: str, text: str) -> Any:
    """A PDF page of monospaced text."""
    plt = _plt()
    fig = plt.figure(figsize=(11.7, 8.3))
    fig.text(0.03, 0.96, title, fontsize=13, va="top")
    fig.text(0.03, 0.91, text, fontsize=7.5, family="monospace", va="top", wrap=True)
    return fig


def _short(text: Any, limit: int = 90) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ReportWriter:
    """Collects markdown sections, PDF pages and PNG figures as the report is built."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.figures = output / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.pages: list[Any] = []

    def text(self, *parts: str) -> None:
        """Markdown blocks, each followed by a blank line."""
        for part in parts:
            if part:
                self.lines += [part, ""]

    def table(self, title: str, header: list[str], rows: list[list[str]], runs: list[RunSummary]) -> None:
        """A titled table with its runs' commands under it, in the markdown and as a PDF page."""
        self.text(f"**{title}**", markdown_table(header, rows), command_block(runs))
        self.pages.append(table_figure(title, header, rows, "\n".join(commands(runs))))

    def figure(self, fig: Any, name: str, caption: str) -> None:
        """A figure saved as ``figures/NAME.png``, linked from the markdown and added to the PDF."""
        path = self.figures / f"{name}.png"
        fig.savefig(path, dpi=110)
        self.text(f"![{caption}](figures/{path.name})")
        self.pages.append(fig)


def single_section(writer: ReportWriter, dataset: str, runs: list[RunSummary]) -> None:
    """A data set's single-edit results: metric tables (and on shared records where a run is partial),
    by-type tables, cost, bar charts and example edits."""
    writer.text(f"## Single-edit protocol: `{dataset}`")
    header = ["method"] + [name for _, name, _ in MAIN_COLUMNS]
    writer.table(f"{dataset}: metrics", header, table_rows(runs, MAIN_COLUMNS), runs)
    shared = on_shared_records(runs) if len(runs) > 1 and not all(r.complete for r in runs) else []
    if shared and shared[0].cases:
        writer.table(f"{dataset}: metrics on the {shared[0].metrics.get('n_cases', 0)} records every run has "
                     "finished", header, table_rows(shared, MAIN_COLUMNS), runs)
    kinds = by_type_columns(runs, "portability_by_type")
    if kinds:
        writer.table(f"{dataset}: portability by type", ["method", *kinds],
                     by_type_rows(runs, "portability_by_type", kinds), runs)
    kinds = by_type_columns(runs, "locality_by_type")
    if kinds:
        writer.table(f"{dataset}: locality by type", ["method", *kinds],
                     by_type_rows(runs, "locality_by_type", kinds), runs)
    locality_split_section(writer, dataset, runs)
    writer.table(f"{dataset}: cost", ["method"] + [name for _, name, _ in COST_COLUMNS],
                 table_rows(runs, COST_COLUMNS), runs)
    writer.figure(bar_figure(runs, BAR_METRICS, f"{dataset}: single-edit metrics"), f"{dataset}-metrics",
                  f"{dataset} metrics")
    if any(r.method != "none" for r in runs):
        writer.figure(cost_figure(runs, f"{dataset}: cost per edit"), f"{dataset}-cost", f"{dataset} cost")
    examples = example_cases(runs)
    if examples:
        blocks = []
        for ex in examples:
            lines = [f"prompt: {ex['prompt']}", f"target: {ex['target']}   (was: {ex['ground_truth']})",
                     f"  unedited  : {_short(ex['before'])}"]
            lines += [f"  {label:10s}: {_short(after)}" for label, after in ex["after"].items()]
            blocks.append("\n".join(lines))
        writer.text(f"**{dataset}: example edits** (greedy continuation of the prompt, before and after)",
                    "```text\n" + "\n\n".join(blocks) + "\n```")
        writer.pages.append(text_figure(f"{dataset}: example edits", "\n\n".join(blocks)))


def locality_split_section(writer: ReportWriter, title: str, runs: list[RunSummary]) -> None:
    """Each run's locality on the records whose locality prompts ask the edited fact and on the others
    (:mod:`icelora.evaluation.locality_conflicts`); nothing where no record of the runs is such a one."""
    rows, any_asking = [], False
    for run in runs:
        asking = records_asking_edited_fact(run)
        if asking is None:
            continue
        split = locality_split(run.cases, asking)
        any_asking = any_asking or split.n_asking > 0
        rows.append([row_label(run), format_value(split.n_asking, 0), format_value(split.locality_asking, 3),
                     format_value(split.n_other, 0), format_value(split.locality_other, 3),
                     format_value(run.metrics.get("locality"), 3)])
    if not any_asking:
        return
    writer.text(f"Locality of `{title}` split by record: some records' locality prompts ask about the edited "
                "subject and expect the answer the edit replaces (an answer of the record's `ground_truth`; "
                "mostly the edited relation asked again, a few another relation with the same answer), so an "
                "edit that carries over to other wordings must change most of them. Locality on those records "
                "measures mostly how little the edit generalised; on the others, how little unrelated "
                "knowledge moved. The `locality` column and the targets keep the mean over all records.")
    writer.table(f"{title}: locality on records whose locality prompts ask the edited fact, and on the others",
                 ["method", "records asking it", "locality there", "other records", "locality there",
                  "locality (all)"], rows, runs)


def sequential_section(writer: ReportWriter, dataset: str, runs: list[RunSummary]) -> None:
    """A data set's sequential results: the table after the last edit and the curves."""
    writer.text(f"## Sequential protocol: `{dataset}`",
                "One model takes the edits one after another; after the last edit every record is measured "
                "again. The curves measure all records edited so far, every `eval_every` edits.")
    header = ["method"] + [name for _, name, _ in MAIN_COLUMNS]
    writer.table(f"sequential {dataset}: after the last edit", header, table_rows(runs, MAIN_COLUMNS), runs)
    locality_split_section(writer, f"sequential {dataset}", runs)
    if any(r.curve for r in runs):
        writer.figure(curve_figure(runs, f"sequential {dataset}: metrics against edits made"),
                      f"sequential-{dataset}-curves", f"sequential {dataset} curves")


def targets_section(writer: ReportWriter, targets: list[Target], runs: list[RunSummary]) -> None:
    """Each target of the study file, its measured number and whether it is met."""
    rows = [[r.description, r.measured, "met" if r.met else "NOT MET"] for r in check_targets(targets, runs)]
    writer.text("## Targets", "Each target against the measured number; a target not met is listed as such.")
    writer.text(markdown_table(["target", "measured", "result"], rows))
    writer.pages.append(table_figure("Targets", ["target", "measured", "result"], rows))


def published_section(writer: ReportWriter) -> None:
    """The published KnowEdit numbers for Llama-2-7b-chat, labelled as another model."""
    published = PUBLISHED_KNOWEDIT_LLAMA2
    writer.text("## Published numbers (another model)", published["note"])
    header = ["data set", "method", *published["columns"]]
    rows = [[d, m, *values] for d, m, values in published["rows"]]
    writer.text(markdown_table(header, rows))
    writer.pages.append(table_figure("Published (KnowEdit, Llama-2-7b-chat; not this model)", header, rows,
                                     published["source"]))


def write_report(paths: list[Path], output: Path, title: str = "icelora evaluation report",
                 targets_file: Path | None = None, command: str | None = None) -> dict[str, Path]:
    """Write ``evaluation_report.md``, ``evaluation_report.pdf`` and ``figures/*.png`` into ``output``.

    ``targets_file``: a YAML file with a ``targets`` list (``configs/compare.yaml``), checked against
    the runs; ``command``: the command line to print at the top.
    """
    plt = _plt()
    from matplotlib.backends.backend_pdf import PdfPages

    targets = read_targets(targets_file) if targets_file else []
    runs = [read_run(folder) for folder in find_run_folders(paths)]
    output.mkdir(parents=True, exist_ok=True)
    writer = ReportWriter(output)
    writer.text(f"# {title}", f"Generated by `{command}`." if command else "",
                f"Runs: {len(runs)}; model(s): {', '.join(sorted({r.run.get('model', '?') for r in runs}))}; "
                f"device(s): {', '.join(sorted({r.run.get('device', '?') for r in runs}))}.")
    if targets:
        targets_section(writer, targets, runs)
    for (protocol, dataset), group in group_runs(runs).items():
        if protocol == "single":
            single_section(writer, dataset, group)
        elif protocol == "sequential":
            sequential_section(writer, dataset, group)
    published_section(writer)
    md_path, pdf_path = output / "evaluation_report.md", output / "evaluation_report.pdf"
    md_path.write_text("\n".join(writer.lines).rstrip() + "\n", encoding="utf-8")
    with PdfPages(pdf_path, metadata={"Title": title, "Creator": "icelora report"}) as pdf:
        pdf.savefig(text_figure(title, "\n".join(writer.lines[:6])))
        for page in writer.pages:
            pdf.savefig(page)
            plt.close(page)
    log.info("wrote %s and %s", md_path, pdf_path)
    return {"markdown": md_path, "pdf": pdf_path, "figures": writer.figures}

