# The two commands a newcomer needs: `make demo` and `make test`.
# Both create or refresh the virtual environment in .venv themselves.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export PYTHONHASHSEED := 0

.PHONY: demo test test-slow bench venv clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PY) >/dev/null || (echo "need $(PY) on PATH" && exit 1)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	# CrypTen 0.4.1 pins a deprecated `sklearn`; its real deps are in pyproject (DESIGN.md §4).
	$(VENV)/bin/pip install -q --no-deps crypten==0.4.1
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lpm demo --out out/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(VENV)/bin/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache
