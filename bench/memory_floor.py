"""The framework's own floor: what a backend costs at N processes with no HTTP server around it.

The parent does what the server's master does before fork (imports the framework, loads the model where
that is fork-safe, freezes the collector, drops its library pages) and forks N children that each load the
model where the parent could not and run ``--calls`` predictions on one sample, as a worker would, then
wait. Total PSS of the parent and the children is the least any server of this design could cost; the
server's own figure minus this one is what gunicorn, Flask and the serving package add.

    python -m bench.memory_floor --backend pytorch --model digits-torch --children 4
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np
import orjson

from serving.backends import backend_class
from serving.backends.base import PRELOADED, preload_key
from serving.host.sharing import page_out_libraries
from serving.observability.memory import tree_memory
from serving.store.repository import ModelRepository


def floor(repo: Path, model: str, backend: str, children: int, calls: int) -> int:
    """Total PSS in bytes of a parent and ``children`` forked model runners (run in a fresh process)."""
    meta = ModelRepository(repo).resolve(model)
    cls = backend_class(backend)
    for name in cls.framework_modules:
        __import__(name)
    if cls.preloadable(1):
        loaded = cls(meta, 1)
        loaded.load()
        PRELOADED[preload_key(cls, meta, 1)] = loaded
    gc.collect()
    gc.freeze()
    page_out_libraries()
    sample = np.asarray(orjson.loads((meta.path / "sample.json").read_bytes())["data"], dtype=np.float32)
    batch = sample.reshape((1, *meta.input_shape))
    ready_r, ready_w = os.pipe()
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            try:
                runner = PRELOADED.get(preload_key(cls, meta, 1)) or cls(meta, 1)
                if runner is not PRELOADED.get(preload_key(cls, meta, 1)):
                    runner.load()
                for _ in range(calls):
                    runner.predict(batch)
                os.write(ready_w, b".")
                time.sleep(600)
            finally:
                os._exit(0)
        pids.append(pid)
    for _ in pids:
        os.read(ready_r, 1)
    time.sleep(1.0)
    total = sum(p.pss for p in tree_memory(os.getpid()))
    for pid in pids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path("models"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    total = floor(args.repo, args.model, args.backend, args.children, args.calls)
    sys.stdout.write(f"{total}\n")


if __name__ == "__main__":
    main()
