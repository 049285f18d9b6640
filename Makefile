# tfwsgi: `make serve` serves the demo model, `make test` runs the whole suite (both from a fresh clone).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := build/models
PORT ?= 8501
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv system-deps demo-model serve test lint unit clean install

all: test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# System packages the tests and benchmarks drive for real.
SYSTEM_PACKAGES := curl procps memcached wrk nginx systemd
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(MODELS)/half_plus_two/1/saved_model.pb: tfwsgi/demo.py | venv
	$(PY) -m tfwsgi.demo $(MODELS)

demo-model: $(MODELS)/half_plus_two/1/saved_model.pb

serve: venv demo-model
	TFWSGI_MODEL_NAME=half_plus_two TFWSGI_MODEL_BASE_PATH=$(MODELS)/half_plus_two \
	TFWSGI_REST_API_PORT=$(PORT) $(VENV)/bin/gunicorn -c gunicorn_conf.py tfwsgi:app

lint: venv
	$(VENV)/bin/ruff check tfwsgi tests bench gunicorn_conf.py
	$(VENV)/bin/mypy

test: venv system-deps lint
	$(PY) -m pytest

# The systemd service (systemd/): /opt/tfwsgi, /etc/tfwsgi, the units; see the README.
install:
	systemd/install.sh

clean:
	rm -rf $(VENV) build *.egg-info
