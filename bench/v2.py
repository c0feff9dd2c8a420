"""Native JSON vs v2 JSON vs v2 binary tensors, with 1 and 64 samples per request, in samples/s.

    python bench/v2.py [--seconds 8] [--connections 16] [--workers 2] [--model digits-torch] [--backend onnx]

Starts one gunicorn server (as shipped: process mode, access log, metrics and validation on), checks
that every request body gets a 200 with the same probabilities on each protocol, then drives each
body with wrk on 127.0.0.1 for ``--seconds`` (binary bodies are read from a file by the Lua script,
since a Lua long string would rewrite the line breaks inside them). Writes ``reports/v2-<stamp>.md``
and the raw wrk output under ``reports/v2-<stamp>/``. Target: with 64 samples per request, v2 binary
serves >= 3x the samples/s of native JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import ROOT, Server, WrkResult, run_wrk, wrk_script  # noqa: E402
from serving.backends import backend_class  # noqa: E402
from serving.data import load_digits_dataset  # noqa: E402
from serving.http import json_bytes  # noqa: E402
from serving.inputs import batch_from_data  # noqa: E402
from serving.protocol.v2.codec import InferenceRequest, decode_request, encode_response  # noqa: E402
from serving.protocol.v2.tensors import batch_from_request, output_tensors  # noqa: E402
from serving.repository import ModelMetadata, ModelRepository  # noqa: E402

HEADER = "Inference-Header-Content-Length"
TARGET = 3.0


def bodies(x: np.ndarray) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """(protocol, samples) -> (path kind, body, headers) for each scenario."""
    cases: dict[str, tuple[str, bytes, dict[str, str]]] = {}
    for n in (1, 64):
        batch = np.ascontiguousarray(x[:n], dtype=np.float32)
        cases[f"native JSON|{n}"] = ("native", orjson.dumps({"data": batch.reshape(n, -1).tolist()}),
                                     {"Content-Type": "application/json"})
        tensor = {"name": "input", "shape": [n, 8, 8], "datatype": "FP32"}
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


def protocol_costs(cases: dict[str, tuple[str, bytes, dict[str, str]]], repo: Path, model: str, backend: str,
                   rounds: int = 1000) -> dict[str, tuple[float, float, float]]:
    """Per request, in this process (no HTTP): decode + validate, one model call, encode; microseconds."""
    meta = ModelRepository(repo).resolve(model)
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


def _micros(call: Callable[[], object], rounds: int) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="wrk duration per scenario")
    parser.add_argument("--connections", type=int, default=16, help="concurrent wrk connections")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--model", default="digits-torch")
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository")
    args = parser.parse_args()

    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out_dir = ROOT / "reports" / f"v2-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = bodies(load_digits_dataset(seed=0).x_test)
    env = {"SERVING_MODEL_REPOSITORY": str(args.repo), "SERVING_MODEL": args.model, "SERVING_BACKEND": args.backend,
           "SERVING_MODE": "process", "SERVING_WORKERS": str(args.workers), "TF_CPP_MIN_LOG_LEVEL": "2"}
    paths = {"native": "/predict", "v2": f"/v2/models/{args.model}/infer"}
    results: dict[str, WrkResult] = {}
    with Server("flask_server:app", "gunicorn.conf.py", env, ["--no-control-socket"], out_dir / "server.log") as srv:
        reference: dict[int, np.ndarray] = {}
        for label, (kind, body, headers) in cases.items():  # every body is correct before it is timed
            answer = requests.post(srv.url + paths[kind], data=body, headers=headers, timeout=10)
            assert answer.status_code == 200, (label, answer.text[:300])
            got = probabilities(answer, kind).reshape(-1)
            samples = int(label.split("|")[1])
            assert np.array_equal(reference.setdefault(samples, got), got), f"{label}: answers differ"
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
    print("protocol costs in-process ...", flush=True)
    costs = protocol_costs(cases, args.repo, args.model, args.backend)
    report = render(results, costs, cases, args, stamp)
    path = ROOT / "reports" / f"v2-{stamp}.md"
    path.write_text(report)
    print(report)
    print(f"report: {path}")


def render(results: dict[str, WrkResult], costs: dict[str, tuple[float, float, float]],
           cases: dict[str, tuple[str, bytes, dict[str, str]]], args: argparse.Namespace, stamp: str) -> str:
    lines = [
        f"# v2 protocol benchmark, {stamp} UTC", "",
        f"wrk -t2 -c{args.connections} -d{args.seconds}s on 127.0.0.1 against one gunicorn server (-w {args.workers},"
        f" process mode, {args.model} on {args.backend}, access log, metrics and validation on), on the same"
        " 2-core machine as the load generator. Native JSON: `POST /predict` `{\"data\": ...}`; v2 JSON: `POST"
        f" /v2/models/{args.model}/infer` with `data`; v2 binary: the same with the binary tensor extension both"
        " ways (`binary_data_size`, `binary_data_output`), no Content-Type. Every body was checked first: 200,"
        " and the same probabilities from all three.", "",
        "| protocol | samples / request | body bytes | req/s | samples/s | p50 ms | p99 ms | errors |"
        " vs native JSON |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, result in results.items():
        protocol, samples = label.split("|")
        native = results[f"native JSON|{samples}"]
        lines.append(
            f"| {protocol} | {samples} | {len(cases[label][1]):,} | {result.requests_per_s:,.0f} |"
            f" {result.requests_per_s * int(samples):,.0f} | {result.p50_ms:.2f} | {result.p99_ms:.2f} |"
            f" {result.errors} | {result.requests_per_s / native.requests_per_s:.2f}x |"
        )
    ratio = results["v2 binary|64"].requests_per_s / results["native JSON|64"].requests_per_s
    met = "yes" if ratio >= TARGET and not any(r.errors for r in results.values()) else "NO"
    lines += ["", f"Target: 64-sample requests, v2 binary >= {TARGET:g}x the samples/s of native JSON:"
              f" {ratio:.2f}x, met: {met}.", "",
              "## Where a request's time goes", "",
              "Measured in the benchmark process without HTTP (one thread, microseconds per request): decoding and"
              " validating the body into the model's float32 batch, one model call, encoding the answer. HTTP,"
              " WSGI, routing, logging and metrics come on top of these and cost the same for every protocol.", "",
              "| protocol | samples / request | decode + validate us | model us | encode us |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for label, (decode, model, encode) in costs.items():
        protocol, samples = label.split("|")
        lines.append(f"| {protocol} | {samples} | {decode:,.1f} | {model:,.1f} | {encode:,.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
