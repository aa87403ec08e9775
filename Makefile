# One command to set up and test, one to set up and build the book. See README.md.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

# Offline machines (CI): tiktoken's GPT-2 files lie beside the checkout.
ifneq ($(wildcard ../shared/tiktoken-cache),)
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken-cache)
endif

.PHONY: setup test test-other-cpu book lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

# Unit tests and strict nbval in one run. Each chapter is executed once, by nbval, which compares
# every output with the committed one; so the book is built first from those committed outputs
# (EXECUTE=off), for the browser tests that read _build/html.
test: lint
	$(MAKE) book EXECUTE=off
	$(PY) -m pytest tests notebooks --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg

# The unit tests and every chapter on the kernels of a CPU without AVX-512 or AMX (the AMD EPYC
# machine type), whatever this machine is: what nbval compares must hold there too.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-other-cpu: setup
	$(AVX2_ONLY) $(PY) -m pytest tests notebooks --nbval --nbval-sanitize-with \
	    tests/nbval_sanitize.cfg --deselect tests/test_browser.py --deselect tests/test_live.py

# Executes every chapter (EXECUTE=force, _config.yml's setting); any warning (-W, -n) or notebook
# error (nb_execution_raise_on_error) fails. EXECUTE=off renders the committed outputs instead.
EXECUTE ?= force
book: setup
	bash scripts/fetch_widget_js.sh
	@mkdir -p _build
	@# _config.yml with EXECUTE; its one relative path (the local extension) seen from _build/
	sed -e 's/^  execute_notebooks: force /  execute_notebooks: $(EXECUTE) /' \
	    -e 's/^    offline_js: _ext /    offline_js: ..\/_ext /' _config.yml > _build/_config.yml
	@grep -q '^  execute_notebooks: $(EXECUTE) ' _build/_config.yml
	@grep -q '^    offline_js: ../_ext ' _build/_config.yml
	$(VENV)/bin/jupyter-book build . --config _build/_config.yml -W -n --keep-going

clean:
	rm -rf _build
