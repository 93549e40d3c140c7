"""`mixt5 report RUN_OR_SWEEP_DIR`: tables and plots of what a run (or every run of a sweep) did, from its files only.

runs (read the folders) → aggregate (statistics, the numbers behind each plot) → plots → render (the files). It never
loads a data set or a model: training and evaluation write what a report needs into the run folder (`run.json`,
`metrics.json`, `predictions.json`, `question_scores.json`, `trainer_state.json`, `diagnostics.jsonl`; see
`mixt5.train`).

Writes into the directory:

- for a sweep (a folder with `sweep.json`, written by `mixt5 sweep`): `results.md`, `results.csv`, `results.json`:
  per arm, EM and F1 as mean ± 95% CI over seeds, and against the baseline arm a paired bootstrap over questions
  (see `mixt5.stats`);
- for both: `report.md` with the tables and the plots `plots/*.png` (EM/F1 with CIs per arm, training curves,
  expert-load heat-map, expert similarity over training), and beside each plot the numbers behind it as
  `plots/*.json`.

Runs that have not finished (no metrics.json or predictions.json) are listed as missing; the rest is reported. A run
without `question_scores.json` (made before training wrote it) is left out of the paired tests, with a note saying
how to write the file from its predictions (`mixt5 score ... --question_scores_file`).
"""

from __future__ import annotations

import argparse

from .aggregate import ArmResult, SweepSummary, summarize_sweep
from .render import missing_markdown, notes_markdown, table_markdown, write_report, write_results
from .runs import MANIFEST, RunRecord, load_run, run_status

__all__ = [
    "MANIFEST",
    "ArmResult",
    "RunRecord",
    "SweepSummary",
    "load_run",
    "missing_markdown",
    "notes_markdown",
    "run_status",
    "summarize_sweep",
    "table_markdown",
    "write_report",
    "write_results",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "report.md with tables and plots (PNG + JSON) for a run or sweep folder."
    parser.add_argument("path", help="a run folder (mixt5 train --output_dir) or a sweep folder (mixt5 sweep)")


def run(args: argparse.Namespace) -> int:
    report, summary = write_report(args.path)
    if summary is not None:
        print("\n\n".join(filter(None, [table_markdown(summary), notes_markdown(summary), missing_markdown(summary)])))
    print(f"wrote {report} and {report.parent / 'plots'}/")
    return 0
