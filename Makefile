# The two set-up commands (README.md): `make run` and `make test`. Both install first.
# `make lint`: ruff's format check and lint (CI runs it before the tests).
.PHONY: install run test lint

install:
	bash scripts/install.sh

run: install
	bash scripts/flwr_run.sh

test: install
	.venv/bin/python -m pytest

lint: install
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
