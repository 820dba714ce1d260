# l4lab: `make lab` opens the notebooks, `make test` runs every check, `make book` builds the book,
# `make notebooks` re-executes the stored notebooks.
# All set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.l4lab-installed
# The CPU build of torch where there is no NVIDIA GPU (a CUDA build is several GB). Elsewhere, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup lab test lint book browser bench clean notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install --quiet $(TORCH_SPEC); fi
	$(PY) -m pip install --quiet -e ".[dev,book,kernels]"
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The book (book/_build/html): the notebooks rendered from their stored outputs (book/prepare.py turns
# plotly JSON into figures drawn by the site's own plotly.js, widgets into their last state), the labs,
# the teacher's guide and the API reference. Offline; rebuilt only when a source changed, and then in
# full (--all: an incremental Sphinx build with no changed page skips copying book/_static).
BOOK_HTML := book/_build/html/intro.html
BOOK_SOURCES := $(wildcard book/*.md book/*.yml book/*.py book/api/*.md book/_static/*.css \
	book/_static/*.svg book/_extra/* notebooks/*.ipynb notebooks/labs/*.ipynb notebooks/labs/solutions/*.ipynb l4lab/*.py l4lab/*/*.py kernels/*.py)

book: $(BOOK_HTML)

$(BOOK_HTML): $(STAMP) $(BOOK_SOURCES)
	$(PY) book/prepare.py
	$(VENV)/bin/jupyter-book build --all book
	touch $(BOOK_HTML)

# tests/test_book.py opens the book in Debian's chromium; installed here where missing and we are root
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else echo "no chromium on the PATH and not root: tests/test_book.py will skip"; fi; }

# The numeric path the notebooks are tested on: another one than the one that stored their outputs, on
# any machine (ATen's kernels without vectorisation, MKL's compatible mode, one thread per notebook), so
# that an output whose digits depend on the CPU fails here rather than on the next machine. Strict nbval
# compares only what is exact everywhere; trained results are checked as claims (l4lab.claims).
TRIPWIRE := ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1

# every test (the book in a browser too), then every notebook re-executed on the tripwire's numeric path
# and compared with its stored outputs (strict nbval), two notebooks at a time; the lab exercises raise
# NotImplementedError by design and are stored without outputs (their solutions are compared)
test: lint book browser
	$(VENV)/bin/pytest -q tests
	$(TRIPWIRE) $(VENV)/bin/pytest -q -n 2 --dist loadscope notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with notebooks/nbval_sanitize.cfg --ignore-glob='notebooks/labs/lab*.ipynb'

# re-execute every stored notebook in place (after a change to the code under them), then
# `python benchmarks/claims_spread.py` if a claim or what it measures changed
notebooks: $(STAMP)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 \
		notebooks/*.ipynb notebooks/labs/solutions/*.ipynb

bench: $(STAMP)
	$(PY) benchmarks/cpu_vs_transformers.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache book/_build book/notebooks book/_static/plotly.min.js
