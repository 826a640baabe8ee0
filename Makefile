# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: setup demo test lint unit

setup:
	bash scripts/bootstrap.sh

# Two local Synapses (agency, ministry), mail and Passerelle: demo users, a linked list, a
# room linked across the two servers and a room with webhooks to a legacy system, each checked
# both ways; Ctrl-C stops it.
demo: setup
	$(PYTHON) -m bridge demo

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy --strict bridge

# Everything CI runs: install what is missing, lint, type-check, then every test tier.
# Byte-compiled first: with PYTHONDONTWRITEBYTECODE set (as on these machines) every bridge
# process a test starts would compile the bridge's 150 modules again (0.5 s each time).
test: setup lint
	$(PYTHON) -m compileall -q -j 0 bridge tests
	$(PYTHON) -m pytest -p no:cacheprovider

unit:
	$(PYTHON) -m pytest -p no:cacheprovider tests/unit
