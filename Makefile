# Two commands set everything up on a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The bundled trained model once it ships (see models/); until then a random-weight demo checkpoint.
MODEL  ?= $(if $(wildcard models/tiny-code/config.json),models/tiny-code,build/demo-model)
PROMPT ?= def fibonacci(n):

# Editing a proto re-runs the install step, which regenerates libs/tandem/v1 (git ignores it).
PROTOS := $(shell find protos -name '*.proto')

.PHONY: up test install install-test redis-server bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, by exact version, so that no other package can pull a CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml $(PROTOS)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e .
	$(BIN)/python -m tandem.rpc.codegen
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

build/demo-model/config.json: | $(VENV)/.installed
	$(BIN)/tandem init-model --preset tiny --out build/demo-model

# Until the cluster lands, `make up` runs the colocated engine once and shows how to call it yourself.
up: install $(if $(filter build/demo-model,$(MODEL)),build/demo-model/config.json)
	@$(if $(filter build/demo-model,$(MODEL)),echo "note: $(MODEL) has random weights so its text is noise (the trained models/tiny-code replaces it)")
	@echo "== tandem generate --model $(MODEL) --prompt '$(PROMPT)'"
	$(BIN)/tandem generate --model $(MODEL) --prompt '$(PROMPT)' --max-tokens 48
	@echo
	@echo "Try it yourself:  $(BIN)/tandem generate --model $(MODEL) --prompt 'import os' --max-tokens 64 --json"

# The integration tests start a real redis-server (tests/conftest.py); install it where apt can.
redis-server:
	@command -v redis-server >/dev/null || \
	  (DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) || \
	  (echo "redis-server is needed by the tests and could not be installed here; install it yourself:"; \
	   echo "  sudo apt-get install redis-server   (Debian/Ubuntu)"; \
	   echo "  brew install redis                   (macOS)"; exit 1)

test: install-test redis-server
	$(BIN)/python -m pytest -q tests

bench: install-test
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info libs/tandem/v1
