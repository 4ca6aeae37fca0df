# Targets used by the README, CI (.ci/run) and pre-commit alike.
PYTHON ?= python3

.PHONY: test install-test redis haproxy check lint typecheck unit demo bench

test: install-test redis haproxy check
	$(PYTHON) -m pytest -q

install-test:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'

# The tests start their own redis-server on a free port; they only need the binary.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# tests/integration/test_topology.py runs the shipped deploy/haproxy.cfg with the real binary.
haproxy:
	@command -v haproxy >/dev/null 2>&1 || { \
	  echo "installing haproxy (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq haproxy >/dev/null; }

check: lint typecheck

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

typecheck:
	$(PYTHON) -m mypy

unit:
	$(PYTHON) -m pytest -q tests/unit

demo:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e .
	mlxmux demo
