# Two entry points: `make train` (the main job) and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup train test browser space space-bundle bench experiments clean

setup: $(STAMP)

# torch goes in first, on its own, so that nothing later pulls a different (CUDA) build;
# constraints.txt keeps every later resolution on that exact version.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m modeling_taskexpert.data synthetic --output-dir data/synthetic --skip-if-exists
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train.py --config hub_configs/synthetic-tiny.yaml
	@echo "Model written to outputs/taskexpert-synthetic-tiny: open it in the Space with 'make space' (http://127.0.0.1:7860)."

# One line per test file with its progress; slow end-to-end tests included (they run in CI too).
test: $(STAMP) browser
	$(PY) -m pytest tests -p no:cacheprovider

# Debian's chromium, which the Space's browser test drives through Playwright (never `playwright install`);
# installed only when missing, waiting for another apt run's lock; skipped with a message where apt or root is
# missing (the browser tests then skip, except in CI). Playwright itself comes with the `test` extra.
browser:
	@bash .ci/install-browser

space: $(STAMP)
	$(PY) space_app/app.py

# A complete Space repository in dist/space (MODEL: a model folder, embedded, or a Hub id); see space_app/bundle.py.
MODEL ?= outputs/taskexpert-synthetic-tiny
space-bundle: $(STAMP)
	$(PY) -m space_app.bundle --model $(MODEL) --output dist/space --overwrite

bench: $(STAMP)
	$(PY) bench/run.py

# The TaskExpert study (experiments/study.py): trains every run that is not finished, JOBS runs at once (the tiny
# models use one core well and a second one poorly), then rebuilds docs/results.md and experiments/study_notes.md
# from the run folders; the full study also copies its best TaskExpert to outputs/ for `make space`. The plan (runs,
# CPU time) is in docs/results.md, section "Power and the study plan".
# PILOT=1: the pilot whose seed noise sizes the full study (python -m experiments.power).
# SEEDS=N: only the first N seeds of the full study; ONLY="a b": only these variants (a later full run adds the rest).
# QUICK=1: a few minutes' smoke test of the same machinery (report in outputs/experiments-quick/results.md).
JOBS ?= 2
experiments: $(STAMP)
ifdef QUICK
	$(PY) -m experiments.run --quick --jobs $(JOBS)
	$(PY) -m experiments.report --output-root outputs/experiments-quick
else ifdef PILOT
	$(PY) -m modeling_taskexpert.data synthetic --output-dir data/synthetic --skip-if-exists
	$(PY) -m experiments.run --pilot --jobs $(JOBS)
	$(PY) -m experiments.report --output-root outputs/experiments-pilot --jobs $(JOBS)
else
	$(PY) -m modeling_taskexpert.data synthetic --output-dir data/synthetic --skip-if-exists
	$(PY) -m experiments.run --jobs $(JOBS) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(ONLY),--only $(ONLY))
	$(PY) -m experiments.report --jobs $(JOBS)
endif

clean:
	rm -rf $(VENV) outputs data/synthetic
