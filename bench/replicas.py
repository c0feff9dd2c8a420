"""The replica rehearsal: several servers behind nginx, one killed and one stopped under load (as root).

    .venv/bin/python -m bench.replicas            # 3 replicas, 16 users, 60 s; writes reports/replicas-<date>.md

Each replica is a real gunicorn server in its own network namespace (``ip netns``), reached from the
host over a veth pair with addresses in 10.213.<n>.0/24 that exist only on that pair. nginx on the host
balances them with deploy/replicas/nginx.conf (passive health checks, retries on the next replica) on
127.0.0.1. Locust (bench/replicas_locust.py) sends a bounded closed-loop load through nginx while the
plan runs: SIGKILL a whole replica (every process of it, like a container killed for memory or a lost
node), restore it, then SIGTERM another (a rolling update's graceful stop) and restore it. For each event
the report counts the requests that ended in the next ``--window`` seconds, the failures a client saw,
the requests nginx retried on another replica, and the latency quantiles. A second run repeats the plan with
nginx's default for POSTs (not retried once sent), to show what the shipped retries do.

It is the one-machine rehearsal of a Kubernetes rolling update: what it proves and what it does not is in
docs/deploy.md#replica-failover. tests/server/test_replicas.py runs a short version.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.netns import ROOT, Replica, balancer, namespace
from serving.tools.testing import clean_env


@dataclass
class Event:
    """One thing that happened during the load, at ``at`` (epoch seconds)."""

    name: str
    at: float
    replica: str = ""
    detail: str = ""


def _note_exit(proc: subprocess.Popen[bytes], event: Event) -> None:
    """Wait for a stopping replica and note in its event when it exited, and how."""
    code = proc.wait(120)
    event.detail = f"drained and exited with status {code} after {time.time() - event.at:.1f} s"


def load(url: str, users: int, seconds: int, body: Path, label: str, records: Path) -> subprocess.Popen[bytes]:
    """Start locust (bench/replicas_locust.py) against ``url`` for ``seconds``."""
    locust = Path(sys.executable).with_name("locust")
    env = clean_env(REHEARSAL_BODY=str(body), REHEARSAL_LABEL=label, REHEARSAL_RECORDS=str(records))
    return subprocess.Popen([str(locust), "-f", str(ROOT / "bench" / "replicas_locust.py"), "--headless", "-u",
                             str(users), "-r", str(users), "-t", f"{seconds}s", "--host", url, "--only-summary",
                             "--exit-code-on-error", "0", "--loglevel", "WARNING"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_records(path: Path) -> list[tuple[float, float, bool, str]]:
    with open(path, newline="") as source:
        return [(float(start), float(ms), ok == "1", error) for start, ms, ok, error in csv.reader(source)]


def read_nginx_log(path: Path) -> list[tuple[float, float, str, str]]:
    """(start, seconds, replicas tried, their statuses) per request nginx answered."""
    rows = []
    for line in path.read_text().splitlines():
        match = re.match(r'(\S+) (\d+) (\S+) "([^"]*)" "([^"]*)"', line)
        if match:
            end, seconds = float(match.group(1)), float(match.group(3))
            rows.append((end - seconds, seconds, match.group(4), match.group(5)))
    return rows


def read_nginx_errors(path: Path) -> list[tuple[float, str, str]]:
    """(second, replica, "reset" | "refused") for each upstream failure nginx logged: a reset is a request the
    replica had accepted and never answered; a refusal, a connection it no longer accepted."""
    rows = []
    for line in path.read_text().splitlines():
        match = re.match(r'(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) \[error\].*upstream: "http://([^/"]+)/', line)
        if not match:
            continue
        if "(111: " in line:
            kind = "refused"
        elif "(104: " in line or "prematurely closed" in line:
            kind = "reset"
        else:
            continue
        second = time.mktime(time.strptime(match.group(1), "%Y/%m/%d %H:%M:%S"))
        rows.append((second, match.group(2).rpartition(":")[0], kind))
    return rows


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def window_stats(records: list[tuple[float, float, bool, str]], nginx: list[tuple[float, float, str, str]],
                 start: float, end: float, errors: Sequence[tuple[float, str, str]] = (),
                 replica_address: str = "") -> dict[str, float]:
    """Requests that ended in [start, end), as the client saw them: counts, failures and latency quantiles; those
    nginx retried on another replica; with ``replica_address``, the requests that replica had accepted and
    never answered (reset: being served or waiting in its listen backlog when it went), and the connections it
    refused, in that window (nginx logs them to the second)."""
    inside = [record for record in records if start <= record[0] + record[1] / 1000 < end]
    latencies = [record[1] for record in inside]
    ended = [row for row in nginx if start <= row[0] + row[1] < end]
    stats = {"requests": len(inside), "failures": sum(not record[2] for record in inside),
             "retried": sum("," in row[2] for row in ended), "p50": quantile(latencies, 0.5),
             "p99": quantile(latencies, 0.99), "max": max(latencies, default=float("nan"))}
    if replica_address:
        mine = [kind for second, replica, kind in errors if replica == replica_address and int(start) <= second < end]
        stats["reset"], stats["refused"] = mine.count("reset"), mine.count("refused")
    return stats


def rehearse(repo: Path, work: Path, model: str, replicas: int = 3, users: int = 16, seconds: int = 60,
             plan: Sequence[tuple[float, str, int]] = ((15, "sigkill", 0), (25, "restore", 0), (40, "sigterm", 1),
                                                      (50, "restore", 1)),
             subnet: int = 213, window: float = 5.0, retry_posts: bool = True, **settings: str) -> dict[str, object]:
    """Run the plan ((seconds after the load starts, sigkill|sigterm|restore, replica index)); return the data."""
    sample = work / "sample.json"
    work.mkdir(parents=True, exist_ok=True)
    raw = (repo / model / "1" / "sample.json").read_bytes()
    parsed = orjson.loads(raw)
    sample.write_bytes(orjson.dumps({"data": [parsed["data"]]}))
    events: list[Event] = []
    with ExitStack() as stack:
        nodes: list[Replica] = []
        for index in range(replicas):
            netns = f"serving-r{os.getpid()}-{index + 1}"
            address = stack.enter_context(namespace(netns, index + 1, subnet))
            replica = Replica(f"replica-{index + 1}", netns, address, repo, work / f"replica-{index + 1}.log",
                              model=model, **settings)
            stack.callback(replica.stop)
            nodes.append(replica)
        ready = [replica.start() for replica in nodes]
        url = stack.enter_context(balancer(work / "nginx", [replica.address for replica in nodes], retry_posts))
        records_path = work / "requests.csv"
        locust = load(url, users, seconds, sample, str(parsed["label"]), records_path)
        stack.callback(lambda: locust.poll() is None and locust.kill())
        began = time.time()
        draining: list[tuple[Replica, threading.Thread]] = []
        for offset, action, index in plan:
            time.sleep(max(0.0, began + offset - time.time()))
            replica = nodes[index]
            if action == "sigkill":
                events.append(Event("SIGKILL", time.time(), replica.name))
                replica.kill()
            elif action == "sigterm":
                events.append(Event("SIGTERM", time.time(), replica.name))
                watcher = threading.Thread(target=_note_exit, args=(replica.terminate(), events[-1]), daemon=True)
                watcher.start()
                draining.append((replica, watcher))
            else:
                for stopping, watcher in draining:
                    if stopping is replica:
                        watcher.join(60)
                at = time.time()
                took = replica.start()
                events.append(Event("restore", at, replica.name, f"ready again in {took:.1f} s"))
        _, stderr = locust.communicate(timeout=seconds + 60)
        if not records_path.exists():
            raise AssertionError(f"locust wrote no records:\n{stderr.decode()[-3000:]}")
    records = read_records(records_path)
    nginx = read_nginx_log(work / "nginx" / "access.log")
    errors = read_nginx_errors(work / "nginx" / "nginx.err")
    first = min(event.at for event in events) if events else began + seconds
    rows = [("baseline", "", f"the {window:.0f} s before the first event",
             window_stats(records, nginx, first - window, first))]
    addresses = {replica.name: replica.address for replica in nodes}
    for event in events:
        address = addresses[event.replica] if event.name in ("SIGKILL", "SIGTERM") else ""
        rows.append((event.name, event.replica, event.detail, window_stats(records, nginx, event.at,
                                                                            event.at + window, errors, address)))
    total = window_stats(records, nginx, began - 1, began + seconds + 60)
    return {"rows": rows, "total": total, "ready": ready, "began": began, "events": events, "users": users,
            "replicas": replicas, "seconds": seconds, "window": window, "model": model, "settings": settings,
            "retry_posts": retry_posts}


def report(results: list[dict[str, object]], path: Path) -> None:
    """One table per run: the shipped nginx configuration, then (when run) the one without POST retries."""
    first = results[0]
    lines = [f"# Replica rehearsal: bench/replicas.py, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC", "",
             f"{first['replicas']} replicas of the server (model {first['model']}, ONNX backend, 1 sync worker"
             " each), each in its own network namespace, behind nginx (deploy/replicas/nginx.conf: passive"
             f" health checks, retries on the next replica); Locust, {first['users']} users in a closed loop for"
             f" {first['seconds']} s, POST /predict/label through nginx. Each row counts the requests that"
             f" ended within {first['window']:.0f} s after the event, and their latency as the client saw it;"
             " *retried by nginx*: requests that ended in that window after the replica nginx first chose reset or"
             " refused them and another one answered; *reset by it*: requests the stopped replica had accepted"
             " and never answered (being served, or waiting in its listen backlog when it went), the requests"
             " in flight on it; *refused by it*: connections it no longer accepted (nginx always retries those)."
             " 2-core machine: the load, nginx and every replica share it."]
    for result in results:
        rows, total, events = result["rows"], result["total"], result["events"]
        assert isinstance(rows, list) and isinstance(total, dict) and isinstance(events, list)
        began = float(result["began"])  # type: ignore[arg-type]
        title = ("deploy/replicas/nginx.conf as shipped (POSTs retried: non_idempotent)" if result["retry_posts"]
                 else "the same without non_idempotent (nginx's default: a POST already sent is not retried)")
        lines += ["", f"## {title}", "",
                  "| event | replica | at (s) | requests | failures | retried by nginx | reset by it | refused by it |"
                  " p50 ms | p99 ms | max ms | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        times = [None, *[event.at - began for event in events]]
        for (name, replica, note, stats), at in zip(rows, times, strict=True):
            lines.append(f"| {name} | {replica} | {'' if at is None else f'{at:.1f}'} | {stats['requests']:,} |"
                         f" {stats['failures']} | {stats['retried']} | {stats.get('reset', '')} |"
                         f" {stats.get('refused', '')} |"
                         f" {stats['p50']:.1f} | {stats['p99']:.1f} | {stats['max']:.0f} | {note} |")
        lines += ["", f"Whole run: {total['requests']:,} requests, {total['failures']} failures,"
                      f" {total['retried']} retried by nginx, p50 {total['p50']:.1f} ms, p99 {total['p99']:.1f} ms."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="digits-torch")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--shipped-only", action="store_true",
                        help="skip the second run, without POST retries, that shows what the retries do")
    parser.add_argument("--report", type=Path,
                        default=ROOT / "reports" / f"replicas-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.md")
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("the rehearsal creates network namespaces: run it as root")
    work = Path(f"/tmp/serving-replicas-{os.getpid()}")
    results = []
    try:
        for retry_posts in (True, False)[: 1 if options.shipped_only else 2]:
            results.append(rehearse(options.repository, work / str(retry_posts), options.model, options.replicas,
                                    options.users, options.seconds, retry_posts=retry_posts, backend="onnx"))
        report(results, options.report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(options.report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
