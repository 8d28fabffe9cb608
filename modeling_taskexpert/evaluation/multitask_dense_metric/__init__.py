"""The `evaluate` metric module lives in `multitask_dense_metric.py` beside this file (load it by path with
`evaluate.load`); this file only makes the folder part of the installed package."""
