# epsscale: the two commands a new user runs are `make demo` and `make test`.
# Both set everything up first: the system data package, a .venv and the Python packages.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
STAMP  := $(VENV)/.epsscale-installed

.PHONY: setup data demo test test-all bench clean

setup: $(STAMP) data

# Torch first, pinned: on this project's machines pip finds a local CPU wheel of 2.13.0 (no
# multi-GB CUDA download); elsewhere that pin, or failing it any torch >= 2.1, is the normal install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 2>/dev/null || $(PIP) install -q "torch>=2.1"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST comes from Debian's package dataset-fashion-mnist.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist, or pass --data DIR"; \
	  fi; \
	fi

demo: setup
	$(VENV)/bin/epsscale demo

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "not slow"

test-all: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
