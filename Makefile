# One command to run the experiment, one to test it; both set up .venv first.
PYTHON_FOR_VENV ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python
# `make run PARAMS="-p p_last 0.8 -p dataset fashion-mnist"` passes notebook parameters to papermill.
PARAMS ?=

.PHONY: venv run study test lab benchmark clean

venv: $(VENV)/.installed

# Reinstall only when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	$(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Execute the notebook headless; the executed copy, figures and history land in results/.
run: venv
	mkdir -p results
	$(PY) -m papermill stochastic_depth.ipynb results/stochastic_depth.ipynb --cwd . $(PARAMS)

# Execute the study notebook headless; with the committed runs in results/study it computes nothing.
study: venv
	mkdir -p results
	$(PY) -m papermill stochastic_depth_study.ipynb results/stochastic_depth_study.ipynb --cwd . $(PARAMS)

# The linter first (rules in pyproject.toml), then the tests.
test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -ra

lab: venv
	$(VENV)/bin/jupyter lab stochastic_depth.ipynb

benchmark: venv
	$(PY) -m benchmarks.bench_training_step
	$(PY) -m benchmarks.bench_sampler
	$(PY) -m benchmarks.bench_ddp

clean:
	rm -rf $(VENV) .pytest_cache
