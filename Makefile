# One command to set up and test, one to set up and build the book. See README.md.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

# Offline machines (CI): tiktoken's GPT-2 files lie beside the checkout.
ifneq ($(wildcard ../shared/tiktoken-cache),)
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken-cache)
endif

.PHONY: setup test book lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

# Unit tests and strict nbval in one run; the book is built first (browser tests read _build/html).
test: lint book
	$(PY) -m pytest tests notebooks --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg

# Executes every chapter; any warning (-W, -n) or notebook error (nb_execution_raise_on_error) fails.
book: setup
	bash scripts/fetch_widget_js.sh
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

clean:
	rm -rf _build
