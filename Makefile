# peersync: the two commands in the README are `make demo` and `make test`; everything else is a step of them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVER := tests/fhir-server/server.sh
MEDPLUM_SERVER := tests/medplum-server/server.sh
DEMO_CONFIG := fixtures/demo/peersync.toml
PYTEST_ARGS ?=

.PHONY: install server server-stop medplum-install medplum-server medplum-server-stop demo lint test test-unit coverage wheel-check container-check reliability reliability-report bench docs-screenshots clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

server:
	bash $(SERVER) start

server-stop:
	bash $(SERVER) stop

# The second test server, Medplum's FHIR engine in Node (tests/medplum-server/): npm ci from its lock file.
medplum-install:
	bash $(MEDPLUM_SERVER) install

medplum-server:
	bash $(MEDPLUM_SERVER) start

medplum-server-stop:
	bash $(MEDPLUM_SERVER) stop

# The main job: sync the demo program into the local HAPI server and show what landed.
demo: install server
	$(PY) tests/fhirserver.py load-patients fixtures/demo/clinic/patients.json
	$(VENV)/bin/peersync sync --config $(DEMO_CONFIG); status=$$?; \
	  $(VENV)/bin/peersync landed --config $(DEMO_CONFIG); \
	  echo "sync exit code: $$status (65 = some rows rejected or in review, as the demo intends)"

# Lint and types (settings in pyproject.toml): ruff over connector/ and tests/, mypy over connector/.
lint: install
	$(VENV)/bin/ruff check connector tests
	$(VENV)/bin/mypy

# The whole suite: lint, unit tests, and integration tests against the local HAPI server and the Medplum server
# (each started by the pytest fixtures if needed).
test: install lint medplum-install
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -p no:cacheprovider tests/unit $(PYTEST_ARGS)

# Unit-test coverage of the write stage and the sync run (the figure issue 13 asks to keep at 85% or more).
coverage: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit --cov=connector.write --cov=connector.run --cov-report=term $(PYTEST_ARGS)

# The installable product: build the wheel, install it into a fresh virtualenv outside the repository and run
# check, map, profile check, config check and validate --offline on the demo there (tests/packaging/wheel_check.sh).
wheel-check:
	PYTHON=$(PYTHON) bash tests/packaging/wheel_check.sh

# The long reliability variant (30 seeded runs per multi-run scenario), then docs/reliability.md from its results.
# `make test` runs the same suite with short default run counts.
# The container recipe without a container builder (no registry access here for the base image): its build and
# install steps run in a clean virtualenv, then its entrypoint on the demo (tests/packaging/containerfile.py).
# hadolint lints it in the unit tests (tests/unit/test_container_recipe.py).
container-check: install
	$(PY) tests/packaging/containerfile.py

reliability: install
	PEERSYNC_RELIABILITY_RUNS=$${PEERSYNC_RELIABILITY_RUNS:-30} $(PY) -m pytest -p no:cacheprovider -m reliability tests/reliability $(PYTEST_ARGS)
	$(PY) tests/reliability/report.py

reliability-report:
	$(PY) tests/reliability/report.py

# The screenshots of docs/clinical-notes.md, taken by headless Chromium (Debian: apt-get install -y chromium) from the
# HTML peersync generates for the demo program.
docs-screenshots: install
	$(PY) -m tests.browser.screenshots

bench: install server
	$(PY) -m tests.bench.run

clean:
	rm -rf $(VENV) .peersync build *.egg-info
