# healthmesh: `make demo` runs a real local mesh; `make test` installs everything and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Parallel test workers (pytest-xdist, one test file per worker at a time); 0 runs serially.
TEST_WORKERS ?= 2
# Debian packages: python3-venv for the virtual environment; what the tests and benchmarks
# drive: namespaces and firewall rules, fping and
# ApacheBench for side-by-side benchmarks, etcd for the membership tests, openssl for the
# certificates of the etcd TLS and https check tests, dnsmasq as the real DNS server of the
# dns check tests, prometheus
# (with promtool) for the metrics tests, chromium as the real browser of the web page tests
# (driven by Playwright, which never downloads a browser of its own here).
SYSTEM_PACKAGES := python3-venv iproute2 iptables fping apache2-utils etcd-server etcd-client \
                   procps openssl dnsmasq prometheus chromium

# Python 3.10 is the oldest supported version: `make test` also runs these fast unit tests
# (no root, network namespaces or etcd) on it, in .venv310. The interpreter is python3.10
# on PATH, else pyenv's (~/.pyenv/versions/3.10*/bin). Under CI=true a missing 3.10 is an
# error; elsewhere the step is skipped with a note.
VENV310   := .venv310
PY310_TESTS := tests/test_detection_logic.py tests/test_layering.py \
               tests/test_hostile_plugins.py::test_a_hookimpl_taking_fewer_arguments_than_its_spec_works \
               tests/test_run.py::test_once_json_matches_the_snapshot_schema \
               tests/test_run.py::test_a_responder_port_in_use_is_a_one_line_error \
               tests/test_web.py::test_the_history_ring_is_bounded_and_keeps_transitions \
               tests/test_web.py::test_the_local_row_fallback_has_the_mesh_shape
FIND_PY310 := for p in $$(command -v python3.10) $$HOME/.pyenv/versions/3.10*/bin/python3.10; do \
                [ -x "$$p" ] && "$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' \
                  2>/dev/null && { echo "$$p"; break; }; done

.PHONY: venv system-packages test test-py310 lint demo bench clean

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
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile
	$(MAKE) --no-print-directory test-py310

test-py310:
	@py=$$($(FIND_PY310)); \
	if [ -z "$$py" ]; then \
	  case "$$CI" in true|1|yes) echo "error: CI=true but no Python 3.10 was found" \
	    "(python3.10 on PATH or ~/.pyenv/versions/3.10*/bin/python3.10)" >&2; exit 1;; esac; \
	  echo "skipping the Python 3.10 tests: no python3.10 (on PATH or under ~/.pyenv)"; \
	  exit 0; \
	fi; \
	if [ ! -f $(VENV310)/.installed ] || [ pyproject.toml -nt $(VENV310)/.installed ]; then \
	  echo "creating $(VENV310) with $$py"; \
	  "$$py" -m venv $(VENV310) && \
	  $(VENV310)/bin/pip install --quiet -e . -e examples/healthmesh-tcp \
	    pytest pytest-timeout jsonschema && touch $(VENV310)/.installed || exit 1; \
	fi; \
	echo "== Python 3.10: $(PY310_TESTS)"; \
	$(VENV310)/bin/pytest -q -p no:cacheprovider $(PY310_TESTS)

demo: venv
	@echo "web page: http://127.0.0.1:9968/ (the mesh heatmap; Ctrl-C stops the demo)"
	$(BIN)/healthmesh run -c examples/loopback.toml

bench: system-packages venv
	$(BIN)/pip install --quiet -e '.[bench]'
	@mkdir -p bench/results
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b --json bench/results/$$(basename $$b .py).json || exit 1; done

clean:
	rm -rf $(VENV) $(VENV310) .pytest_cache .ruff_cache bench/results
