# One command runs the main job, one command passes the tests; each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt

.PHONY: install reproduce test bench figures lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[hf,notebooks,dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/adam-mini-lab reproduce --out results

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_hessian.py --write-readme
	$(BIN)/python benchmarks/bench_hessian.py --skip-tiny --hvp-only --gpt2-vocab 50257 \
		--vectors 4 --repeats 3 --min-seconds 0 --section gpt2-vocab-50257 --write-readme
	MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 \
		$(BIN)/python benchmarks/bench_hessian.py --skip-tiny --hvp-only --section hessian-malloc \
		--write-readme
	$(BIN)/python benchmarks/bench_optimizer.py --write

figures: $(STAMP)
	for f in figures/fig_*.py; do $(BIN)/python $$f || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
