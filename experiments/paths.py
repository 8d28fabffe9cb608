"""Where the study reads and writes: file names of its output folders and what other parts of the repository read."""

import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# The study's best default-TaskExpert run, copied push-ready by `experiments/run.py`: the folder the Space serves
# first, configured in pyproject.toml (`[tool.taskexpert.space] best_model`).
STUDY_BEST_MODEL_DIR = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["taskexpert"]["space"][
    "best_model"
]

# Output root of each mode of the study (experiments/study.py).
DEFAULT_OUTPUT_ROOTS = {
    "full": "outputs/experiments",
    "pilot": "outputs/experiments-pilot",
    "quick": "outputs/experiments-quick",
}
STUDY_FILE = "study.json"  # in the output root: the mode and every run of the study
LAUNCH_FILE = "launch.json"  # in a run folder: wall and CPU time of every launch of the run
RESULTS_FILE = "docs/results.md"  # the report of a full study (and of the pilot, until the full study has run)
STUDY_NOTES_FILE = "experiments/study_notes.md"  # the reading notes, generated with the report
# Beside the full study's table (experiments/table.py): what was measured on its trained models and dataset.
MEASUREMENTS_FILE = "experiments/results/study-measurements.json"
