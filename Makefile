# depthtune: the two commands a newcomer needs (both set up the environment first).
#   make repro   # create .venv, install, run the default pipeline (dvc repro) offline
#                # (make repro DVC_ARGS=--force: re-run every stage)
#   make test    # create .venv, install, run the test suite
#   make test-quick  # the suite without the tests marked slow (pipelines, examples, servers): a few minutes
#   make setup   # .venv, the offline DVC plots template (npm), chromium for the report tests and PostgreSQL
#                # for the team-server tests (apt-get, as root)
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

.PHONY: setup browser postgres repro test test-quick bench clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	-$(PY) -m flows.server prepare-db  # migrated Prefect + MLflow databases, once per machine (~17 s less per clean clone)
	touch $(STAMP)

# `dvc plots show` offline: vega, vega-lite, vega-embed from the npm registry inlined into a DVC HTML template
# (.offline/, git-ignored; ~2 s). Without npm or the registry: one line, and set-up goes on.
PLOTS_TEMPLATE := .offline/dvc_plots.html
$(PLOTS_TEMPLATE): flows/plots_template.py | $(STAMP)
	@$(PY) -m flows.plots_template

# Debian's chromium: tests/test_offline_report.py opens the reports in it, headless. Installed when root
# with apt-get (~1 min once); otherwise one line says what to install.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get, for the headless report tests)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1 \
	      || echo "chromium: apt-get install failed; tests/test_offline_report.py fails until it is installed"; \
	  else echo "chromium missing: apt-get install chromium (Debian's), for tests/test_offline_report.py"; fi; }

# Debian's PostgreSQL: tests/test_distributed.py starts a private cluster (initdb + pg_ctl in a temp dir)
# under a real `mlflow server`. Installed when root with apt-get (~1 min once); the package's own
# cluster is not used (nor started).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing postgresql (apt-get, for the team-server tests)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends postgresql; } >/dev/null 2>&1 \
	      || echo "postgresql: apt-get install failed; tests/test_distributed.py fails until it is installed"; \
	  else echo "postgresql missing: apt-get install postgresql (Debian's), for tests/test_distributed.py"; fi; }

setup: $(STAMP) $(PLOTS_TEMPLATE) browser postgres

repro: $(STAMP) $(PLOTS_TEMPLATE)
	test -d .git || git init -q
	@start=$$(date +%s.%N); dvc repro $(DVC_ARGS) && $(PY) -m flows.timings --since $$start
	@echo "results: reports/index.html (opens offline), reports/comparison.md, audit/summary.md, 'dvc metrics show', 'mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db'"

test: setup
	$(PY) -m pytest -q

test-quick: setup
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m bench.run

clean-outputs:
	rm -rf data/prepared data/tokenized audit models metrics plots reports checkpoints
