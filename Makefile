# Two entry points for a fresh machine: `make demo` (install + main job) and `make test`.
# The virtual environment sees system packages, so a torch you already installed (CPU or CUDA)
# is kept; only when none is importable is torch==2.13.0 installed.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install install-test demo test clean

$(VENV)/bin/python:
	python3 -m venv --system-site-packages $(VENV)

install: $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e .

install-test: install
	$(PIP) install -e ".[test,train,plots]"

demo: install
	$(VENV)/bin/skipdit demo --out outputs

test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs *.egg-info
