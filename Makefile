# Set-up is two commands on a fresh machine with only python3 and make: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint typecheck pytest browser services bench docs build clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selfreport demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

# The collector's browser test needs Debian's chromium; CI runs as root and installs it here.
# Without root, apt or network it is skipped (the test says why), and `make test` still runs.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium for the browser test"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq chromium >/dev/null; } \
			|| echo "could not install chromium: the browser test will be skipped"; \
		else echo "chromium not found: the browser test will be skipped"; fi; }

# The Celery tests start their own redis-server (Debian's) as a broker; CI installs it here the
# same way. Without it they are skipped, saying why.
services:
	@command -v redis-server >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing redis-server for the Celery tests"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq redis-server >/dev/null; } \
			|| echo "could not install redis-server: the Celery tests will be skipped"; \
		else echo "redis-server not found: the Celery tests will be skipped"; fi; }

pytest: $(STAMP) browser services
	$(BIN)/python -m pytest --cov --cov-report=term --cov-report=xml $(PYTEST_ARGS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir .site

test: lint typecheck docs pytest

# The suite on every CPython 3.9-3.13 found (pyenv's versions, or python3.X on PATH), each in
# its own .venv-3.X; lint, typecheck and docs once with the main venv. TEST_ALL_ARGS: --skip 3.X,
# --require-all; PYTEST_ARGS go to each pytest. It says which versions it ran and which it lacks.
test-all: lint typecheck docs browser services
	$(BIN)/python tools/test_all.py $(TEST_ALL_ARGS) -- $(PYTEST_ARGS)

bench: $(STAMP)
	@$(BIN)/python -c 'import matplotlib, pyperf, sentry_sdk' 2>/dev/null \
		|| $(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

build: $(STAMP)
	rm -rf dist && $(BIN)/python -m pip wheel --no-deps --quiet -w dist . && ls dist

clean:
	rm -rf $(VENV) .venv-3.* dist .site .coverage* coverage.xml .mypy_cache .ruff_cache
