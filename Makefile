# Two commands set everything up on a fresh machine:
#   make dissect   # venv, embedded probe data and model, then the pipeline
#   make test      # venv, then the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= default
DATASET ?= default
ARGS ?=
DATA := data
SYNTHETIC := $(DATA)/synthetic_broden
EMBEDDED := $(DATA)/embedded_model

# The embedded defaults are built only when they are used.
PREREQS := $(STAMP)
ifeq ($(DATASET),default)
PREREQS += $(SYNTHETIC)/index.csv
endif
ifeq ($(MODEL),default)
PREREQS += $(EMBEDDED)/model.pt
endif

.PHONY: dissect report audit-demo test test-slow venv data model benchmarks benchmark-broden-scale clean-results

dissect: $(PREREQS)
	$(BIN)/python -m dissect model=$(MODEL) dataset=$(DATASET) $(ARGS)

# Rebuild the report of a finished run from disk (no model is run).
report: $(STAMP)
	$(BIN)/python -m dissect model=$(MODEL) dataset=$(DATASET) stages=[report] $(ARGS)

# Train the embedded architecture with a sensible and a far too high learning
# rate, audit both, print them side by side (about 3 minutes on 2 cores).
audit-demo: $(STAMP) $(SYNTHETIC)/index.csv
	$(BIN)/python -m dissect.tools.audit_demo --data $(SYNTHETIC) $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

venv: $(STAMP)

# pip resolves torch and torchvision together from the package registry.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

data: $(SYNTHETIC)/index.csv

$(SYNTHETIC)/index.csv: | $(STAMP)
	$(BIN)/python -m data_prep synthetic --out $(SYNTHETIC)

model: $(EMBEDDED)/model.pt

# Retrained when the recipe or the architecture changes.
$(EMBEDDED)/model.pt: $(SYNTHETIC)/index.csv dissect/embedded_training.py dissect/embedded_model.py
	$(BIN)/python -m data_prep train-embedded --data $(SYNTHETIC) --out $(EMBEDDED)

benchmarks: $(STAMP) $(EMBEDDED)/model.pt
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/tally.py

# The whole pipeline at Broden's size (63,305 generated images) and at 8,000:
# seconds, images/s and peak RSS per stage; builds data/broden_scale when missing.
benchmark-broden-scale: $(STAMP) $(EMBEDDED)/model.pt
	$(BIN)/python benchmarks/broden_scale.py $(BENCH_ARGS)

clean-results:
	rm -rf results
