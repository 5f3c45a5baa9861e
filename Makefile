# vp-gguf. `make demo` and `make test` do all the set-up they need, in a project
# virtual environment (./.venv), and are quick the second time.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check
# extra CMake switches for our build, e.g. CMAKE_ARGS="-DGGML_CUDA=on" make install
CMAKE_ARGS ?=
# everything the installed package is made from: `install` reruns when one of them changes
SOURCES := $(shell find cpp vp_gguf -type f -not -path '*/__pycache__/*' -not -path 'vp_gguf/lib/*' 2>/dev/null) \
           CMakeLists.txt pyproject.toml third_party/llama.cpp.lock.json scripts/fetch_llama_cpp.py
READY     = $(VENV)/.vp-ready
INSTALLED = $(VENV)/.vp-installed

.PHONY: install demo test test-quick test-archs sanitize format dist bench bench-speed gpu-check patches patches-check fetch clean

# machine checks, the venv, the pinned llama.cpp tree, the build requirements
$(READY): scripts/bootstrap.py pyproject.toml third_party/llama.cpp.lock.json
	@$(PYTHON) scripts/bootstrap.py --venv $(VENV)
	@touch $@

# llama.cpp compiled once, by us (the build also installs llama-cpp-python's Python layer)
$(INSTALLED): $(READY) $(SOURCES)
	CMAKE_ARGS="$(CMAKE_ARGS)" $(PIP) install -q --no-build-isolation ".[dev]"
	@touch $@

install: $(READY)
	@rm -f $(INSTALLED)
	@$(MAKE) --no-print-directory $(INSTALLED)

fetch: $(READY)
	$(PY) scripts/fetch_llama_cpp.py

demo: $(INSTALLED)
	$(VENV)/bin/vp-gguf demo --out .vp-cache/demo

test: $(INSTALLED)
	$(PY) -m pytest -q tests

# everything but the tests marked slow (a real model over many items, fresh installs)
test-quick: $(INSTALLED)
	$(PY) -m pytest -q -m "not slow" tests

# upstream's test-llama-archs on the patched libllama (every architecture; part of `make test`)
test-archs: $(INSTALLED)
	$(PY) -m pytest -q tests/test_upstream_archs.py

# AddressSanitizer + UBSan build of our C++ and the patched tree (build/sanitize), running the C-level
# tests on it: the flash-attention kernel test, llama-mtmd-cli on the tiny models, the bad-input tests
# (not part of `make test`: on 2 cores the first build takes about 40 minutes with a cold ccache,
# a rebuild after a cpp/src change about 1, the checks about 5)
sanitize: $(INSTALLED)
	$(PY) scripts/sanitize.py

# ruff's and clang-format's layout, applied (make test checks it)
format: $(INSTALLED)
	$(VENV)/bin/ruff format vp_gguf
	$(VENV)/bin/clang-format -i cpp/src/*.cpp cpp/src/*.h cpp/include/*.h cpp/ggml-cpu/*.cpp cpp/ggml-cpu/*.h

# an sdist (carrying the pinned llama.cpp sdist) and a portable wheel for other machines
dist: $(READY)
	$(PIP) install -q build
	CMAKE_ARGS="-DVP_GGUF_PORTABLE=ON $(CMAKE_ARGS)" $(PY) -m build -o dist

# the fidelity benchmark of the glyph testbed -> docs/testbed (about 30 minutes on 2 cores)
bench: $(INSTALLED)
	$(PY) scripts/testbed_bench.py

# decode speed, VisionPulse against dense and a text-only floor -> docs/speed (about 20 minutes)
bench-speed: $(INSTALLED)
	$(PY) scripts/speed_bench.py

# on a machine with an NVIDIA GPU: CUDA build, exactness tests offloaded, speed -> docs/speed/cuda
gpu-check:
	scripts/gpu_check.sh

patches: $(READY)
	$(PY) scripts/patches.py regenerate

patches-check: $(READY)
	$(PY) scripts/patches.py check

clean:
	rm -rf build dist *.egg-info $(INSTALLED)
