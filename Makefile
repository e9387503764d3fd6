# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup setup-gpu demo test test-unit

setup:
	bash scripts/setup.sh cpu

setup-gpu:
	bash scripts/setup.sh gpu

demo: setup
	.venv/bin/r1lab demo

test: setup
	$(PY) -m pytest -m "not gpu" -q --durations=30 tests

test-unit: setup
	$(PY) -m pytest -m unit -q tests
