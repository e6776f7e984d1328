# Quick start:  make demo   (set up, then run the whole pipeline on demo data, CPU)
#               make test   (set up with the dev requirements, then lint and run the tests)
#               make test-fast  (the tests not marked slow: the edit-test loop; CI runs make test)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.requirements: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

$(VENV)/.requirements-dev: requirements.txt requirements-dev.txt $(VENV)/.requirements
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.requirements
	PATH="$(CURDIR)/$(BIN):$$PATH" bash demo/run_demo.sh

test: $(VENV)/.requirements-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

test-fast: $(VENV)/.requirements-dev
	$(BIN)/python -m pytest -m "not slow"

clean-demo:
	rm -rf demo_output recipe_output
