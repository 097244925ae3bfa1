# Two commands do all the set-up on a fresh machine with Python >= 3.11:
#   make quickstart   install into .venv and meta-train the quickstart config
#   make test         install into .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/quickstart

.PHONY: quickstart test test-slow install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# torch (CPU wheel) for the lopt.torch tests: the exact version the machines carry a wheel for;
# where it is unavailable the install goes on and those tests are skipped.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet torch==2.13.0 || echo "torch unavailable: lopt.torch tests will be skipped"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: $(VENV)/.installed
	$(BIN)/python scripts/meta_train.py --config=configs/quickstart.py --workdir=$(WORKDIR)
	$(BIN)/python scripts/evaluate.py --export=$(WORKDIR)/export/optimizer.safetensors --task=digits_mlp --task_kwargs='{"permute_classes": true}' --out=$(WORKDIR)/eval

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 -m "not slow" -p no:cacheprovider --durations=15

test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m slow -p no:cacheprovider

clean:
	rm -rf $(VENV) runs
