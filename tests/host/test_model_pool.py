"""The model pool's server and client over real Unix sockets and shared memory, in this process."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.errors import DeadlineExceeded, InvalidInput, PoolUnavailable, QueueFull
from serving.host.model_pool import PoolServer
from serving.runtime.model_pool import PoolClient
from serving.runtime.pool_wire import mapping_size


class Scaled:
    """A backend stand-in: row sums scaled into 3 columns, after ``delay`` seconds; records batch sizes."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.batches = delay, []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        time.sleep(self.delay)
        sums = batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)
        return np.hstack([sums, sums * 2, sums * 3]).astype(np.float32)


@pytest.fixture
def pool(tmp_path: Path) -> Any:
    servers: list[PoolServer] = []
    clients: list[PoolClient] = []

    def make(backend: Any, max_batch_size: int = 32, max_queue: int = 64, name: str = "1.sock",
             timeout_s: float = 5.0) -> tuple[PoolServer, PoolClient]:
        server = PoolServer({"m:1": backend}, tmp_path / name, max_batch_size, max_queue)
        server.start()
        servers.append(server)
        clients.append(PoolClient(tmp_path, mapping_size(64, 28 * 28), timeout_s))
        return server, clients[-1]

    yield make
    for client in clients:
        client.close()
    for server in servers:
        server.stop()


def test_a_batch_goes_through_shared_memory_and_comes_back_right(pool: Any) -> None:
    _, client = pool(Scaled())
    batch = np.arange(2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28) / 1000
    out = client.call("m:1", batch)
    sums = batch.reshape(2, -1).sum(axis=1)
    np.testing.assert_allclose(out, np.stack([sums, sums * 2, sums * 3], axis=1), rtol=1e-6)


def test_requests_from_many_threads_are_batched_together(pool: Any) -> None:
    backend = Scaled(delay=0.02)
    _, client = pool(backend)
    samples = [np.full((1, 8, 8), i, dtype=np.float32) for i in range(16)]
    with ThreadPoolExecutor(16) as executor:
        outputs = list(executor.map(lambda s: client.call("m:1", s), samples))
    for i, out in enumerate(outputs):  # each caller got its own rows back
        assert out[0, 0] == pytest.approx(64 * i)
    assert sum(backend.batches) == 16 and max(backend.batches) > 1, backend.batches


def test_batches_stay_within_max_batch_size_and_never_split_a_request(pool: Any) -> None:
    backend = Scaled(delay=0.02)
    _, client = pool(backend, max_batch_size=4)
    with ThreadPoolExecutor(8) as executor:
        list(executor.map(lambda _: client.call("m:1", np.ones((3, 8, 8), np.float32)), range(8)))
    assert all(size <= 4 or size == 3 for size in backend.batches) and max(backend.batches) == 3


def test_a_full_queue_is_refused_at_once(pool: Any) -> None:
    _, client = pool(Scaled(delay=0.3), max_queue=1)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.call("m:1", np.ones((1, 8, 8), np.float32))
        except QueueFull as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors, "a queue bound of 1 with 4 callers refused nobody"
    assert time.monotonic() - started < 1.5  # the refused ones did not wait for the model


def test_the_deadline_bounds_the_wait_and_the_connection_is_replaced(pool: Any) -> None:
    _, client = pool(Scaled(delay=0.5), timeout_s=0.1)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.call("m:1", np.ones((1, 8, 8), np.float32))
    assert time.monotonic() - started < 0.4
    time.sleep(0.6)
    client.timeout_s = 5.0
    assert client.call("m:1", np.ones((1, 8, 8), np.float32))[0, 0] == pytest.approx(64)


def test_an_unknown_model_and_an_oversized_batch_are_client_errors(pool: Any) -> None:
    _, client = pool(Scaled())
    with pytest.raises(InvalidInput, match="does not serve"):
        client.call("other:1", np.ones((1, 8, 8), np.float32))
    with pytest.raises(InvalidInput, match="larger than the pool's buffer"):
        client.call("m:1", np.ones((65, 28, 28), np.float32))


def test_a_stopped_pool_process_means_a_retry_elsewhere_then_a_503(pool: Any) -> None:
    first, client = pool(Scaled(), name="1.sock")
    second, _ = pool(Scaled(), name="2.sock")
    sample = np.ones((1, 8, 8), np.float32)
    client.call("m:1", sample)
    used = client.connection().path
    (first if used == first.path else second).stop()
    assert client.call("m:1", sample)[0, 0] == pytest.approx(64)  # retried on the other one
    (second if used == first.path else first).stop()
    with pytest.raises(PoolUnavailable):
        client.call("m:1", sample)


def test_a_caller_polls_for_a_quick_answer_and_stops_polling_for_a_slow_one(pool: Any) -> None:
    from serving.runtime import model_pool

    backend = Scaled()
    _, client = pool(backend)
    batch = np.ones((1, 8, 8), np.float32)
    client.call("m:1", batch)
    connection = client.connection()
    polls = []
    real_first_read = connection._first_read

    def counted(poll: bool) -> bytes:
        polls.append(poll and connection._sleep_next == 0)
        return real_first_read(poll)

    connection._first_read = counted  # type: ignore[method-assign]
    connection._sleep_next = 0  # whatever the first call saw on a busy machine
    backend.delay = 0.005  # far longer than a poll: the caller sleeps instead, for the next calls too
    for _ in range(model_pool.SPIN_BACKOFF + 2):
        assert client.call("m:1", batch)[0, 0] == pytest.approx(64)
    # one poll that ran out, SPIN_BACKOFF calls that slept at once, then a poll again
    assert polls == [True] + [False] * model_pool.SPIN_BACKOFF + [True], polls
    backend.delay = 0.0
    answers = [client.call("m:1", batch * i)[0, 0] for i in range(50)]
    assert answers == [pytest.approx(64 * i) for i in range(50)]


def test_a_caller_polls_only_while_no_other_thread_of_its_worker_waits(pool: Any, monkeypatch: Any) -> None:
    from serving.runtime.model_pool import PoolConnection

    seen: list[bool] = []
    real_call = PoolConnection.call

    def recorded(self: PoolConnection, key: bytes, batch: np.ndarray, deadline: float, poll: bool = False) -> Any:
        seen.append(poll)
        return real_call(self, key, batch, deadline, poll)

    monkeypatch.setattr(PoolConnection, "call", recorded)
    backend = Scaled(delay=0.2)
    _, client = pool(backend)
    batch = np.ones((1, 8, 8), np.float32)
    first = threading.Thread(target=client.call, args=("m:1", batch))
    first.start()
    time.sleep(0.05)  # the first thread waits for its answer: the second is not alone
    client.call("m:1", batch)
    first.join()
    backend.delay = 0.0
    client.call("m:1", batch)  # alone again
    assert seen == [True, False, True], seen
