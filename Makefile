# tfwsgi: `make serve` serves the demo model, `make test` runs the whole suite (both from a fresh clone).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := build/models
PORT ?= 8501
GRPC_PORT ?= 8500
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv v2-clients v2-protos serve-deps system-deps demo-model serve test lint unit clean install

all: test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The KServe v2 clients the e2e tests drive (tests/v2_clients.py), in a virtualenv of their own:
# tritonclient 2.73 and kserve 0.21 need protobuf < 7 and ml_dtypes < 0.6, older than TensorFlow's.
CLIENTS_VENV := .venv-clients
$(CLIENTS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet 'tritonclient[http,grpc]>=2.73,<2.74' 'kserve>=0.21,<0.22'
	touch $@

v2-clients: $(CLIENTS_VENV)/.installed

# KServe v2 over gRPC: tfwsgi/v2proto/*_pb2*.py are generated from grpc_predict_v2.proto and checked
# in (grpcio-tools is a build tool, not a dependency of the server); regenerate them after editing
# the .proto, with the grpcio-tools of the grpcio tfwsgi pins (its protoc writes protobuf 7 code).
PROTO_VENV := build/.venv-protos
v2-protos:
	$(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip install --quiet 'grpcio-tools>=1.85.1,<1.86'
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
	  tfwsgi/v2proto/grpc_predict_v2.proto

# System packages: jemalloc for serving (TFWSGI_MEMORY_ALLOCATOR, see docs/architecture.md), and what the
# tests and benchmarks drive for real.
SERVE_PACKAGES := libjemalloc2
SYSTEM_PACKAGES := $(SERVE_PACKAGES) curl procps memcached wrk nginx systemd
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
endef

serve-deps:
	$(call apt_install,$(SERVE_PACKAGES))

system-deps:
	$(call apt_install,$(SYSTEM_PACKAGES))

$(MODELS)/half_plus_two/1/saved_model.pb: tfwsgi/demo.py | venv
	$(PY) -m tfwsgi.demo $(MODELS)

demo-model: $(MODELS)/half_plus_two/1/saved_model.pb

serve: venv serve-deps demo-model
	TFWSGI_MODEL_NAME=half_plus_two TFWSGI_MODEL_BASE_PATH=$(MODELS)/half_plus_two \
	TFWSGI_REST_API_PORT=$(PORT) TFWSGI_PORT=$(GRPC_PORT) $(VENV)/bin/gunicorn -c gunicorn_conf.py tfwsgi:app

lint: venv
	$(VENV)/bin/ruff check tfwsgi tests bench gunicorn_conf.py
	$(VENV)/bin/mypy

test: venv v2-clients system-deps lint
	$(PY) -m pytest

# The fast tier: in-process tests (tests/unit/), no servers started; under a minute.
unit: venv
	$(PY) -m pytest tests/unit -q

# The systemd service (systemd/): /opt/tfwsgi, /etc/tfwsgi, the units; see docs/operations.md.
install:
	systemd/install.sh

clean:
	rm -rf $(VENV) build *.egg-info
