# The two commands a person needs: `make run` (serve) and `make test` (everything CI checks).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
# A development key for `make run` only; production refuses to start without API_KEY(S).
API_KEY ?= dev-key
# ... and a development admin key, so the deployment routes can be tried locally.
ADMIN_API_KEY ?= dev-admin-key
# ... and a development server secret: it signs prediction ids and keys admin fingerprints
# (production refuses to start without SECRET_KEY).
SECRET_KEY ?= dev-secret-key

.PHONY: run test lint check-vendor docs model retrain soak bench system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.deploy-installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt requirements-train.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt -r requirements-train.txt
	touch $@ $(VENV)/.deploy-installed

## run: serve the app with gunicorn on http://127.0.0.1:$(PORT) (no Redis, no broker needed)
run: $(VENV)/.deploy-installed
	@echo "Serving on http://127.0.0.1:$(PORT)  -  API key: $(API_KEY)  -  admin key: $(ADMIN_API_KEY)"
	@echo "Try: curl -H 'x-api-key: $(API_KEY)' -F file=@digit.png http://127.0.0.1:$(PORT)/predict"
	PORT=$(PORT) API_KEY=$(API_KEY) ADMIN_API_KEYS=dev:$(ADMIN_API_KEY) SECRET_KEY=$(SECRET_KEY) WEB_CONCURRENCY=$${WEB_CONCURRENCY:-1} \
		LOG_FORMAT=$${LOG_FORMAT:-text} $(BIN)/gunicorn api:app -c gunicorn.conf.py

## system-deps: Debian packages the tests drive (Chromium, redis-server)
system-deps:
	bash scripts/install-system-deps.sh

## lint: ruff (lint + format check), mypy and the import contracts (import-linter)
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

## check-vendor: the page's vendored runtime (static/vendor/) equals its npm packages byte for byte
check-vendor: $(VENV)/.dev-installed
	$(BIN)/python -m tools.check_vendor

## docs: build the manual (mkdocs.yml, docs/) strictly into build/site/: a broken link or anchor,
## a page missing from the nav or a bad config fails it
docs: $(VENV)/.dev-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

## test: static analysis, the vendored files against npm, the docs site, then the whole pytest suite
test: system-deps lint check-vendor docs
	$(BIN)/python -m pytest

## soak: the load and fault tests in full (a 2-minute soak at concurrency 32, large uploads, V2 bodies and slow clients mixed in); prints peak RSS per worker and Redis memory
soak: system-deps $(VENV)/.dev-installed
	$(BIN)/python -m pytest tests/e2e/test_load.py --soak-seconds 120 -s -p no:cacheprovider

## bench: benchmark the service as deployed; writes docs/benchmark.md and docs/benchmark.png
BENCH_SECONDS ?= 8
bench: system-deps $(VENV)/.dev-installed
	$(BIN)/python -m tools.bench --seconds $(BENCH_SECONDS)

## model: train the CNN (recipe v3: four teachers distilled into one student, ~50 min on 2
## cores), quantize it, gate it against stable, install it under models/<version>/ proposed as
## candidate, then choose the default stable version on evidence (models/default_deployment.json)
model: $(VENV)/.dev-installed
	$(BIN)/python train_model.py --out-dir build/model
	$(BIN)/python quantize_model.py --keras build/model/mnist_cnn.keras --models-dir models
	$(BIN)/python -m training.default_stable --models-dir models

## retrain: retrain on the users' feedback (DATABASE_URL, else the embedded SQLite file), gate
## the challenger against stable, install it under models/<version>/ and propose it as
## candidate only if it passes; the report is in build/retrain/. RETRAIN_ARGS="--epochs 1 ..."
RETRAIN_ARGS ?=
retrain: $(VENV)/.dev-installed
	$(BIN)/python -m training.retrain $(RETRAIN_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
