# `make run`: the demo pipeline on the embedded default. `make test`: the whole suite.
# Both create .venv and install everything on first use; later calls reuse it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: install system run test lint clean

install: $(STAMP)

# torch goes first and pinned: a bare `torch` requirement on an empty venv pulls a CUDA build of
# several GB; with the pinned CPU build present, pyproject's range installs nothing more.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all,dev]'
	touch $@

# The container tests build and run the server image with podman (no Docker engine needed):
# podman, runc (crun's setrlimit is refused in some VMs) and mmdebstrap (a local base image when
# no registry answers). Installed with apt when missing and run as root; quick when done.
SYSTEM_PACKAGES := podman runc mmdebstrap prometheus
CONTAINERS_CONF := $(if $(filter 0,$(shell id -u)),/etc/containers/containers.conf,$(HOME)/.config/containers/containers.conf)

system:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "container and Prometheus tests need:$$missing (apt-get install -y $(SYSTEM_PACKAGES))" >&2; exit 1; \
	  fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null && apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; }; \
	fi
	@grep -qs '^default_ulimits' $(CONTAINERS_CONF) || { \
	  mkdir -p $(dir $(CONTAINERS_CONF)); \
	  if grep -qs '^\[containers\]' $(CONTAINERS_CONF); then \
	    sed -i '/^\[containers\]/a default_ulimits = []' $(CONTAINERS_CONF); \
	  else printf '[containers]\ndefault_ulimits = []\n' >> $(CONTAINERS_CONF); fi; }

run: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/myriad run

test: $(STAMP) system
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf .myriad
