"""The first ``make serve`` on a fresh checkout: how long until the default model answers, install included.

    python -m bench.first_serve [--data-dir DIR] [--keep] [--limit 900]

Clones this checkout's HEAD into a fresh temporary directory (no ``.venv``, no ``models/``), runs ``make serve``
there with ``SERVING_BIND`` on a free loopback port, and times each phase from the command's own output: the
virtual environment and ``pip install -r requirements.txt`` (from pip's cache, as on a machine that installed
these wheels once; a cold download adds the 2.9 GB over the network), the package install, the training of the
default model, and gunicorn until ``/health/ready`` answers. It then checks what a user gets: the model
(name, dataset, t10k accuracy from its metadata.json) and the classic client's answer for the first t10k digit.
MNIST comes from ``--data-dir`` (default ``$MNIST_DIR``, else ``../shared/data/mnist``), as the cache would
give it after the one download a fresh machine makes (11 MB, not timed here). Writes
``reports/first-serve-<date>.md`` with the phases, the target (serving within 180 s, >= 0.99 on t10k) and the
machine's load average, since a shared machine stretches every phase.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import requests

from bench.harness import ROOT
from serving.toolchain.data import load_mnist
from serving.tools.testing import free_port

TARGET_S, TARGET_ACCURACY = 180.0, 0.99
#: Lines of make serve's output that end a phase, in order (the first line that matches each).
PHASES = (
    ("venv and requirements", re.compile(r"^Successfully installed ")),
    ("package install", re.compile(r"^touch \.venv/\.installed")),
    ("training", re.compile(r"^done in [0-9.]+s")),
    ("gunicorn start", re.compile(r"Listening at: ")),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST (default $MNIST_DIR or ../shared)")
    parser.add_argument("--limit", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the fresh checkout (its path is printed)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or Path(os.environ.get("MNIST_DIR") or ROOT.parent / "shared" / "data" / "mnist")
    work = Path(tempfile.mkdtemp(prefix="first-serve-"))
    checkout = work / "serving"
    subprocess.run(["git", "clone", "--quiet", "--local", "--no-hardlinks", str(ROOT), str(checkout)], check=True)
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "VIRTUAL_ENV"))}
    env.update(SERVING_BIND=f"127.0.0.1:{port}", MNIST_DIR=str(data_dir), XDG_CACHE_HOME=str(work / "xdg"))
    load_before = os.getloadavg()
    started = time.monotonic()
    proc = subprocess.Popen(["make", "serve"], cwd=checkout, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    marks: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            for index, (name, pattern) in enumerate(PHASES):
                earlier_done = all(earlier in marks for earlier, _ in PHASES[:index])
                if name not in marks and earlier_done and pattern.search(line):
                    marks[name] = time.monotonic() - started
            print(line, end="", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ready_s = None
    try:
        while time.monotonic() - started < args.limit and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    ready_s = time.monotonic() - started
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        answer = None
        if ready_s is not None:
            digit = np.rint(load_mnist(data_dir).x_test[0] * 255).astype(int).tolist()
            answer = requests.post(f"http://127.0.0.1:{port}/inference", json={"images": digit}, timeout=10).text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        reader.join(5)
    load_after = os.getloadavg()
    models = sorted((checkout / "models").glob("*/*/metadata.json"))
    meta = orjson.loads(models[0].read_bytes()) if models else {}
    report = write_report(commit, marks, ready_s, meta, answer, load_before, load_after)
    print(f"wrote {report}")
    if args.keep:
        print(f"kept {checkout}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ready_s is not None and ready_s <= TARGET_S else 1


def write_report(commit: str, marks: dict[str, float], ready_s: float | None, meta: dict, answer: str | None,
                 load_before: tuple[float, ...], load_after: tuple[float, ...]) -> Path:
    stamp = time.strftime("%Y-%m-%d-%H%M")
    path = ROOT / "reports" / f"first-serve-{stamp}.md"
    previous = 0.0
    rows = []
    for name, _ in PHASES:
        if name in marks:
            rows.append(f"| {name} | {marks[name] - previous:.1f} | {marks[name]:.1f} |")
            previous = marks[name]
    if ready_s is not None:
        rows.append(f"| first worker ready (/health/ready 200) | {ready_s - previous:.1f} | **{ready_s:.1f}** |")
    accuracy = meta.get("test_accuracy")
    verdict = ("met" if ready_s is not None and ready_s <= TARGET_S else "**missed**")
    lines = [
        f"# First `make serve` on a fresh checkout ({time.strftime('%Y-%m-%d %H:%M')}, commit {commit})", "",
        f"`python -m bench.first_serve`: a fresh clone, `make serve` (venv, `pip install -r requirements.txt` from"
        f" pip's cache, the package, `python train.py`, gunicorn) until `/health/ready` answers. Target: serving"
        f" within {TARGET_S:.0f} s, {verdict}. Load average of the machine before / after: "
        f"{load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} cores (other work shares it).", "",
        "| phase | seconds | since start |", "| --- | --- | --- |", *rows, "",
        f"Default model: {meta.get('name')} ({meta.get('framework')}, {meta.get('arch')}, {meta.get('epochs')}"
        f" epochs on {meta.get('train_samples')} {meta.get('dataset')} images): t10k accuracy "
        f"**{accuracy}** on {meta.get('test_samples')} images (target {TARGET_ACCURACY}).",
        f"The classic client's request for the first t10k digit (a 7) answered `{answer}`.", "",
    ]
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
