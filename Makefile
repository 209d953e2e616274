# The two commands of the README:
#   make demo   distil Fashion-MNIST (configs/demo.yaml), evaluate it and the random baseline
#   make test   the test suite (builds the extension); .ci/run adds make test-other-isa
# Both create the virtual environment, install what is needed and fetch the dataset package.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PATH := $(abspath $(VENV))/bin:$(PATH)
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
# TORCH_CUDA_ARCH_LIST is left to the caller: setup.py builds for the visible GPUs, else 8.0;9.0+PTX
# The float-sensitive tests (marker numerics) run again under another ATen CPU capability and
# oneDNN ISA, so a test that holds on one instruction set only fails here, not on the next machine
OTHER_ISA := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null \
	&& echo "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" \
	|| echo "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41")
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEPS := $(VENV)/.dasm-deps
STAMP := $(VENV)/.dasm-installed
DEMO := runs/demo

.PHONY: demo test test-other-isa install data bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): | $(PY)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install numpy safetensors pyyaml tqdm matplotlib pillow pytest pytest-benchmark \
		ninja setuptools wheel mlxtend scikit-learn
	touch $@

$(STAMP): $(DEPS) pyproject.toml setup.py $(wildcard csrc/*)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

data: $(FMNIST)

$(FMNIST):
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -q && $$SUDO apt-get install -y dataset-fashion-mnist

test: install data
	$(PY) -m pytest -q

test-other-isa: install data
	env $(OTHER_ISA) $(PY) -m pytest -q -m numerics

demo: install data
	rm -rf $(DEMO) $(DEMO)-random
	@start=$$(date +%s); \
	$(PY) -m dasm distill --config configs/demo.yaml --out $(DEMO) && \
	$(PY) -m dasm evaluate $(DEMO) | tee $(DEMO)/summary.txt && \
	$(PY) -m dasm baseline random --config configs/demo.yaml --out $(DEMO)-random && \
	$(PY) -m dasm evaluate $(DEMO)-random | tee -a $(DEMO)/summary.txt && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s (outputs in $(DEMO)/, $(DEMO)-random/)" \
		| tee -a $(DEMO)/summary.txt

bench: install data
	$(PY) -m pytest benchmarks/bench_matching_cpu.py -s

clean:
	rm -rf build *.egg-info dasm/_C*.so runs
