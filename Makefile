# make demo  - set up and run the main job on the real SmolLM2 model and real WMT14 text (CPU)
# make test  - set up and run the test suite
# make results - train + evaluate the three head families on SmolLM2 and write docs/results.md
#                (resumable; options: make results RESULTS_ARGS='--steps 300 --max-sentences 100')
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers (one per core; whole files per worker so module fixtures are built once)
TEST_WORKERS ?= auto

.PHONY: demo test test-fast setup bench results clean

$(STAMP): requirements.txt requirements-convert.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m gptk_jax.demo

test: $(STAMP)
	$(PY) -m pytest tests -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

results: $(STAMP)
	$(PY) bench/results.py $(RESULTS_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -ra -m "not slow" -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) .cache out
