# The README's two commands: `make run` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint typecheck fuzz chaos clean

# The inner loop: under 2 minutes, no backend servers (no MLflow, W&B, Aim, TensorBoard or
# Trackio): the protocol, settings, the WAL and the daemon's pieces in-process.
FAST_TESTS := tests/test_protocol.py tests/test_settings.py tests/test_curve.py \
	tests/test_layering.py tests/test_inprocess.py tests/test_wal.py tests/test_redaction.py \
	tests/test_jsonl_lines.py tests/test_testing.py

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/trackd serve

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks fuzz
	$(BIN)/ruff format --check src tests benchmarks fuzz

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

test-fast: $(VENV)/.installed-test
	$(BIN)/pytest -q $(FAST_TESTS)

chaos: $(VENV)/.installed-test
	TRACKD_CHAOS_ROWS=1000000 $(BIN)/pytest tests/chaos

fuzz: $(VENV)/.installed-test
	$(BIN)/python fuzz/decode_frames.py -max_total_time=300

clean:
	rm -rf $(VENV)
