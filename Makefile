# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: setup demo test lint unit

setup:
	bash scripts/bootstrap.sh

# Local Synapse + Passerelle, a demo user, and the bot answering; Ctrl-C stops it.
demo: setup
	$(PYTHON) -m bridge demo

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy --strict bridge

# Everything CI runs: install what is missing, lint, type-check, then every test tier.
test: setup lint
	$(PYTHON) -m pytest -p no:cacheprovider

unit:
	$(PYTHON) -m pytest -p no:cacheprovider tests/unit
