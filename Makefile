# mailgate developer entry points; every target bootstraps what it needs.
VENV ?= .venv

.PHONY: test run bench bench-checks lint bootstrap

test:
	scripts/test.sh

run:
	scripts/run.sh

bootstrap:
	scripts/bootstrap.sh

bench: bootstrap
	scripts/ensure-redis.sh
	$(VENV)/bin/python tests/perf/bench.py

bench-checks: bootstrap
	scripts/ensure-redis.sh
	$(VENV)/bin/python tests/perf/price_checks.py

lint: bootstrap
	$(VENV)/bin/ruff check
	$(VENV)/bin/ruff format --check
	$(VENV)/bin/mypy
