# Two commands on a fresh machine: `make run` and `make test`. Each creates .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RECSYS_HOME ?= $(CURDIR)/.recsys
export DAGSTER_HOME ?= $(RECSYS_HOME)/dagster
export PYTHONUNBUFFERED := 1

.PHONY: run test ui serve venv dagster-home system-deps bench-pipeline bench-quality bench-serve bench-features bench-cost clean

venv: $(VENV)/.installed

# requirements.lock pins every package as tested; pyproject.toml keeps ranges for other setups.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

dagster-home:
	mkdir -p "$(DAGSTER_HOME)"
	cp dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"

## Materialize the whole asset graph on the embedded synthetic data, then say where everything is.
## The run belongs to the code location `recsys` of workspace.yaml, so the UI lists it under retrain_job
## (`dagster job execute -m` would leave it without a location; README "Automation").
run: venv dagster-home
	$(BIN)/python -m recsys_assets.automation retrain_job -w workspace.yaml -l recsys
	$(BIN)/python -m recsys_assets.summary

## The test suite (installs what it needs; redis-server for the Redis online-store tests and PostgreSQL
## for the Dagster-on-Postgres test where apt-get can, chromium for the in-browser checks, checkov in .venv-tools).
test: venv tools system-deps
	$(BIN)/python -m pytest -q tests

## Tools whose dependencies would change pins of requirements.lock, in their own virtualenv:
## checkov (static security scan of deploy/, tests/test_deploy_manifests.py).
CHECKOV_VERSION := 3.3.30
.PHONY: tools
tools: .venv-tools/.installed

.venv-tools/.installed: Makefile
	test -x .venv-tools/bin/python || $(PYTHON) -m venv .venv-tools
	.venv-tools/bin/pip install --quiet "checkov==$(CHECKOV_VERSION)"
	touch $@

system-deps:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || echo "redis-server not installed: the Redis online-store tests will be skipped"; }
	@{ command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null) \
	  || echo "postgresql not installed: the Dagster-on-Postgres test will be skipped"; }
	@{ command -v chromium || command -v chromium-browser; } >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	  || echo "chromium not installed: the in-browser checks of the report and the Dagster UI will be skipped"; }
	@{ command -v promtool && command -v prometheus-pushgateway && command -v amtool; } >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway prometheus-alertmanager >/dev/null) \
	  || echo "prometheus tools not installed: the monitoring tests that need them will be skipped"; }

## The Dagster UI on http://127.0.0.1:3000: webserver + daemon, which runs the schedules and sensors
## (on by default; README "Automation") while it is up.
## The Dagster UI on :3000, and the reports (evaluation, drift) on :3001, where its report links point.
ui: venv dagster-home
	mkdir -p "$(RECSYS_HOME)/reports"
	$(BIN)/python -m http.server 3001 --bind 127.0.0.1 --directory "$(RECSYS_HOME)/reports" >/dev/null 2>&1 & \
	  trap "kill $$!" EXIT; $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

## Serve the promoted bundle ($$RECSYS_HOME/bundles/current) with BentoML on http://127.0.0.1:3100
## (PORT=... to change; 3000 is the Dagster UI's, so both can run at once).
serve: venv
	$(BIN)/bentoml serve recsys_serving.service:RecommenderService --host 127.0.0.1 --port $${PORT:-3100}

## Switch $$RECSYS_HOME/bundles/current back to the previous champion (TO=<version> for a given one);
## a running service follows without a restart.
.PHONY: rollback
rollback: venv
	$(BIN)/python -m recsys_assets.export.rollback $(if $(TO),--to "$(TO)")

bench-serve: venv
	$(BIN)/python benchmarks/serve_latency.py --duration 60 --out $(RECSYS_HOME)/reports/serve_latency.json

bench-pipeline: venv
	$(BIN)/python benchmarks/pipeline_scale.py

bench-features: venv
	$(BIN)/python benchmarks/feature_store_latency.py

# the table and plot of how cost grows, from the reports the stage benchmarks wrote (see its docstring)
bench-cost: venv
	$(BIN)/python benchmarks/cost_growth.py --reports $(RECSYS_HOME)/reports/cost_growth --train $(RECSYS_HOME)/reports/train_scale.json

bench-quality: venv
	$(BIN)/python benchmarks/quality_beauty.py

clean:
	rm -rf .recsys
