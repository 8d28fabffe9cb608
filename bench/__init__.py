"""Performance benchmarks of TaskExpert (`make bench`, or `python bench/run.py --help`).

One module per suite, each holding its measurement, its plot and its text: `variants` (TaskExpert vs backbone vs
shared decoder), `headline` (where the MMoE + heads time goes, task subsets), `batched_vs_loop`, `scaling`,
`data_pipeline`, `pipeline_end_to_end`, `memory_growth`, `modsquad_extraction`, `gpu`; `run.py` lists and runs them.
Shared parts: `plan.py` (settings and budgets), `measure.py` (timing, FLOP and memory instruments), `models.py` (the
compared models and their inputs), `targets.py` (the targets and their notes), `report.py` (results.json, plots and
the Markdown page); `compare_revisions.py` times two revisions of the model code against each other.
"""
