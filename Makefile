# Two commands: `make demo` (train on scikit-learn's digits, offline, about a minute on 2 CPU
# cores) and `make test` (the pytest suite).  Both create .venv from requirements.txt if missing.
# `make last-demo-run` prints the newest demo run folder (S-<n> in numeric order, so S-10 comes
# after S-9); RUNS is the folder the demo writes into.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNS ?= runs

.PHONY: demo test bench clean last-demo-run

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) main.py --device -1 --archi fc --dataset digits --layersList 64 512 10 \
	  --T 30 --Kmax 8 --beta 0.5 --gamma 1e-3 1e-3 --gradThreshold 3e-5 3e-5 \
	  --lrBias 0.05 0.1 --batchSize 32 --test_batchSize 360 --epochs 30 --seed 0 --outDir $(RUNS)
	@echo "demo run folder and plots: $$($(MAKE) -s --no-print-directory last-demo-run RUNS='$(RUNS)')"

# date folders (YYYY-MM-DD) and then S-<n> in version order: the last line is the newest run
last-demo-run:
	@ls -dv $(RUNS)/DATA-0-fc-digits/*/S-* 2>/dev/null | tail -1

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

bench: $(STAMP)
	$(PY) benchmarks/benchmark.py

clean:
	rm -rf $(RUNS) .pytest_cache
