"""A markdown table of validation runs: what each changed from its method's preset, and its scores.

    python benchmarks/tuning_table.py RUN_DIR... [--baseline RUN_DIR]

Each RUN_DIR is an ``icelora eval`` output folder. The "changed" column lists the configuration
keys that differ from the method's preset in ``icelora.methods`` (so a row says exactly what was
tried; outside the sequential protocol the keys that act only there are left out, being inert);
``--baseline`` adds each metric's difference from that run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icelora.evaluation.runner import with_new_config_keys
from icelora.methods import method_config
from icelora.replay import SEQUENTIAL_ONLY_KEYS

METRICS = ("edit_success", "rephrase", "portability", "locality", "fluency_ratio", "exact_match",
           "seconds_per_edit", "median_steps")


def changed_keys(run: dict) -> str:
    """``key=value`` for every configuration key that differs from the method's preset (a key that
    a run from an older icelora lacks counts at its default, as it ran; the sequential-only keys
    count only in sequential runs)."""
    method = run["method"]
    if method == "none":
        return "(unedited)"
    run = with_new_config_keys(run)
    preset = method_config(method).to_dict()
    inert = () if run.get("protocol", "single") == "sequential" else SEQUENTIAL_ONLY_KEYS
    diffs = [f"{k}={v}" for k, v in run["config"].items() if preset.get(k) != v and k not in inert]
    return ", ".join(diffs) or "(preset)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--baseline", type=Path, default=None, help="run to show differences against")
    args = parser.parse_args(argv)
    base = json.loads((args.baseline / "metrics.json").read_text()) if args.baseline else None
    print("| run | method | changed from the preset | n | " + " | ".join(METRICS) + " |")
    print("|---" * (4 + len(METRICS)) + "|")
    for folder in args.runs:
        metrics = json.loads((folder / "metrics.json").read_text())
        run = metrics["run"]
        cells = []
        for key in METRICS:
            value = metrics.get(key)
            text = "-" if value is None else f"{value:.3f}" if key not in ("seconds_per_edit", "median_steps") \
                else f"{value:.1f}"
            if base is not None and value is not None and base.get(key) is not None and folder != args.baseline \
                    and key not in ("seconds_per_edit", "median_steps"):
                text += f" ({value - base[key]:+.3f})"
            cells.append(text)
        print(f"| {folder.name} | {run['method']} | {changed_keys(run)} | {metrics['n_cases']} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
