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

# The suite runs on pytest-xdist workers: most tests wait on daemons, servers and clients in
# processes of their own, so 3 workers keep 2 cores busy (with 4 on a loaded machine 22
# tests ran out of time: README "Testing"). `--dist loadgroup` honours the xdist_group
# marks (the heavy tests one at a time; tests/conftest.py groups a module whose tests share
# a module-scoped server). A plain `pytest tests/test_x.py` stays serial.
WORKERS ?= 3
PARALLEL := -n $(WORKERS) --dist loadgroup
# more pytest options, e.g. PYTEST_ARGS=--basetemp=/tmp/mine beside other checkouts' runs
PYTEST_ARGS ?=

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

# mypy (minutes with a cold cache: it reads the SDKs' and torch's stubs) runs beside the
# tests, which spend most of their time waiting; either failing fails the target.
test: lint
	$(BIN)/mypy & typecheck=$$!; \
	$(BIN)/pytest $(PARALLEL) --durations=30 $(PYTEST_ARGS); tests=$$?; \
	wait $$typecheck && exit $$tests

test-fast: $(VENV)/.installed-test
	$(BIN)/pytest -q $(FAST_TESTS)

chaos: $(VENV)/.installed-test
	TRACKD_CHAOS_ROWS=1000000 $(BIN)/pytest tests/chaos

fuzz: $(VENV)/.installed-test
	$(BIN)/python fuzz/decode_frames.py -max_total_time=300

clean:
	rm -rf $(VENV)
