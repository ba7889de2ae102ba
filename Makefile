# fastmlm — every entry point. `make test` and `make demo` build their environment from scratch.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines use the CPU build of torch; GPU machines bring their own torch (see gpu-check).
TORCH_SPEC ?= torch==2.13.0
NVCC ?= $(shell command -v nvcc 2>/dev/null)

# The GPU machine's triton, for the side compile check (installed beside .venv, never over it).
TRITON_SIDE ?= 3.6.0
TRITON_SIDE_DIR := $(VENV)/triton-$(TRITON_SIDE)

.PHONY: venv test test-cpu compile-cuda compile-triton demo bench gpu-check gpu-wheels mutate clean

$(VENV)/.installed: pyproject.toml setup.py fastmlm/ops/_boundary.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	FASTMLM_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# The CPU tier: references, dispatch, model, data, training, and the Triton kernels
# under the interpreter; plus a compile of every csrc/*.cu where nvcc exists.
test: venv compile-cuda compile-triton
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider

compile-cuda: venv
	@if [ -n "$(NVCC)" ] && ls csrc/*.cu >/dev/null 2>&1; then \
		$(PY) -m fastmlm.tools.compile_cuda --arch 80 90a; \
	else echo "compile-cuda: no nvcc or no csrc/*.cu, skipping the CUDA compile check"; fi

# Every Triton kernel compiled for sm_90a and sm_80 by the GPU machine's triton ($(TRITON_SIDE)),
# while torch stays the .venv's: triton alone goes into $(TRITON_SIDE_DIR) (pip --no-deps --target)
# and comes first on PYTHONPATH. About 1-2 minutes; skipped, saying so, where the wheel cannot be had.
compile-triton: venv
	@if [ ! -f "$(TRITON_SIDE_DIR)/triton/__init__.py" ]; then \
		rm -rf "$(TRITON_SIDE_DIR)"; \
		$(PY) -m pip install -q --no-deps --target "$(TRITON_SIDE_DIR)" "triton==$(TRITON_SIDE)" >/dev/null 2>&1 \
		|| { rm -rf "$(TRITON_SIDE_DIR)"; echo "compile-triton: SKIPPED: triton==$(TRITON_SIDE) cannot be installed here (offline, or no wheel for this Python); the kernels were not compiled by the GPU machine's triton"; exit 0; }; \
	fi; \
	if [ -f "$(TRITON_SIDE_DIR)/triton/__init__.py" ]; then \
		env -u TRITON_INTERPRET PYTHONPATH="$(TRITON_SIDE_DIR)" $(PY) -c "import sys; from fastmlm.ops.kernels_path import import_module; sys.exit(import_module('fastmlm_kernels._flash_compile').side_check())"; \
	fi

# The main job on its embedded default: train a small MLM on the bundled corpus, then
# report validation accuracy / perplexity and fill a mask. Uses the GPU when present.
demo: venv
	$(PY) -m fastmlm demo

# CPU benchmarks: markdown tables under benchmarks/results/ (GPU figures come from gpu-check).
# Mutation checks (fastmlm/tools/mutate.py): each curated mutant of fastmlm/tools/mutations.py applied
# alone to a scratch copy, against the tests covering its file. Long; make test runs a 4-mutant subset.
mutate: venv
	$(PY) -m fastmlm.tools.mutate --baseline

bench: venv
	$(PY) -m benchmarks --cpu

# The one entry point on a GPU machine: build the extension in place, run the GPU tier and
# the benchmarks, write a report to $$GPU_CHECK_OUT (default benchmarks/results/). Uses the
# machine's own Python and torch and installs nothing.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out "$${GPU_CHECK_OUT:-benchmarks/results}"

# The masked loss's peers (Liger Kernel, Cut Cross-Entropy) as wheels in .whl, at the versions the venv's
# test extras pin: gpu-check installs them on a GPU machine that has no package registry.
gpu-wheels: venv
	$(PY) -m benchmarks.peer_wheels .whl

clean:
	rm -rf $(VENV) build *.egg-info fastmlm/_C*.so
