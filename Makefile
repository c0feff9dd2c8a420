# make serve       fresh machine: venv + requirements + the package, trains the default model if models/ is
#                  empty (mnist-torch on real MNIST, >= 0.99 on t10k, about 30 s; the 8x8 digits when MNIST
#                  cannot be had), starts gunicorn with gunicorn.conf.py on 127.0.0.1:8000
#                  (SERVING_FRONT=asgi make serve: asgi_server:app under an ASGI worker, docs/modes.md)
# make test        the whole suite, real servers included (what .ci/run runs); installs the system packages
# make test-fast   the in-process layer only (Flask test client, unit tests): under a minute
# make bench       the throughput benchmark, WSGI and ASGI fronts (writes reports/bench-<date>.md), then the
#                  memory benchmark; installs wrk
# make bench-memory  PSS/USS/RSS of the whole server per backend x mode x workers, sharing off/on and the model
#                  pool (reports/memory-<date>.md with a chart)
# make bench-pool  the model pool: per-call overhead, throughput on the large model, memory (reports/pool-<date>.md)
# make bench-fork  fork safety: 100,000 requests per backend with workers SIGKILLed and a SIGHUP
# make bench-traffic  canary and shadow traffic under load on both fronts: the split over 100,000 requests,
#                  sticky keys, rollbacks on errors and latency, a shadow (reports/traffic-<date>.md)
# make loadtest    locust matrix of modes on both fronts, ~10 min (LOADTEST_ARGS=--quick for ~4 min)
# make serve-mnist trains mnist-tf / mnist-torch if missing (MNIST from $MNIST_DIR, the cache, or one download),
#                  then serves mnist-tf
# make bench-tracing  tracing (off, 1%, 100%), payload logs and drift on the request path (reports/tracing-<date>.md)
# make bench-grpc  gRPC against HTTP v2 binary (h2load, wrk, perf_analyzer) and the gRPC server's placement
# make serve-iris  trains iris-svc if missing (scikit-learn's SVM through skl2onnx, seconds) and serves it
# make bench-first-serve  the first make serve on a fresh clone, install included, until the default model answers
#                  (reports/first-serve-<date>.md; target: within 3 minutes on 2 cores)
# make bench-uploads  upload accuracy of the MNIST and 8x8 models (reports/upload-accuracy-<date>.md)
# make fuzz        the image decoder, JSON parser and v2 codec fuzzed for longer (FUZZ_EXAMPLES=20000)
# make test-image  build both container images and check them for real (.ci/run runs it after make test)
# make lock        regenerate requirements-runtime.txt / -frameworks.txt (the images' pins) from pyproject.toml
# make protos      regenerate the gRPC API's messages (serving/protocol/v2/proto/*_pb2.py) from its .proto files
# make docs        regenerate docs/settings.md and the endpoint table in docs/api.md

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

LOADTEST_ARGS ?=
# Debian packages (package[:command]) each target needs; scripts/system-packages.sh installs them as root.
TEST_PACKAGES := nginx chromium prometheus systemd:systemd-analyze iproute2:ip
BENCH_PACKAGES := wrk

.PHONY: bench-grpc fuzz lock protos venv train serve serve-mnist serve-iris bench-first-serve train-mnist test test-fast test-image bench bench-memory bench-pool bench-fork bench-traffic bench-batching bench-tracing bench-uploads bench-replicas loadtest docs lint clean

$(VENV)/.installed: requirements.txt requirements-runtime.txt requirements-frameworks.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# the images' constraints too: what they pull in transitively is installed here at the same versions
	$(PY) -m pip install -r requirements.txt -c requirements-runtime.txt -c requirements-frameworks.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e . >/dev/null
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) train.py

# SERVING_FRONT=asgi serves the ASGI app; gunicorn.conf.py then picks the ASGI worker.
SERVE_APP = $(if $(filter asgi,$(SERVING_FRONT)),asgi_server:app,flask_server:app)

serve: venv
	@if [ -z "$$(ls -A models 2>/dev/null)" ]; then echo "models/ is empty: training the default model"; $(PY) train.py; fi
	$(VENV)/bin/gunicorn -c gunicorn.conf.py $(SERVE_APP)

serve-mnist: venv
	@if [ -z "$$(ls -A models/mnist-tf 2>/dev/null)" ]; then echo "no mnist-tf: training the MNIST models (about 2 minutes)"; $(PY) train.py --dataset mnist --framework all; fi
	SERVING_MODEL=mnist-tf $(VENV)/bin/gunicorn -c gunicorn.conf.py flask_server:app

serve-iris: venv
	@if [ -z "$$(ls -A models/iris-svc 2>/dev/null)" ]; then $(PY) train.py --dataset iris; fi
	SERVING_MODEL=iris-svc $(VENV)/bin/gunicorn -c gunicorn.conf.py flask_server:app

train-mnist: venv
	$(PY) -m bench.train_mnist

bench-first-serve: venv
	$(PY) -m bench.first_serve

bench-uploads: venv
	@if [ -z "$$(ls -A models/digits-tf 2>/dev/null)" ]; then $(PY) train.py --dataset digits; fi
	@if [ -z "$$(ls -A models/mnist-tf 2>/dev/null)" ]; then $(PY) train.py --dataset mnist --framework all; fi
	$(PY) -m bench.upload_accuracy

test: venv
	scripts/system-packages.sh $(TEST_PACKAGES)
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow"

# The parsers of client bytes under Hypothesis for longer (FUZZ_EXAMPLES a target; make test runs 150).
FUZZ_EXAMPLES ?= 20000
fuzz: venv
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/protocol/test_fuzz.py -q

bench: venv
	scripts/system-packages.sh $(BENCH_PACKAGES)
	$(PY) -m bench.throughput
	$(PY) -m bench.memory

bench-memory: venv
	scripts/system-packages.sh $(BENCH_PACKAGES)
	@if [ -z "$$(ls -A models/digits-tf 2>/dev/null)" ]; then $(PY) train.py --dataset digits; fi
	$(PY) -m bench.memory

bench-pool: venv
	scripts/system-packages.sh $(BENCH_PACKAGES)
	@if [ -z "$$(ls -A models/digits-tf 2>/dev/null)" ]; then $(PY) train.py --dataset digits; fi
	$(PY) -m bench.pool

bench-tracing: venv
	scripts/system-packages.sh $(BENCH_PACKAGES)
	@if [ -z "$$(ls -A models/digits-torch 2>/dev/null)" ]; then $(PY) train.py --dataset digits; fi
	$(PY) -m bench.tracing

bench-fork: venv
	@if [ -z "$$(ls -A models/digits-tf 2>/dev/null)" ]; then $(PY) train.py --dataset digits; fi
	$(PY) -m bench.fork_soak

# gRPC against HTTP v2 binary, perf_analyzer over both, the gRPC server's placement (reports/grpc-<date>.md)
bench-grpc: venv
	scripts/system-packages.sh $(BENCH_PACKAGES) nghttp2-client:h2load
	@if [ -z "$$(ls -A models/mnist-torch 2>/dev/null)" ]; then $(PY) train.py --dataset mnist --framework pytorch; fi
	$(PY) -m bench.grpc

bench-batching: venv
	scripts/system-packages.sh $(BENCH_PACKAGES)
	$(PY) -m bench.batching

loadtest: venv
	@if [ -z "$$(ls -A models/digits-tf 2>/dev/null)" ]; then $(PY) train.py --dataset digits; fi
	$(PY) -m bench.loadtest --step-ramp onnx-batched --update-docs $(LOADTEST_ARGS)

test-image: venv
	deploy/test-image.sh

# The images' constraints files, from pyproject.toml's dependencies at the versions requirements.txt installed.
lock: venv
	$(PY) scripts/lock_requirements.py

bench-traffic: venv
	@if [ -z "$$(ls -A models/digits-torch 2>/dev/null)" ]; then $(PY) train.py --dataset digits; fi
	$(PY) -m bench.traffic

protos: venv
	$(PY) scripts/generate_protos.py

bench-replicas: venv
	scripts/system-packages.sh nginx iproute2:ip
	$(PY) -m bench.replicas

docs: venv
	$(VENV)/bin/serving docs

lint: venv
	$(VENV)/bin/ruff check serving tests bench deploy scripts train.py flask_server.py asgi_server.py gunicorn.conf.py locustfile.py
	$(VENV)/bin/ruff format --check serving
	$(VENV)/bin/lint-imports

clean:
	rm -rf .pytest_cache reports/*/ run/*.pid run/*.log
