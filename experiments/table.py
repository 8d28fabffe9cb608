"""The study's results as data: one row per finished run, in a CSV file committed to the repository.

The runner appends a run's row as soon as it finishes (`experiments/run.py`), the report reads nothing else for its
numbers (`experiments/report.py`), so every number of `docs/results.md` can be recomputed from the table by anyone
(`tests/reproduce_results.py` does, with its own arithmetic). Columns:

- `variant`, `kind`, `seed`: which model of the study (`experiments/study.py`) and which seed;
- `tasks` (names joined by ";"), `model_type`;
- `git_commit`, `git_dirty`, `package_version`, `torch_version`: the code that trained it (`provenance.json`),
  `recipe_sha256`: the fingerprint of its resolved recipe; `machine`: the CPU model and logical CPUs it trained on
  (recorded by the runner; one seed gives the same numbers on one machine, not bit for bit across CPU models);
- `cpu_seconds`, `wall_seconds`: what the run cost (empty when it was resumed from a runner that recorded nothing),
  `step_seconds`: median wall time of one optimiser step, `final_training_loss`: the last logged training loss;
- one column per metric of `metrics.json` (`semseg/mIoU`, `edge/odsF`, ...), empty where a run has no such metric.

Floats are written with `repr`, so reading the table gives back the very numbers the runs wrote.
"""

import csv
import io
import math
from pathlib import Path

from modeling_taskexpert.file_utils import write_text_atomic

# The committed table of the full study.
STUDY_TABLE = "experiments/results/study-runs.csv"
RUN_COLUMNS = (
    "variant", "kind", "seed", "tasks", "model_type", "git_commit", "git_dirty", "package_version", "torch_version",
    "recipe_sha256", "machine", "cpu_seconds", "wall_seconds", "step_seconds", "final_training_loss",
)  # fmt: skip
_FLOAT_COLUMNS = ("cpu_seconds", "wall_seconds", "step_seconds", "final_training_loss")


class TableError(ValueError):
    """A results table that cannot be read or extended; the message names the file, row and column."""


def run_row(variant, seed: int, run: dict) -> dict:
    """The table row of a finished run (`collect.load_run`) of a study variant (`study.Variant`)."""
    provenance = run.get("provenance") or {}
    row = {
        "variant": variant.name, "kind": variant.kind, "seed": seed, "tasks": ";".join(run["tasks"]),
        "model_type": run["model_type"], "git_commit": provenance.get("git_commit") or "",
        "git_dirty": provenance.get("git_dirty"), "package_version": provenance.get("package_version") or "",
        "torch_version": provenance.get("torch_version") or "", "recipe_sha256": provenance.get("recipe_sha256") or "",
        "machine": run.get("machine") or "",
        "cpu_seconds": run.get("cpu_seconds"), "wall_seconds": run.get("wall_seconds"), "step_seconds": run.get("step_seconds"),
        "final_training_loss": run.get("final_training_loss"),
    }  # fmt: skip
    for key, value in run["metrics"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        row[key] = float(value)
    return row


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def to_csv(rows: list[dict]) -> str:
    """The table's text: the run columns, then every metric column any row has (sorted); rows by seed, then as given."""
    metric_columns = sorted({key for row in rows for key in row if key not in RUN_COLUMNS})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RUN_COLUMNS + tuple(metric_columns))
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in RUN_COLUMNS + tuple(metric_columns)])
    return buffer.getvalue()


def write_table(path: Path, rows: list[dict]) -> None:
    write_text_atomic(Path(path), to_csv(rows))


def read_table(path: Path) -> list[dict]:
    """The rows of a table, typed: `seed` int, `git_dirty` bool (None when empty), the float columns and metrics
    float (a metric left empty is absent from the row)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TableError(f"No results table at {path}.") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise TableError(f"{path} is empty: a results table starts with its header row.") from None
    missing = [column for column in RUN_COLUMNS if column not in header]
    if missing:
        raise TableError(f"{path}: the header has no column {missing[0]!r} (expected {', '.join(RUN_COLUMNS)}, "
                         "then the metrics).")  # fmt: skip
    rows = []
    for number, cells in enumerate(reader, start=2):
        if not cells:
            continue
        if len(cells) != len(header):
            raise TableError(f"{path}, line {number}: {len(cells)} cells, the header has {len(header)}.")
        rows.append(_typed_row(path, number, dict(zip(header, cells))))
    seen = set()
    for row in rows:
        key = (row["variant"], row["seed"])
        if key in seen:
            raise TableError(f"{path}: two rows for {row['variant']} seed {row['seed']}.")
        seen.add(key)
    return rows


def _typed_row(path: Path, number: int, cells: dict) -> dict:
    row = {}
    for column, text in cells.items():
        try:
            if column == "seed":
                row[column] = int(text)
            elif column == "git_dirty":
                if text not in ("", "true", "false"):
                    raise ValueError("expected true, false or empty")
                row[column] = None if text == "" else text == "true"
            elif column in RUN_COLUMNS and column not in _FLOAT_COLUMNS:
                row[column] = text
            elif text == "":
                if column in _FLOAT_COLUMNS:
                    row[column] = None
            else:
                value = float(text)
                if math.isinf(value):
                    raise ValueError("infinite")
                row[column] = value
        except ValueError as error:
            raise TableError(f"{path}, line {number}, column {column!r}: cannot read {text!r} ({error}).") from None
    if not row["variant"] or not row["tasks"]:
        raise TableError(f"{path}, line {number}: the variant and the tasks must not be empty.")
    return row


def metric_columns(row: dict) -> dict:
    """The metrics of a row (every column that is not a run column)."""
    return {key: value for key, value in row.items() if key not in RUN_COLUMNS}


def add_row(path: Path, row: dict) -> None:
    """Append (or replace: the same variant and seed) one row, rewriting the file atomically. Refuses a row of another
    commit than the table's rows: the study is trained on one revision."""
    path = Path(path)
    rows = read_table(path) if path.is_file() else []
    commits = {existing["git_commit"] for existing in rows}
    if commits and row["git_commit"] not in commits:
        raise TableError(f"{path} holds runs of commit {sorted(commits)[0][:12]}; the run {row['variant']} seed "
                         f"{row['seed']} was trained with {row['git_commit'][:12] or 'no commit'}. One study, one "
                         "revision: start a new table for new code.")  # fmt: skip
    rows = [r for r in rows if (r["variant"], r["seed"]) != (row["variant"], row["seed"])] + [row]
    write_table(path, sorted(rows, key=lambda r: r["seed"]))
