# simbook: notebooks (nbs/) -> package (simbook/) -> tests + website (book/_build/html)
# `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

VENV := .venv
BIN  := $(VENV)/bin
PY   := $(BIN)/python
SITE := book/_build/html
# build from the repository root; --path-output book puts the site in book/_build/html
JB_BUILD := $(BIN)/jupyter-book build . --toc _toc.yml --path-output book --all -W --keep-going

# Same numerics everywhere: pinned CPU code paths, 2 threads, no hash/tokenizer
# randomness, no network for Hugging Face libraries, headless matplotlib.
export ATEN_CPU_CAPABILITY := avx2
export MKL_CBWR := AVX2
export ONEDNN_MAX_CPU_ISA := AVX2
# The notebooks' stored outputs must come out the same on Intel and AMD CPUs: MKL's
# AVX2 branch exists on Intel only (elsewhere MKL picks its own), so they use the
# SSE2 branch that both share. tools/execute_notebooks.py sets the same
# (nbs/00_conventions.ipynb, "Seeds and threads").
nbval notebooks book-exec: export MKL_CBWR := COMPATIBLE
export OMP_NUM_THREADS := 2
export MKL_NUM_THREADS := 2
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg
# Jupyter kernels must not see MPLBACKEND=Agg (ipykernel then drops the inline
# figures): tests/conftest.py and tools/execute_notebooks.py remove it for their
# kernels, and book-exec runs jupyter-book without it.
export TRITON_INTERPRET ?= 1

.PHONY: help venv nbdev-export sync pytest nbval book site book-exec notebooks test kernels clean distclean

help:
	@echo "make venv       create .venv (pip install -e '.[dev]'), Debian chromium and a CJK font"
	@echo "make book       build the website from stored outputs -> $(SITE)"
	@echo "make book-exec  build the website re-executing the notebooks (jupyter-cache)"
	@echo "make test       venv, sync, pytest tests, nbval nbs, book build (with timings)"
	@echo "make notebooks  re-execute nbs/*.ipynb in place, store outputs, export (NB=, BUDGET=)"
	@echo "make nbdev-export  write simbook/ from the notebooks (nbdev_export)"
	@echo "make sync       export, then check that simbook/ has no uncommitted change"
	@echo "make pytest     unit tests (tests/)    make nbval   notebook outputs (nbs/)"
	@echo "make kernels    compile every Triton kernel config for sm_80/sm_90 on the CPU (no GPU), check spills/smem"
	@echo "make clean      remove build outputs   make distclean   also remove .venv"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	@if [ ! -x /usr/bin/chromium ] || [ ! -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ]; then \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "installing Debian chromium and a CJK font (browser test of the site)"; \
	  $$SUDO apt-get update && $$SUDO apt-get install -y chromium fonts-wqy-zenhei; \
	fi
	touch $@

nbdev-export: venv
	$(BIN)/nbdev_export

sync: nbdev-export
	@if [ -n "$$(git status --porcelain --untracked-files=all -- simbook)" ]; then \
	  git status --short --untracked-files=all -- simbook; \
	  git --no-pager diff --stat -- simbook; \
	  echo "package out of sync with notebooks: run make nbdev-export and commit"; \
	  exit 1; \
	fi
	@echo "simbook/ is in sync with nbs/"

# Two workers of one torch thread each (a test file stays on one worker, with its
# fixtures): most unit tests are small ops that gain little from a second thread.
pytest: export OMP_NUM_THREADS := 1
pytest: export MKL_NUM_THREADS := 1
pytest: venv
	$(BIN)/pytest tests -n 2 --dist loadfile

nbval: venv
	$(BIN)/pytest nbs

book: venv sync
	@$(MAKE) site

# build only (no venv/sync prerequisites); used by `book` and `test`
site:
	$(JB_BUILD) --config book/_config.yml
	@echo "site: $(SITE)/index.html"
	@echo "serve it: python3 -m http.server -d $(SITE) 8000   (then http://localhost:8000)"

book-exec: venv sync
	env -u MPLBACKEND $(JB_BUILD) --config book/_config_exec.yml
	@echo "site: $(SITE)/index.html"
	@echo "serve it: python3 -m http.server -d $(SITE) 8000   (then http://localhost:8000)"

# make notebooks NB=nbs/08_decoding.ipynb BUDGET=300 re-executes one chapter (budget in s)
NB ?= nbs/*.ipynb
BUDGET ?= 90
notebooks: venv
	$(PY) tools/execute_notebooks.py --budget $(BUDGET) $(NB)
	$(BIN)/nbdev_export

# every stage is timed; a failing stage stops the run after printing the times so far
test:
	@times=""; status=0; \
	for stage in venv sync pytest nbval site; do \
	  t0=$$(date +%s.%N); \
	  $(MAKE) $$stage || status=$$?; \
	  t1=$$(date +%s.%N); \
	  times="$$times$$(printf '  %-7s %7.1f s' $$stage $$(awk "BEGIN{print $$t1-$$t0}"))\n"; \
	  if [ $$status -ne 0 ]; then times="$$times  FAILED at stage $$stage\n"; break; fi; \
	done; \
	printf "\nmake test stage times:\n$$times"; \
	exit $$status

# the full compile sweep (make test runs only the largest config of each dtype); table -> benchmarks/results/
# (the same sweep as pytest -m kernels_full; exits 1 if any config spills or overflows shared memory)
kernels: venv
	$(PY) tests/test_kernels_compile.py --full --out benchmarks/results/kernels_after.txt

clean:
	rm -rf book/_build _build .jupyter_cache _nbdev_docs .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name .ipynb_checkpoints -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
