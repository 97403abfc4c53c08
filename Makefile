# The two set-up commands (README.md): `make run` and `make test`. Both install first.
.PHONY: install run test

install:
	bash scripts/install.sh

run: install
	bash scripts/flwr_run.sh

test: install
	.venv/bin/python -m pytest
