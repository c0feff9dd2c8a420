"""Closed-loop load for the replica rehearsal (bench/replicas.py): POST /predict/label, every request recorded.

    REHEARSAL_BODY=sample.json REHEARSAL_LABEL=7 REHEARSAL_RECORDS=out.csv \
        locust -f bench/replicas_locust.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:8090

A request succeeds when it answers 200 with the expected label. At exit each request becomes one CSV row:
start (epoch seconds), latency (ms), ok (1/0), error.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any

import orjson
from locust import FastHttpUser, constant, events, task

BODY = open(os.environ["REHEARSAL_BODY"], "rb").read()  # noqa: SIM115 - read once at import
LABEL = os.environ["REHEARSAL_LABEL"]
RECORDS: list[tuple[float, float, int, str]] = []


class Client(FastHttpUser):
    """One client sending requests back to back (a closed loop: the load is bounded by the user count)."""

    wait_time = constant(0)

    @task
    def predict(self) -> None:
        with self.client.post("/predict/label", data=BODY, headers={"Content-Type": "application/json"},
                              name="predict", catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"status {answer.status_code}")
                return
            try:
                label = orjson.loads(answer.content)["prediction"][0]
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                answer.failure("not a prediction")
                return
            if label != LABEL:
                answer.failure(f"label {label!r}")


@events.request.add_listener
def _record(response_time: float, exception: Any = None, start_time: float | None = None, **_: Any) -> None:
    start = start_time if start_time is not None else time.time() - response_time / 1000
    RECORDS.append((start, response_time, int(exception is None), "" if exception is None else str(exception)[:80]))


@events.quitting.add_listener
def _write(**_: Any) -> None:
    with open(os.environ["REHEARSAL_RECORDS"], "w", newline="") as out:
        csv.writer(out).writerows(RECORDS)
