"""A retrain-and-publish loop under load: train, publish, poll, switch, for ``--minutes``; nothing may fail.

    python -m bench.model_swap [--minutes 5] [--clients 4] [--backend onnx] [--mode process] [--workers 2]

Starts gunicorn with ``SERVING_MODEL_CONTROL=poll`` on a private copy of the model repository, drives
``POST /v2/models/digits-torch/infer`` from ``--clients`` closed-loop clients (every answer checked:
status 200 and a version that exists), and meanwhile runs ``train.py --framework pytorch`` again
and again, each run publishing the next version atomically. It samples every worker's RSS (the
high-water mark shows the moment a worker holds two versions) and writes
``reports/model-swap-<stamp>.md`` with requests, failures, switches, the time from publish to the
first and the last worker serving the new version, and the memory figures. Bounded: load only to
127.0.0.1, and it stops by itself.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psutil
import requests

from bench.harness import ROOT, save_report
from serving.toolchain.data import load_digits_dataset
from serving.tools.testing import GunicornServer, clean_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--mode", default="process")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="where digits-torch/1 comes from")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    work = Path(tempfile.mkdtemp(prefix="model-swap-"))
    repo = work / "models"
    shutil.copytree(args.repo / "digits-torch" / sorted(p.name for p in (args.repo / "digits-torch").iterdir()
                                                          if p.name.isdigit())[0], repo / "digits-torch" / "1")
    meta = orjson.loads((repo / "digits-torch" / "1" / "metadata.json").read_bytes())
    meta["version"] = 1
    (repo / "digits-torch" / "1" / "metadata.json").write_bytes(orjson.dumps(meta))
    sample = load_digits_dataset(seed=0).x_test[0].reshape(-1).tolist()
    body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": sample}]})
    answers: list[tuple[float, int, str]] = []
    failures: list[str] = []
    stop = threading.Event()
    try:
        with GunicornServer(repo, work, cwd=ROOT, model="digits-torch", backend=args.backend, mode=args.mode,
                            workers=args.workers, model_control="poll", poll_seconds=args.poll_seconds,
                            access_log="false") as server:
            def client() -> None:
                with requests.Session() as session:
                    while not stop.is_set():
                        try:
                            answer = session.post(server.url + "/v2/models/digits-torch/infer", data=body,
                                                  timeout=10, headers={"Connection": "close"})
                            version = answer.json().get("model_version", "") if answer.ok else ""
                            answers.append((time.monotonic(), answer.status_code, version))
                            if not answer.ok:
                                failures.append(f"{answer.status_code} {answer.text[:200]}")
                        except requests.RequestException as exc:
                            failures.append(repr(exc)[:200])

            rss: dict[int, float] = {}

            def sample_rss() -> None:
                while not stop.wait(0.2):
                    for child in psutil.Process(server.pid).children():
                        try:
                            rss[child.pid] = max(rss.get(child.pid, 0.0), child.memory_info().rss / 2**20)
                        except psutil.Error:
                            pass

            appeared: dict[int, float] = {}

            def watch_versions() -> None:  # the moment train.py's rename makes a version visible
                while not stop.wait(0.02):
                    for path in (repo / "digits-torch").iterdir():
                        if path.name.isdigit() and int(path.name) not in appeared:
                            appeared[int(path.name)] = time.monotonic()

            threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
            threads += [threading.Thread(target=sample_rss, daemon=True),
                        threading.Thread(target=watch_versions, daemon=True)]
            for thread in threads:
                thread.start()
            time.sleep(3)
            baseline = {p: v for p, v in rss.items()}
            published: list[tuple[int, float, float]] = []  # version, training seconds, when its folder appeared
            deadline = time.monotonic() + args.minutes * 60
            while time.monotonic() < deadline - 20:
                started = time.monotonic()
                subprocess.run([sys.executable, "train.py", "--dataset", "digits", "--framework", "pytorch", "--out",
                                str(repo), "--name", "digits-torch", "--epochs", "5"], cwd=ROOT, env=clean_env(),
                               capture_output=True, check=True, timeout=300)
                version = max(int(p.name) for p in (repo / "digits-torch").iterdir() if p.name.isdigit())
                time.sleep(0.1)
                published.append((version, time.monotonic() - started, appeared.get(version, time.monotonic())))
                print(f"published digits-torch/{version} after {time.monotonic() - started:.1f}s of training",
                      flush=True)
                time.sleep(5)
            time.sleep(max(0.0, deadline - time.monotonic()))
            stop.set()
            for thread in threads:
                thread.join(15)
    finally:
        stop.set()
        shutil.rmtree(work, ignore_errors=True)
    report = render(args, stamp, answers, failures, published, baseline, rss)
    path = ROOT / "reports" / f"model-swap-{stamp}.md"
    save_report(path, report)


def render(args: argparse.Namespace, stamp: str, answers: list[tuple[float, int, str]], failures: list[str],
           published: list[tuple[int, float, float]], baseline: dict[int, float], rss: dict[int, float]) -> str:
    rows = []
    for version, seconds, at in published:
        seen = [t for t, _, v in answers if v == str(version)]
        older = [t for t, _, v in answers if v and int(v) < version and t > at]
        first = f"{min(seen) - at:.2f}" if seen else "never"
        last_old = f"{max(older) - at:.2f}" if older else "-"
        rows.append(f"| {version} | {seconds:.1f} | {first} | {last_old} |")
    versions = sorted({v for _, _, v in answers if v}, key=int)
    lines = [
        f"# Retrain-and-publish loop under load, {stamp} UTC", "",
        f"gunicorn -w {args.workers}, {args.mode} mode, {args.backend} backend, SERVING_MODEL_CONTROL=poll,"
        f" SERVING_POLL_SECONDS={args.poll_seconds:g}; {args.clients} closed-loop clients on"
        " `POST /v2/models/digits-torch/infer` (a new connection per request, so both workers answer);"
        f" `train.py --framework pytorch` published a new version again and again for {args.minutes:g} minutes,"
        " on the same 2 cores as the server and the clients.", "",
        f"- requests: {len(answers):,}; failed: **{len(failures)}**; versions that answered: {', '.join(versions)}",
        f"- worker RSS before the first switch (MiB): {', '.join(f'{v:.0f}' for v in baseline.values()) or '-'};"
        f" high-water mark over the run (MiB): {', '.join(f'{v:.0f}' for v in rss.values())}", "",
        "Times are from the moment the version's folder appeared (train.py renames it into place): the first"
        " answer from it, and the last answer from an older version after it.", "",
        "| version | training s | first answer from it, s | last answer from an older one, s |",
        "| ---: | ---: | ---: | ---: |", *rows, "",
    ]
    if failures:
        lines += ["Failures (first 10):", "", *[f"- {failure}" for failure in failures[:10]], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
