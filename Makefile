# The README's words as targets. Every target sets up .venv first (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup browser demo test test-fast lint format bench docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(PY) -m pipeline.extract --demo

# The report page's test drives a real headless browser: Debian's chromium + chromium-driver, installed
# with apt when missing (as root, or with password-less sudo); otherwise that test skips and says why.
browser:
	@command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	      chromium chromium-driver >/dev/null; } \
	  || echo "could not install chromium + chromium-driver: the report's browser test will skip"; }

test: setup browser
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m 'not slow'

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The documentation site (mkdocs.yml): broken links and references fail the build. docs/hooks.py
# generates the backbone table and the command pages from the registry and the parsers.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup
	$(PY) -m benchmarks

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) out site .pytest_cache .ruff_cache *.egg-info
