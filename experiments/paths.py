"""Where the study puts what other parts of the repository read."""

# The study's best default-TaskExpert run, copied push-ready by `experiments/run.py`; `make space` serves it.
STUDY_BEST_MODEL_DIR = "outputs/taskexpert-synthetic-best"
