"""Native JSON vs v2 JSON vs v2 binary tensors, with 1 and 64 samples per request, in samples/s.

    python -m bench.v2 [--seconds 8] [--connections 16] [--workers 2] [--models digits-torch,mnist-torch]
                       [--backend onnx]

For each model (by default the bundled 8x8 ``digits-torch`` and the 28x28 ``mnist-torch`` trained on
real MNIST by ``train.py --dataset mnist``, sent t10k digits; ``mnist28-torch`` is the older
MNIST-shaped stand-in that ``bench/mnist_shaped.py`` trains from upscaled digits),
starts its own gunicorn server (as shipped: process mode, access log, metrics and validation on),
checks that every request body gets a 200 with the same probabilities on each protocol, then drives
each body with wrk on 127.0.0.1 for ``--seconds`` (binary bodies are read from a file by the Lua
script, since a Lua long string would rewrite the line breaks inside them). Bodies follow the input
shape in the model's metadata; with ``--grpc`` (the default) the same 1 and 64 samples also go over gRPC
(``raw_input_contents``, checked first against the same probabilities), driven by nghttp2's h2load with as
many connections. Then measures, in this process and without HTTP, what decoding, the model call and
encoding cost per request. Writes one ``reports/v2-<stamp>.md`` with a section per
model and the raw wrk output under ``reports/v2-<stamp>/<model>/``. Target: with 64 samples per
request, v2 binary serves >= 3x the samples/s of native JSON, and >= 0.7 of what the bare model calls
allow (the backend's predict on the same 64 samples, one math thread, times the workers). ``--model
NAME`` benchmarks one model.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import orjson
import requests

from bench import mnist_shaped
from bench.harness import ROOT, WrkResult, grpc_body, mnist_dir, run_h2load, run_wrk, save_report, wrk_script
from serving.backends import backend_class
from serving.http.encoding import json_bytes
from serving.protocol.inputs import batch_from_data
from serving.protocol.v2.codec import InferenceRequest, decode_request, encode_response
from serving.protocol.v2.proto.grpc_service_pb2 import ModelInferResponse
from serving.protocol.v2.tensors import batch_from_request, output_tensors
from serving.store.repository import ModelMetadata, ModelRepository
from serving.toolchain.data import load_digits_dataset, load_mnist
from serving.tools.testing import GunicornServer

HEADER = "Inference-Header-Content-Length"
TARGET = 3.0
DEFAULT_MODELS = ("digits-torch", "mnist-torch")
#: v2 binary with 64 samples should serve at least this fraction of what the bare model calls allow.
LIMIT_TARGET = 0.7
Cases = dict[str, tuple[str, bytes, dict[str, str]]]
Costs = dict[str, tuple[float, float, float]]


def held_out_samples(meta: ModelMetadata) -> np.ndarray:
    """Held-out digits for the model: t10k for a model trained on real MNIST, 8x8 digits as bundled, or
    upscaled as ``bench/mnist_shaped.py`` does for the MNIST-shaped one."""
    if meta.raw.get("dataset") == "mnist" and meta.name != mnist_shaped.NAME:
        return load_mnist(mnist_dir()).x_test[:64]
    x = load_digits_dataset(seed=0).x_test
    height, width = meta.input_shape
    if (height, width) == x.shape[1:]:
        return x
    if height != width:
        raise SystemExit(f"{meta.name}: no test samples for a non-square input {height}x{width}")
    return mnist_shaped.upscale(x, height, min(mnist_shaped.BOX, height)).astype(np.float32) / 255.0


def bodies(x: np.ndarray, input_name: str = "input") -> Cases:
    """(protocol, samples) -> (path kind, body, headers) for each scenario; ``x`` is (N, H, W) samples."""
    cases: Cases = {}
    for n in (1, 64):
        batch = np.ascontiguousarray(x[:n], dtype=np.float32)
        cases[f"native JSON|{n}"] = ("native", orjson.dumps({"data": batch.reshape(n, -1).tolist()}),
                                     {"Content-Type": "application/json"})
        tensor = {"name": input_name, "shape": list(batch.shape), "datatype": "FP32"}
        cases[f"v2 JSON|{n}"] = ("v2", orjson.dumps({"inputs": [{**tensor, "data": batch.reshape(-1).tolist()}]}),
                                 {"Content-Type": "application/json"})
        header = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": batch.nbytes}}],
                               "parameters": {"binary_data_output": True}})
        cases[f"v2 binary|{n}"] = ("v2", header + batch.tobytes(), {HEADER: str(len(header))})
    return cases


def binary_script(path: Path, body_path: Path, headers: dict[str, str]) -> Path:
    """A wrk Lua script that POSTs the bytes of ``body_path`` with ``headers`` (and no Content-Type)."""
    lines = ['wrk.method = "POST"', f'local f = assert(io.open("{body_path}", "rb"))', "wrk.body = f:read(\"*a\")",
             "f:close()"]
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def protocol_costs(cases: Cases, meta: ModelMetadata, backend: str, rounds: int = 1000) -> Costs:
    """Per request, in this process (no HTTP): decode + validate, one model call, encode; microseconds."""
    runner = backend_class(backend)(meta, math_threads=1)
    runner.load()
    costs = {}
    for label, (kind, body, headers) in cases.items():
        decode = partial(_decode, kind, body, headers.get(HEADER), meta)
        batch = decode()
        output = runner.predict(batch)
        request = decode_request(body, headers.get(HEADER)) if kind == "v2" else None
        encode = partial(_encode, request, meta, output)
        costs[label] = (_micros(decode, rounds), _micros(partial(runner.predict, batch), rounds),
                        _micros(encode, rounds))
    return costs


def _decode(kind: str, body: bytes, length: str | None, meta: ModelMetadata) -> np.ndarray:
    if kind == "native":
        return batch_from_data(orjson.loads(body)["data"], meta, 64)
    return batch_from_request(decode_request(body, length), meta, 64)


def _encode(request: InferenceRequest | None, meta: ModelMetadata, output: np.ndarray) -> bytes:
    if request is None:
        return json_bytes({"prediction": output, "id": "x"})
    labelled = SimpleNamespace(meta=meta, labels_for=lambda p: [meta.labels[i] for i in p.argmax(axis=1).tolist()])
    return encode_response({"model_name": meta.name, "model_version": "1", "id": "x"},
                           output_tensors(request, labelled, output))[0]  # type: ignore[arg-type]


def _micros(call: Callable[[], object], rounds: int, budget_s: float = 0.5) -> float:
    """Mean microseconds per call over at most ``rounds`` calls, fewer for a slow call (about ``budget_s``)."""
    started = time.perf_counter()
    call()
    rounds = max(20, min(rounds, int(budget_s / max(time.perf_counter() - started, 1e-9))))
    for _ in range(rounds // 10):
        call()
    started = time.perf_counter()
    for _ in range(rounds):
        call()
    return (time.perf_counter() - started) / rounds * 1e6


def probabilities(answer: requests.Response, kind: str) -> np.ndarray:
    """The probabilities of a native or v2 (JSON or binary) answer."""
    if kind == "native":
        return np.asarray(answer.json()["prediction"], dtype=np.float32)
    length = answer.headers.get(HEADER)
    if length is None:
        return np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32)
    size = orjson.loads(answer.content[:int(length)])["outputs"][0]["parameters"]["binary_data_size"]
    return np.frombuffer(answer.content[int(length):int(length) + size], dtype="<f4")


@dataclass
class ModelRun:
    """Everything measured for one model: its bodies, wrk results and in-process costs."""

    meta: ModelMetadata
    cases: Cases
    results: dict[str, WrkResult]
    costs: Costs

    def ratio(self, samples: int = 64) -> float:
        """v2 binary over native JSON, samples/s (the same as req/s: equal samples per request)."""
        binary, native = self.results[f"v2 binary|{samples}"], self.results[f"native JSON|{samples}"]
        return binary.requests_per_s / native.requests_per_s

    def met(self) -> bool:
        """Whether the 64-sample target holds with no errors anywhere."""
        return self.ratio() >= TARGET and not any(r.errors for r in self.results.values())

    def limit_fraction(self, workers: int, samples: int = 64) -> float:
        """v2 binary samples/s over what ``workers`` processes calling the bare model back to back could do."""
        model_us = self.costs[f"v2 binary|{samples}"][1]
        return self.results[f"v2 binary|{samples}"].requests_per_s * samples / (workers * samples / model_us * 1e6)

    def in_process_bound(self, samples: int = 64) -> float:
        """The ratio in-process costs alone allow (decode + model + encode, native JSON over v2 binary)."""
        return sum(self.costs[f"native JSON|{samples}"]) / sum(self.costs[f"v2 binary|{samples}"])


def bench_model(model: str, args: argparse.Namespace, out_dir: Path) -> ModelRun:
    """Start a server for ``model``, check every body, drive each with wrk, then measure in-process costs."""
    meta = ModelRepository(args.repo).resolve(model)
    x_samples = held_out_samples(meta)
    cases = bodies(x_samples, meta.input_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"SERVING_MODEL_REPOSITORY": str(args.repo), "SERVING_MODEL": model, "SERVING_BACKEND": args.backend,
           "SERVING_MODE": "process", "SERVING_WORKERS": str(args.workers), "TF_CPP_MIN_LOG_LEVEL": "2"}
    paths = {"native": "/predict", "v2": f"/v2/models/{model}/infer"}
    results: dict[str, WrkResult] = {}
    print(f"== {model} ({'x'.join(map(str, meta.input_shape))} inputs) on {args.backend}", flush=True)
    with GunicornServer(None, out_dir, ["--no-control-socket"], cwd=ROOT, env=env,
                        log_file=out_dir / "server.log") as srv:
        reference: dict[int, np.ndarray] = {}
        for label, (kind, body, headers) in cases.items():  # every body is correct before it is timed
            answer = requests.post(srv.url + paths[kind], data=body, headers=headers, timeout=10)
            assert answer.status_code == 200, (model, label, answer.text[:300])
            got = probabilities(answer, kind).reshape(-1)
            samples = int(label.split("|")[1])
            assert np.array_equal(reference.setdefault(samples, got), got), f"{model} {label}: answers differ"
        for label, (kind, body, headers) in cases.items():
            slug = label.replace(" ", "-").replace("|", "-").lower()
            if "binary" in label:
                body_path = out_dir / f"{slug}.bin"
                body_path.write_bytes(body)
                script = binary_script(out_dir / f"{slug}.lua", body_path, headers)
            else:
                script = wrk_script(out_dir / f"{slug}.lua", body)
            print(f"{label.replace('|', ', ')} samples ...", flush=True)
            result = run_wrk(srv.url + paths[kind], script, args.connections, args.seconds)
            (out_dir / f"{slug}.txt").write_text(result.raw)
            results[label] = result
            samples = int(label.split("|")[1])
            print(f"  {result.requests_per_s * samples:,.0f} samples/s ({result.requests_per_s:,.0f} req/s),"
                  f" p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, errors {result.errors}", flush=True)
        if args.grpc:  # the same samples over gRPC (raw_input_contents), driven by h2load, one call per connection
            target = f"http://{srv.grpc_target}/inference.GRPCInferenceService/ModelInfer"
            for samples in (1, 64):
                label = f"gRPC raw|{samples}"
                body_path = out_dir / f"grpc-raw-{samples}.bin"
                body_path.write_bytes(grpc_body(x_samples[:samples], model, meta.input_name))
                cases[label] = ("grpc", body_path.read_bytes(), {})
                with grpc.insecure_channel(srv.grpc_target) as channel:  # right before it is timed, as above
                    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                    answer = ModelInferResponse.FromString(call(cases[label][1][5:], timeout=10))
                got = np.frombuffer(answer.raw_output_contents[0], dtype="<f4")
                assert np.array_equal(reference[samples], got), f"{model} {label}: answers differ"
                print(f"gRPC raw, {samples} samples ...", flush=True)
                rate, p50, p99, failed = run_h2load(target, body_path, {"content-type": "application/grpc",
                                                                         "te": "trailers"}, args.connections,
                                                    args.seconds, out_dir / f"grpc-raw-{samples}.txt")
                results[label] = WrkResult(rate, p50, p99, int(rate * args.seconds), failed, "")
                print(f"  {rate * samples:,.0f} samples/s ({rate:,.0f} req/s), p50 {p50:.2f} ms, p99 {p99:.2f} ms,"
                      f" failed {failed}", flush=True)
    print("protocol costs in-process ...", flush=True)
    http_cases = {label: case for label, case in cases.items() if case[0] != "grpc"}
    return ModelRun(meta, cases, results, protocol_costs(http_cases, meta, args.backend))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="wrk duration per scenario")
    parser.add_argument("--connections", type=int, default=16, help="concurrent wrk connections")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated models, each on its own server (default {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--model", default=None, help="benchmark this one model (the same as --models NAME)")
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository")
    parser.add_argument("--grpc", action=argparse.BooleanOptionalAction, default=True,
                        help="also gRPC rows (raw_input_contents, driven by h2load: apt-get install nghttp2-client)")
    args = parser.parse_args()
    if args.model and args.models:
        parser.error("give --model or --models, not both")
    models = [args.model] if args.model else (args.models.split(",") if args.models else list(DEFAULT_MODELS))
    if mnist_shaped.NAME in models:
        mnist_shaped.ensure_model(args.repo)
    missing = [model for model in models if not (args.repo / model).is_dir()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not in {args.repo}: train it first (python train.py --dataset mnist"
                         " for mnist-torch)")

    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = ROOT / "reports" / f"v2-{stamp}"
    runs = {model: bench_model(model, args, out_dir / model) for model in models}
    report = render(runs, args, stamp)
    path = ROOT / "reports" / f"v2-{stamp}.md"
    save_report(path, report)


def _shape(meta: ModelMetadata) -> str:
    return "x".join(map(str, meta.input_shape))


def _verdict(run: ModelRun, workers: int) -> str:
    errors = sum(r.errors for r in run.results.values())
    fraction = run.limit_fraction(workers)
    return (f"**{run.meta.name} ({_shape(run.meta)}): v2 binary reaches {run.ratio():.2f}x the samples/s of native"
            f" JSON at 64 samples per request (target {TARGET:g}x {'met' if run.met() else 'NOT met'}), and"
            f" {fraction:.2f} of the bare model calls' limit (target {LIMIT_TARGET:g}"
            f" {'met' if fraction >= LIMIT_TARGET else 'NOT met'})**" + (f" ({errors} errors)" if errors else "") + ".")


def render(runs: dict[str, ModelRun], args: argparse.Namespace, stamp: str) -> str:
    """The markdown report: setup, a verdict per model, then per model its wrk table and in-process costs."""
    lines = [
        f"# v2 protocol benchmark, {stamp} UTC", "",
        f"wrk -t2 -c{args.connections} -d{args.seconds}s on 127.0.0.1 against one gunicorn server per model (-w"
        f" {args.workers}, process mode, {args.backend} backend, access log, metrics and validation on), on the same"
        " 2-core machine as the load generator. Native JSON: `POST /predict` `{\"data\": ...}`; v2 JSON: `POST"
        " /v2/models/<model>/infer` with `data`; v2 binary: the same with the binary tensor extension both"
        " ways (`binary_data_size`, `binary_data_output`), no Content-Type. Request tensors have the model's"
        " input shape from its metadata. Every body was checked first: 200, and the same probabilities from all"
        " three.", "",
        "| model | input | values / sample | held-out accuracy | trained on |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for model, run in runs.items():
        source = ("scikit-learn digits upscaled to 28x28, written as MNIST IDX files (`bench/mnist_shaped.py`)"
                  if model == mnist_shaped.NAME else f"`{run.meta.raw.get('dataset', '?')}`"
                  + (" (the requests: t10k digits)" if run.meta.raw.get("dataset") == "mnist" else ""))
        lines.append(f"| {model} v{run.meta.version} | {_shape(run.meta)} | {run.meta.sample_size:,} |"
                     f" {run.meta.raw.get('test_accuracy', float('nan')):.3f} | {source} |")
    if mnist_shaped.NAME in runs:
        lines += ["", f"`{mnist_shaped.NAME}` is MNIST-shaped, not MNIST: it predates real MNIST here, so"
                  " `bench/mnist_shaped.py` upscales scikit-learn's bundled 8x8 digits (bilinear, to a 20x20 box"
                  " centred in 28x28 as MNIST frames its digits, uint8 0..255), writes them as the four MNIST IDX"
                  " files and trains the `small` CNN on them with `train.py --dataset mnist --arch small --data-dir DIR"
                  " --framework pytorch`. Inputs, body sizes and model cost are those of a 28x28 model; its"
                  " accuracy says nothing about MNIST."]
    lines += ["", "## Verdicts", ""] + [f"- {_verdict(run, args.workers)}" for run in runs.values()]
    lines += ["", "The bare model calls' limit is what the backend's own `predict` on the same 64 samples does in one"
              f" process with one math thread (the model column below), times the {args.workers} workers that share"
              " the cores: served samples/s as a fraction of it is what HTTP, decoding, validation, logging and"
              " metrics leave of the model's own speed."]
    lines += ["", "In-process costs below are measured in the benchmark process without HTTP (one thread,"
              " microseconds per request): decoding and validating the body into the model's float32 batch, one"
              " model call, encoding the answer. HTTP, WSGI, routing, logging and metrics come on top of these;"
              " they cost about the same for every protocol, apart from reading a larger body."]
    for model, run in runs.items():
        lines += ["", f"## {model} ({_shape(run.meta)}, {run.meta.sample_size:,} values per sample)", "",
                  "| protocol | samples / request | body bytes | req/s | samples/s | p50 ms | p99 ms | errors |"
                  " vs native JSON |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label, result in run.results.items():
            protocol, samples = label.split("|")
            native = run.results[f"native JSON|{samples}"]
            lines.append(
                f"| {protocol} | {samples} | {len(run.cases[label][1]):,} | {result.requests_per_s:,.0f} |"
                f" {result.requests_per_s * int(samples):,.0f} | {result.p50_ms:.2f} | {result.p99_ms:.2f} |"
                f" {result.errors} | {result.requests_per_s / native.requests_per_s:.2f}x |"
            )
        lines += ["", _verdict(run, args.workers), "", f"### Where a {model} request's time goes (in-process)", "",
                  "| protocol | samples / request | decode + validate us | model us | encode us |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for label, (decode, model_us, encode) in run.costs.items():
            protocol, samples = label.split("|")
            lines.append(f"| {protocol} | {samples} | {decode:,.1f} | {model_us:,.1f} | {encode:,.1f} |")
        lines += ["", f"With no HTTP cost at all, these in-process costs would cap v2 binary at"
                  f" {run.in_process_bound():.2f}x native JSON for 64-sample requests."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
