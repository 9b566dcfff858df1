# depthtune: the two commands a newcomer needs (both set up the environment first).
#   make repro   # create .venv, install, run the default pipeline (dvc repro) offline
#                # (make repro DVC_ARGS=--force: re-run every stage)
#   make test    # create .venv, install, run the test suite
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup repro test bench clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	-$(PY) -m flows.server prepare-db  # migrated Prefect + MLflow databases, once per machine (~17 s less per clean clone)
	touch $(STAMP)

setup: $(STAMP)

repro: $(STAMP)
	test -d .git || git init -q
	@start=$$(date +%s.%N); dvc repro $(DVC_ARGS) && $(PY) -m flows.timings --since $$start
	@echo "results: reports/comparison.md, audit/summary.md, 'dvc metrics show', 'mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db'"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.run

clean-outputs:
	rm -rf data/prepared data/tokenized audit models metrics plots reports checkpoints
