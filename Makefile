# Every target that runs code first makes sure .venv exists and holds what it needs,
# so on a fresh machine `make test` or `make demo` is the only command to type.
# The newest supported CPython on this machine (3.13, 3.12, 3.11: bin/pick-python) unless PYTHON is given.
PYTHON ?= $(shell bin/pick-python || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv check-install test test-unit test-integration test-e2e lint format demo bench clean

venv: $(STAMP)

# constraints.txt: the tested versions of the runtime requirements (the extras resolve around them).
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,embedded,lint,simulator]'
	touch $(STAMP)

# A stamp alone cannot tell that the editable install was broken later: check the import each time.
check-install: $(STAMP)
	@$(VENV)/bin/kraite-mp --version >/dev/null 2>&1 || { echo "repairing the editable install"; \
	  $(PY) -m pip install --quiet --no-deps -e . && $(VENV)/bin/kraite-mp --version; }

test: check-install
	$(PY) -m pytest $(PYTEST_ARGS)

# The three tiers (every test carries exactly one marker; tests/conftest.py checks).
test-unit: check-install
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-integration: check-install
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

test-e2e: check-install
	$(PY) -m pytest -m e2e $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check kraite_mp tests bench
	$(VENV)/bin/ruff format --check kraite_mp tests bench
	$(VENV)/bin/mypy --strict kraite_mp

format: $(STAMP)
	$(VENV)/bin/ruff format kraite_mp tests bench
	$(VENV)/bin/ruff check --fix kraite_mp tests bench

demo: check-install
	$(VENV)/bin/kraite-mp demo $(DEMO_ARGS)

bench: check-install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .venv-lowest build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
