# Two commands: `make train` and `make test`. Each creates .venv with the pinned
# dependencies on first use (only Python >= 3.11 and pip are needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test train install clean

# `make train CONFIG=configs/tiny.py WORKDIR=runs/tiny` picks another config / output dir.
CONFIG ?= configs/default.py
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/onn-train --config $(CONFIG) --workdir $(WORKDIR)

# ruff and import-linter first (seconds), then the suite; pyproject.toml says what each checks.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) .pytest_cache
