# Quick start:  make demo   (set up, then run the whole pipeline on demo data, CPU)
#               make test   (set up with the dev requirements, then lint and run the tests)
#               make test-fast  (the tests not marked slow: the edit-test loop; CI runs make test)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pytest-xdist workers for make test / test-fast: each holds its own TensorFlow (about 5 GB at
# peak), so this is not `auto`. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

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
	$(PYTEST)

test-fast: $(VENV)/.requirements-dev
	$(PYTEST) -m "not slow"

clean-demo:
	rm -rf demo_output recipe_output
