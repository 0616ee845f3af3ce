# xct: two commands work on a fresh machine with Python 3.11 and the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m xct._native build || true  # native CPU projector kernels (optional: else XLA)
	touch $(STAMP)

quickstart: $(STAMP)  ## DRR demo, then train + evaluate the quickstart model (CPU, minutes) -> ./quickstart_out/
	$(PY) -m scripts.quickstart --out quickstart_out
	$(PY) -m xct.main --config=quickstart --workdir=quickstart_out/train \
		--config.data.data_dir=quickstart_out/data

test: $(STAMP)  ## lint, then the default test suite (excludes slow and gpu tests)
	$(PY) -m ruff check xct configs scripts tests data_pipelines
	$(PY) -m pytest -n 2 --dist loadgroup --durations=30 tests

bench: $(STAMP)  ## projector throughput against RTK on this machine -> bench_out/ and a table
	$(PY) -m scripts.bench_projector --out bench_out

lint: $(STAMP)
	$(PY) -m ruff check xct configs scripts tests data_pipelines

clean:
	rm -rf quickstart_out bench_out .pytest_cache
