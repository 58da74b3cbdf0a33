# Two commands do all set-up on a fresh machine:
#   make demo   - tiny end-to-end run on CPU (convert -> cache -> train -> resume -> export -> sample)
#   make demo-klein - the same chain on a tiny random FLUX.2 [klein] pipeline
#   make test   - the test suite (what CI runs)
#   make test-fast - the test suite without the tests marked slow or e2e (a quick check while editing)
# Both create/reuse .venv and install the package with the `ref` extra (torch CPU, diffusers, peft: the
# numerical references the tests compare against and the tiny-model builder uses) and the `aot` extra (libtpu and
# the CUDA compiler plugin + cuDNN: the tests compile the sharded train step for a TPU v5p slice and 8 x H100).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo demo-klein bench clean

# The demo and the tests run on the CPU. The `aot` extra installs the CUDA compiler plugin, whose start-up on a
# machine without a GPU prints a long "Unable to load CUDA" traceback unless JAX is told to use the CPU.
test test-fast demo demo-klein: export JAX_PLATFORMS ?= cpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[ref,aot]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	@$(PY) -m pytest -m "not slow and not e2e" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(PY) scripts/demo.py --out demo_out

demo-klein: $(STAMP)
	$(PY) scripts/demo.py --family klein --out demo_klein_out

bench: $(STAMP)
	$(PY) scripts/bench.py --config configs/demo.py

clean:
	rm -rf demo_out demo_klein_out .pytest_cache
