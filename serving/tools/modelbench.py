"""``serving bench``: the bare model call, in process, with no HTTP: the ceiling any server can
reach.

Loads one model version from the repository with the backend the server would use, caps its math
threads as a worker would, and calls ``predict`` on batches of each size for a fixed time. Served
throughput is best reported as a fraction of this figure, measured on the same machine.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serving.backends import backend_class
from serving.store.repository import ModelRepository


@dataclass
class CallStats:
    """What calling the model with one batch size measured."""

    batch_size: int
    calls: int
    p50_us: float
    p99_us: float
    samples_per_s: float


def measure(predict: object, batch: np.ndarray, seconds: float) -> CallStats:
    """Call ``predict(batch)`` repeatedly for about ``seconds``."""
    call = predict  # a bound method; kept local for the loop
    call(batch)  # type: ignore[operator]
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        call(batch)  # type: ignore[operator]
        ended = time.perf_counter()
        times.append(ended - started)
        if ended > deadline:
            break
    ordered = sorted(times)
    total = sum(times)
    return CallStats(
        len(batch),
        len(times),
        ordered[len(ordered) // 2] * 1e6,
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        len(batch) * len(times) / total,
    )


def run(
    repository: Path,
    name: str,
    version: int | None,
    backend: str,
    batch_sizes: list[int],
    seconds: float,
    math_threads: int,
    seed: int = 0,
) -> tuple[str, list[CallStats]]:
    """Load the model and measure each batch size; returns the backend's description and the
    stats."""
    meta = ModelRepository(repository).resolve(name, version)
    backend_name = backend or str(meta.raw.get("backend") or meta.framework)
    model = backend_class(backend_name)(meta, math_threads)
    model.load()
    # unbounded feature inputs: values around the stored sample's
    low, high = meta.input_range if meta.bounded else (-1.0, 1.0)
    base = 0.0 if meta.bounded else np.asarray(meta.sample()[0], dtype=np.float32)
    rng = np.random.default_rng(seed)
    stats = [
        measure(
            model.predict,
            (base + rng.uniform(low, high, (size, *meta.input_shape))).astype(np.float32),
            seconds,
        )
        for size in batch_sizes
    ]
    title = (
        f"{meta.name}:{meta.version} on {backend_name} ({model.framework_version()}),"
        f" {math_threads} math thread(s)"
    )
    return title, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="serving bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--version", type=int, default=None, help="version (default: the latest)")
    parser.add_argument(
        "--backend", default="", help="tensorflow, pytorch, onnx (default: the model's framework)"
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="model repository root (default: SERVING_MODEL_REPOSITORY, else models)",
    )
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per batch size")
    parser.add_argument(
        "--math-threads", type=int, default=1, help="intra-op threads (a worker's share of cores)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    try:
        sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        parser.error("--batch-sizes takes whole numbers separated by commas, e.g. 1,64")
    if any(size < 1 for size in sizes):
        parser.error("batch sizes must be >= 1")
    from serving.config import Settings
    from serving.errors import ConfigError, ModelLoadError, ModelNotFound

    try:
        repository = args.repository or Settings.from_env().model_repository
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    try:
        title, stats = run(
            repository,
            args.model,
            args.version,
            args.backend,
            sizes,
            args.seconds,
            args.math_threads,
        )
    except (ModelLoadError, ModelNotFound) as exc:
        print(f"error: {getattr(exc, 'message', exc)}")
        return 2
    if args.json:
        import orjson

        for row in stats:
            print(orjson.dumps({"model": title, **asdict(row)}).decode())
        return 0
    print(title)
    print(f"{'batch':>6} {'calls':>8} {'p50 us':>10} {'p99 us':>10} {'samples/s':>12}")
    for row in stats:
        print(
            f"{row.batch_size:>6} {row.calls:>8} {row.p50_us:>10.1f} {row.p99_us:>10.1f} "
            f"{row.samples_per_s:>12,.0f}"
        )
    return 0
