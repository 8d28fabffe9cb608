"""Performance benchmarks of TaskExpert (`make bench`, or `python bench/run.py --help`).

`run.py` measures everything in one run and writes `bench/results.json`, `docs/benchmarks.md` and the plots;
`measure.py` holds the timing, FLOP and memory instruments, `models.py` the compared variants, `suites.py` the
measurements, `gpu.py` the accelerator-only part and `report.py` the report writers.
"""
