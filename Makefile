# make serve   fresh machine: venv + requirements, trains default models if models/ is empty, starts gunicorn
# make test    the whole test suite (what .ci/run runs)
# make bench   the throughput benchmark (writes reports/bench-<date>.md); needs wrk (apt-get install wrk)
# make loadtest  locust matrix of modes, updates the README comparison (LOADTEST_ARGS=--quick for ~2 min)

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

LOADTEST_ARGS ?=

.PHONY: venv train serve test bench bench-batching loadtest lint clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) train.py

serve: venv
	@if [ -z "$$(ls -A models 2>/dev/null)" ]; then echo "models/ is empty: training the default models"; $(PY) train.py; fi
	$(VENV)/bin/gunicorn -c gunicorn.conf.py flask_server:app

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) bench/throughput.py

bench-batching: venv
	$(PY) bench/batching.py

loadtest: venv
	@if [ -z "$$(ls -A models 2>/dev/null)" ]; then $(PY) train.py; fi
	$(PY) bench/loadtest.py --step-ramp onnx-batched --update-readme $(LOADTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check serving tests bench train.py flask_server.py gunicorn.conf.py

clean:
	rm -rf .pytest_cache reports/*/ run/*.pid run/*.log
