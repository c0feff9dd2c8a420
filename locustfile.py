"""Load scenarios for the model server.

    locust -f locustfile.py --host http://127.0.0.1:8000                       # web UI on :8089
    locust -f locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 60s --tags native
    STEP_RAMP=1 locust -f locustfile.py --host http://127.0.0.1:8000 --headless  # find the saturation point

Payloads come from scikit-learn's bundled digits, resized to the served model's input shape. At
start the test asks the server once for the label of every test sample and keeps the samples it
classifies correctly, so during the run a wrong label is a failure, not only a non-2xx answer.
Tags: ``native`` (``json``, ``image``), ``v2`` (``v2-json``, ``v2-binary``). With ``--headless`` the
exit code is 1 when the failure ratio or the p95 passes ``--max-fail-ratio`` / ``--max-p95-ms``.
"""

from __future__ import annotations

import io
import logging
import os
import random
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import requests
from locust import FastHttpUser, LoadTestShape, events, tag, task
from locust.env import Environment

JSON = {"Content-Type": "application/json"}
#: ``Authorization: Bearer KEY`` when the server needs a key (``--api-key``, or the API_KEY variable).
AUTH: dict[str, str] = {}
log = logging.getLogger("locustfile")


@dataclass
class Samples:
    """Samples the served model answers correctly, as ready-made bodies."""

    model: str = ""
    labels: list[str] = field(default_factory=list)
    json_bodies: list[bytes] = field(default_factory=list)
    png_bodies: list[bytes] = field(default_factory=list)
    v2_json_bodies: list[bytes] = field(default_factory=list)
    v2_binary_bodies: list[tuple[bytes, int]] = field(default_factory=list)

    def pick(self) -> int:
        return random.randrange(len(self.labels))


SAMPLES = Samples()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--max-fail-ratio", type=float, default=0.01, help="exit 1 above this failure ratio")
    parser.add_argument("--max-p95-ms", type=float, default=1000.0, help="exit 1 above this p95 (ms)")
    parser.add_argument("--samples", type=int, default=200, help="test samples to calibrate and send")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY", ""),
                        help="send Authorization: Bearer KEY (a server with SERVING_API_KEYS)")
    parser.add_argument("--step-users", type=int, default=8, help="STEP_RAMP: users added per step")
    parser.add_argument("--step-seconds", type=int, default=10, help="STEP_RAMP: seconds per step")
    parser.add_argument("--ramp-max-users", type=int, default=128, help="STEP_RAMP: stop at this many users")
    parser.add_argument("--ramp-max-p99-ms", type=float, default=500.0, help="STEP_RAMP: stop when p99 passes")
    parser.add_argument("--ramp-max-fail-ratio", type=float, default=0.01, help="STEP_RAMP: stop above this")


@events.init.add_listener
def _drop_users_without_tasks(environment: Environment, **_: Any) -> None:
    """With --tags, a user class whose tasks were all filtered out would crash: leave it out."""
    environment._filter_tasks_by_tags()  # idempotent; locust would do it at start, too late for this
    kept = [user for user in environment.user_classes if user.tasks]
    environment.user_classes[:] = kept


@events.test_start.add_listener
def _calibrate(environment: Environment, **_: Any) -> None:
    """Build the payloads and keep the samples the server labels correctly (once per process)."""
    if SAMPLES.labels or environment.host is None:
        return
    from PIL import Image

    from serving.toolchain.data import load_digits_dataset

    key = environment.parsed_options.api_key if environment.parsed_options else ""
    if key:
        AUTH["Authorization"] = JSON["Authorization"] = f"Bearer {key}"
    host = environment.host.rstrip("/")
    meta = requests.get(f"{host}/metadata", headers=AUTH, timeout=30).json()
    height, width = meta["input"]["shape"]
    digits = load_digits_dataset(seed=0)
    count = environment.parsed_options.samples if environment.parsed_options else 200
    images = [np.asarray(Image.fromarray((x * 255).astype(np.uint8)).resize((width, height)), dtype=np.float32) / 255
              for x in digits.x_test[:count]]
    truth = [str(y) for y in digits.y_test[:count]]
    answers: list[str] = []
    step = int(meta["input"].get("max_batch", 64))
    for start in range(0, len(images), step):
        batch = [image.tolist() for image in images[start:start + step]]
        reply = requests.post(f"{host}/predict/label", data=orjson.dumps({"data": batch}), headers=JSON, timeout=30)
        reply.raise_for_status()
        answers += reply.json()["prediction"]
    SAMPLES.model = meta["name"]
    for image, expected, answer in zip(images, truth, answers, strict=True):
        if answer != expected:
            continue
        SAMPLES.labels.append(expected)
        SAMPLES.json_bodies.append(orjson.dumps({"data": image.tolist()}))
        png = io.BytesIO()
        Image.fromarray((image * 255).astype(np.uint8)).save(png, format="PNG")
        SAMPLES.png_bodies.append(png.getvalue())
        shape = [1, height, width]
        SAMPLES.v2_json_bodies.append(orjson.dumps({"inputs": [
            {"name": "input", "shape": shape, "datatype": "FP32", "data": image.reshape(-1).tolist()}]}))
        raw = image.astype("<f4").tobytes()
        header = orjson.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                           "parameters": {"binary_data_size": len(raw)}}],
                               "outputs": [{"name": "label"}]})
        SAMPLES.v2_binary_bodies.append((header + raw, len(header)))
    if len(SAMPLES.labels) < 10:
        raise RuntimeError(f"the server labels only {len(SAMPLES.labels)} of {count} test samples correctly")
    log.info("calibrated: %d of %d samples answered correctly by %s", len(SAMPLES.labels), count, SAMPLES.model)


class NativeUser(FastHttpUser):
    """The native REST API: JSON probabilities, JSON labels and PNG uploads, checked for correctness."""

    @tag("native", "json")
    @task(6)
    def predict_label(self) -> None:
        i = SAMPLES.pick()
        with self.client.post("/predict/label", data=SAMPLES.json_bodies[i], headers=JSON, name="/predict/label",
                              catch_response=True) as response:
            _check_label(response, SAMPLES.labels[i], lambda body: body["prediction"][0])

    @tag("native", "json")
    @task(3)
    def predict_probabilities(self) -> None:
        i = SAMPLES.pick()
        with self.client.post("/predict", data=SAMPLES.json_bodies[i], headers=JSON, name="/predict",
                              catch_response=True) as response:
            _check_label(response, SAMPLES.labels[i], lambda body: str(int(np.argmax(body["prediction"][0]))))

    @tag("native", "image")
    @task(1)
    def predict_image(self) -> None:
        i = SAMPLES.pick()
        png = {**AUTH, "Content-Type": "image/png"}
        with self.client.post("/predict/label", data=SAMPLES.png_bodies[i], headers=png,
                              name="/predict/label [png]", catch_response=True) as response:
            _check_label(response, SAMPLES.labels[i], lambda body: body["prediction"][0])


class V2User(FastHttpUser):
    """The Open Inference Protocol (KServe v2): JSON tensors and the binary tensor extension."""

    @tag("v2", "v2-json")
    @task(1)
    def infer_json(self) -> None:
        i = SAMPLES.pick()
        with self.client.post(f"/v2/models/{SAMPLES.model}/infer", data=SAMPLES.v2_json_bodies[i], headers=JSON,
                              name="/v2/models/[model]/infer [json]", catch_response=True) as response:
            _check_label(response, SAMPLES.labels[i], _v2_json_label)

    @tag("v2", "v2-binary")
    @task(1)
    def infer_binary(self) -> None:
        i = SAMPLES.pick()
        body, header_length = SAMPLES.v2_binary_bodies[i]
        with self.client.post(f"/v2/models/{SAMPLES.model}/infer", data=body,
                              headers={**AUTH, "Inference-Header-Content-Length": str(header_length),
                                       "Content-Type": "application/octet-stream"},
                              name="/v2/models/[model]/infer [binary]", catch_response=True) as response:
            _check_label(response, SAMPLES.labels[i], _v2_json_label)


def _v2_json_label(body: dict[str, Any]) -> str:
    outputs = {output["name"]: output for output in body["outputs"]}
    if "label" in outputs:
        return str(outputs["label"]["data"][0])
    return str(int(np.argmax(outputs["probabilities"]["data"][:10])))


def _check_label(response: Any, expected: str, extract: Any) -> None:
    """Fail the request on a non-200, an unreadable body or a wrong label."""
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code}")
        return
    try:
        got = extract(orjson.loads(response.content))
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, struct.error) as exc:
        response.failure(f"unreadable answer: {exc.__class__.__name__}")
        return
    if got != expected:
        response.failure(f"wrong label: {got} instead of {expected}")
    else:
        response.success()


class StepRamp(LoadTestShape):
    """Users grow by --step-users every --step-seconds until p99 or the failure ratio passes its bound.

    Active only with ``STEP_RAMP=1`` in the environment (otherwise -u/-r/-t drive the run as usual).
    """

    abstract = os.environ.get("STEP_RAMP", "") not in ("1", "true", "yes")
    use_common_options = False

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        step = int(self.get_run_time() // options.step_seconds)
        users = (step + 1) * options.step_users
        total = self.runner.stats.total
        if step > 0 and total.num_requests:
            recent_p99 = total.get_current_response_time_percentile(0.99) or 0
            if total.fail_ratio > options.ramp_max_fail_ratio or recent_p99 > options.ramp_max_p99_ms:
                log.info("step ramp stops at %d users (p99 %.0f ms, failures %.2f%%)", users - options.step_users,
                         recent_p99, total.fail_ratio * 100)
                return None
        if users > options.ramp_max_users:
            return None
        return users, float(options.step_users)


@events.quitting.add_listener
def _exit_code(environment: Environment, **_: Any) -> None:
    """Headless runs fail (exit 1) when the failure ratio or the p95 passes its bound."""
    stats = environment.stats.total
    options = environment.parsed_options
    if options is None or stats.num_requests == 0:
        return
    p95 = stats.get_response_time_percentile(0.95)
    if stats.fail_ratio > options.max_fail_ratio:
        log.error("failure ratio %.2f%% is over %.2f%%", stats.fail_ratio * 100, options.max_fail_ratio * 100)
        environment.process_exit_code = 1
    elif p95 > options.max_p95_ms:
        log.error("p95 %.0f ms is over %.0f ms", p95, options.max_p95_ms)
        environment.process_exit_code = 1
    else:
        environment.process_exit_code = 0
