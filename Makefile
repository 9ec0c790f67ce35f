# make demo: set up, then run the main job on the embedded default.   make test: set up, then test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test clean

install: $(STAMP)

# (Re)install only when the venv is missing or pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m glit_ray.summary
	$(BIN)/python -m glit_ray.search --level high --out runs/demo/search-high
	$(BIN)/python -m glit_ray.report runs/demo/search-high

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
