# The two commands of the README:  `make book`  and  `make test`.
# Both create the virtual environment on first use (CPU torch from the pinned wheel, then
# diffnotes with its book and dev extras) and reuse it afterwards.
PYTHON  ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
JBFLAGS ?= --keep-going
TESTFLAGS ?= -n 2

.PHONY: book test bench install clean site-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[book,dev,site,classroom]"
	touch $@

install: $(VENV)/.installed

book: $(VENV)/.installed           ## execute every chapter and build the website into _build/html
	$(BIN)/jupyter-book build . $(JBFLAGS)

test: $(VENV)/.installed           ## the test suite (benchmarks excluded)
	$(BIN)/pytest $(TESTFLAGS) --ignore=tests/benchmarks --ignore=tests/site

site-test: $(VENV)/.installed      ## the built site in Chromium (needs `make book` and Debian's chromium)
	DIFFNOTES_SITE_TEST=required $(BIN)/pytest tests/site tests/test_built_html.py -s -p no:xdist -p no:cacheprovider

bench: $(VENV)/.installed          ## speed and memory ratios, printed
	$(BIN)/pytest tests/benchmarks -s -p no:xdist

clean:
	rm -rf _build
