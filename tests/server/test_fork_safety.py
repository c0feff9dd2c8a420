"""Fork safety with the master's shared framework (issue 24): no hang and no failed request while workers are
SIGKILLed and the master reloads, per backend and through the model pool. The short run of
``python -m bench.fork_soak`` (which runs 100,000 requests per backend, a kill every 10,000)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bench.fork_soak import drive

pytestmark = pytest.mark.slow
BODY = orjson.dumps({"data": [[0.0] * 8 for _ in range(8)]})
CASES = {
    # in the workers (TensorFlow's default in process mode is the pool: the "pool" case; in threaded
    # mode it runs in the workers, whose request threads share it)
    "tensorflow": ({"model": "digits-tf", "backend": "tensorflow", "model_pool": 0}, ("worker",)),
    "tensorflow-threaded": ({"model": "digits-tf", "backend": "tensorflow", "mode": "threaded"}, ("worker",)),
    "pytorch": ({"model": "digits-torch", "backend": "pytorch"}, ("worker",)),
    "onnx": ({"model": "digits-tf", "backend": "onnx"}, ("worker",)),
    "pool": ({"model": "digits-tf", "backend": "tensorflow", "model_pool": 1}, ("worker", "pool")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_request_fails_or_hangs_across_kills_and_a_reload(server_factory: Any, case: str) -> None:
    settings, roles = CASES[case]
    with server_factory(workers=2, **settings) as server:
        result = drive(server.url + "/predict", BODY, server.pid, total=2400, kill_every=800, hup_at=1200,
                       kill_roles=roles)
        log = server.log()
    assert result.failed == [], result.failed[:5]
    assert result.ok == result.requests == 2400
    assert result.kills == 2 and result.reloads == 1
    assert result.slowest_s < 10, result
    assert "Handling signal: hup" in log.lower() or "hang up" in log.lower(), log[-2000:]
    assert "shared by every worker" in log
