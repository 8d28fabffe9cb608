"""Record a finished `make train` run and refresh the README's results table from it:

    python -m modeling_taskexpert.training outputs/taskexpert-synthetic-tiny

writes `docs/make_train_results.json` (metrics, the chance bar the card used, steps, runtime, commit: all read from the
run's folder) and the README block between its make-train markers (`tests/test_training_reporting.py` checks that the
two agree).
"""

import json

from ..file_utils import atomic_write
from .reporting import run_summary, update_readme


def main(argv=None) -> dict:
    """Record a finished `make train` run and refresh the README's table from it:

    python -m modeling_taskexpert.training outputs/taskexpert-synthetic-tiny
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m modeling_taskexpert.training", description=main.__doc__.split("\n")[0]
    )
    parser.add_argument("run", help="the output folder of the run")
    parser.add_argument("--record", default="docs/make_train_results.json", help="where the summary is kept")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    summary = run_summary(args.run)
    atomic_write(
        args.record, lambda temporary: temporary.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    )
    update_readme(args.readme, summary)
    return summary


if __name__ == "__main__":
    main()
