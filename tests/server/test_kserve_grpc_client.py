"""KServe's own gRPC client (``kserve.InferenceGRPCClient``) against a real server.

The KServe SDK pins what this project does not (psutil below 6, its own FastAPI and Kubernetes clients), so it
lives in a virtualenv of its own, made once from PyPI and kept under ~/.cache/serving (KSERVE_VENV overrides);
the client runs there as a script and prints what it got as JSON, which the test compares with the REST answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from serving.toolchain.data import load_digits_dataset
from tests.conftest import GunicornServer

pytestmark = pytest.mark.slow
KSERVE = "kserve==0.21.0"
INFERENCE_KEY = "kserve-client-key-0123456789"

CLIENT = r"""
import asyncio, json, sys
import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

target, key, data = sys.argv[1], sys.argv[2], np.asarray(json.loads(sys.argv[3]), dtype=np.float32)
headers = [("authorization", f"Bearer {key}")]


async def main():
    out = {}
    async with InferenceGRPCClient(target, timeout=10, retries=0) as client:
        out["live"] = await client.is_server_live()
        out["ready"] = await client.is_server_ready()
        out["model_ready"] = await client.is_model_ready("digits-tf", headers=headers)
        for name, array, datatype, raw in (("fp32-raw", data, "FP32", True), ("fp32-typed", data, "FP32", False),
                                           ("uint8-raw", np.rint(data * 255).astype(np.uint8), "UINT8", True)):
            tensor = InferInput(name="input", shape=list(array.shape), datatype=datatype)
            tensor.set_data_from_numpy(array, binary_data=raw)
            answer = await client.infer(InferRequest(model_name="digits-tf", infer_inputs=[tensor],
                                                     request_id=name), headers=headers)
            outputs = {output.name: output.as_numpy() for output in answer.outputs}
            out[name] = {"id": answer.id, "model": answer.model_name, "version": answer.model_version,
                         "probabilities": outputs["probabilities"].tolist(),
                         "label": [v.decode() if isinstance(v, bytes) else str(v) for v in outputs["label"].tolist()]}
        for name, request, metadata in (
            ("unknown-model", InferRequest(model_name="nope", infer_inputs=[tensor]), headers),
            ("no-key", InferRequest(model_name="digits-tf", infer_inputs=[tensor]), None),
        ):
            try:
                await client.infer(request, headers=metadata)
                out[name] = "OK"
            except grpc.aio.AioRpcError as error:
                out[name] = [error.code().name, error.details()]
    print(json.dumps(out))


asyncio.run(main())
"""


def kserve_python() -> Path:
    """The KServe SDK's own virtualenv, created the first time (about half a minute with pip's cache)."""
    venv = Path(os.environ.get("KSERVE_VENV") or Path.home() / ".cache" / "serving" / "kserve-0.21.0")
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import kserve; assert kserve.__version__ == '0.21.0'"]
    if python.exists() and subprocess.run(check, capture_output=True, timeout=120, check=False).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", KSERVE], capture_output=True,
                             text=True, timeout=900, check=False)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return python


def rest(server: GunicornServer, data: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "input", "shape": list(data.shape), "datatype": "FP32", "data": data.ravel().tolist()}]}
    answer = requests.post(server.url + "/v2/models/digits-tf/infer", json=body, timeout=10,
                           headers={"Authorization": f"Bearer {INFERENCE_KEY}"})
    answer.raise_for_status()
    return np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(data), -1)


def test_kserve_grpc_client(server_factory: Any) -> None:
    python = kserve_python()
    server = server_factory(backend="onnx", api_keys=INFERENCE_KEY).start()
    data = load_digits_dataset(seed=0).x_test[:3].astype(np.float32)
    result = subprocess.run([str(python), "-c", CLIENT, server.grpc_target, INFERENCE_KEY, json.dumps(data.tolist())],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert (got["live"], got["ready"], got["model_ready"]) == (True, True, True)
    expected = rest(server, data)
    for name in ("fp32-raw", "fp32-typed", "uint8-raw"):
        answer = got[name]
        assert (answer["id"], answer["model"], answer["version"]) == (name, "digits-tf", "1")
        reference = expected if name != "uint8-raw" else rest(server, np.rint(data * 255) / 255)
        np.testing.assert_allclose(np.asarray(answer["probabilities"]).reshape(3, -1), reference, rtol=1e-6,
                                   atol=1e-7)
        assert answer["label"] == [str(i) for i in reference.argmax(axis=1)]
    assert got["unknown-model"][0] == "NOT_FOUND" and "no model 'nope'" in got["unknown-model"][1]
    assert got["no-key"][0] == "UNAUTHENTICATED"
