# healthmesh: `make demo` runs a real local mesh; `make test` installs everything and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages: python3-venv for the virtual environment; what the tests and benchmarks
# drive: namespaces and firewall rules, fping and
# ApacheBench for side-by-side benchmarks, etcd for the membership tests, openssl for the
# certificates of the etcd TLS tests, prometheus (with promtool) for the metrics tests.
SYSTEM_PACKAGES := python3-venv iproute2 iptables fping apache2-utils etcd-server etcd-client \
                   procps openssl prometheus

.PHONY: venv system-packages test lint demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml examples/healthmesh-tcp/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' -e examples/healthmesh-tcp
	touch $@

# As root, install what is missing (CI runs as root with no standard input).
system-packages:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(SYSTEM_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi; \
	else echo "not root: skipping system packages ($(SYSTEM_PACKAGES))"; fi

lint: venv
	$(BIN)/ruff check .

test: system-packages venv lint
	$(BIN)/pytest

demo: venv
	$(BIN)/healthmesh run -c examples/loopback.toml

bench: system-packages venv
	$(BIN)/pip install --quiet -e '.[bench]'
	@mkdir -p bench/results
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b --json bench/results/$$(basename $$b .py).json || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/results
