# The two set-up commands (README.md): `make run` and `make test`. Both install first.
# `make test` runs two pytest workers (pytest-xdist), a test file each: the end-to-end tests mostly wait on
# Flower and Ray, and a file's module-scoped simulations run once.
# `make lint`: ruff's format check and lint (CI runs it before the tests).
.PHONY: install run test lint

install:
	bash scripts/install.sh

run: install
	bash scripts/flwr_run.sh

test: install
	.venv/bin/python -m pytest -n 2 --dist loadfile --durations=15

lint: install
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
