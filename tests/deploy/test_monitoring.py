"""Monitoring for real: deploy/prometheus.yml in Debian's Prometheus, and the Grafana dashboard's expressions.

- Both Prometheus configs pass ``promtool check config`` (the Kubernetes job with a static target: Debian's
  Prometheus is built without Kubernetes discovery).
- Prometheus scrapes a real 2-worker server with keys, using deploy/prometheus.yml (its port, interval and key
  path rewritten), and the request counter summed over the workers equals the requests sent.
- Every expression of deploy/grafana/serving-dashboard.json names only metrics the server exports and runs
  in that Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import ROOT, GunicornServer, clean_env, free_port
from tests.kustomize import load_documents

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ADMIN_KEY = "admin-" + "a" * 32
API_KEY = "api-" + "b" * 32
SAMPLE = {"data": [[0.0] * 8] * 8}


def promtool_check(config: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install prometheus")
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_prometheus_configs_pass_promtool(tmp_path: Path) -> None:
    """deploy/prometheus.yml as it is (its key file made); the Kubernetes job with its pod discovery replaced by a
    static target, because Debian's Prometheus is built without Kubernetes discovery."""
    key_file = tmp_path / "admin-key"
    key_file.write_text(ADMIN_KEY)
    local = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    local["scrape_configs"][0]["authorization"]["credentials_file"] = str(key_file)
    local["rule_files"] = [str(DEPLOY / name) for name in local["rule_files"]]  # relative to deploy/
    (tmp_path / "local.yml").write_text(yaml.safe_dump(local))
    promtool_check(tmp_path / "local.yml")
    pods = yaml.safe_load((K8S / "prometheus-scrape.yml").read_text())
    (job,) = pods["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    annotations = load_documents(K8S / "base" / "deployment.yaml")[0]["spec"]["template"]["metadata"]["annotations"]
    kept = {rule["source_labels"][-1] for rule in job["relabel_configs"]}
    for annotation in annotations:
        label = "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", annotation)
        assert label in kept, f"the scrape job ignores the Deployment's {annotation} annotation"
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    job["authorization"]["credentials_file"] = str(key_file)
    (tmp_path / "pods.yml").write_text(yaml.safe_dump(pods))
    promtool_check(tmp_path / "pods.yml")


@pytest.fixture(scope="module")
def scraped_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real 2-worker server with keys, and Debian's Prometheus scraping it with deploy/prometheus.yml."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: apt-get install prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "admin-keys").write_text(ADMIN_KEY + "\n")
    (work / "api-keys").write_text(API_KEY + "\n")
    server = GunicornServer(model_repo, work, model="digits-torch", backend="onnx", workers=2,
                            admin_keys_file=work / "admin-keys", api_keys_file=work / "api-keys",
                            drift="true", drift_min_samples="1")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = [str(DEPLOY / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["authorization"]["credentials_file"] = str(work / "admin-keys")
    port = free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed in the finally below
    process = None
    try:
        server.start()
        job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [prometheus, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, env=clean_env())
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (work / "prometheus.log").read_text()
            time.sleep(0.2)
        yield {"server": server, "prometheus": url, "job": job["job_name"]}
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        server.stop()
        log.close()


def query(prometheus: str, expr: str) -> dict[str, Any]:
    answer = requests.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]  # type: ignore[no-any-return]


def scalar(prometheus: str, expr: str) -> float | None:
    result = query(prometheus, expr)["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
def test_prometheus_scrapes_the_request_counter_summed_over_workers(scraped_server: dict[str, Any]) -> None:
    server, prometheus = scraped_server["server"], scraped_server["prometheus"]
    sent, refused = 150, 3
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {API_KEY}"
        for _ in range(sent):
            assert session.post(server.url + "/predict", json=SAMPLE, timeout=10).status_code == 200
        for _ in range(refused):
            assert session.post(server.url + "/predict", json={"data": [1, 2]}, timeout=10).status_code == 422
    total = 'sum(serving_requests_total{endpoint="/predict"})'
    deadline = time.monotonic() + 15  # workers add their counts once a second; Prometheus scrapes every second
    while scalar(prometheus, total) != sent + refused and time.monotonic() < deadline:
        time.sleep(0.5)
    assert scalar(prometheus, total) == sent + refused
    assert scalar(prometheus, 'sum(serving_requests_total{endpoint="/predict", status="200"})') == sent
    assert scalar(prometheus, 'sum(serving_requests_total{endpoint="/predict", status="422"})') == refused
    # Two live workers answered: one series per worker process in the model-info gauge.
    assert scalar(prometheus, "count(count by (pid) (serving_model_info))") == 2
    targets = requests.get(prometheus + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [target["health"] for target in targets] == ["up"], targets  # with the admin key from the file


DASHBOARD = DEPLOY / "grafana" / "serving-dashboard.json"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "le", "inf", "nan"}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords, labels or numbers."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set(re.findall(r"(?<![A-Za-z0-9_.])[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", expr))
    functions = set(re.findall(r"([A-Za-z_]+)\s*\(", expr))
    return {name for name in names - functions if name.lower() not in PROMQL_WORDS}


@pytest.mark.slow
def test_every_dashboard_expression_runs_and_names_exported_metrics(scraped_server: dict[str, Any]) -> None:
    server, prometheus = scraped_server["server"], scraped_server["prometheus"]
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {API_KEY}"
        for _ in range(20):
            session.post(server.url + "/predict", json=SAMPLE, timeout=10)
    time.sleep(3)  # a flush (metrics, the drift window) and two scrapes
    exposition = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                              timeout=10).text
    exported = {line.split("{")[0].split()[0] for line in exposition.splitlines() if line and not line.startswith("#")}
    assert "process_resident_memory_bytes" not in exported  # why the dashboard has no per-worker RSS panel
    expressions = dashboard_expressions()
    assert len(expressions) >= 12
    empty = []
    for expr in expressions:
        names = metric_names(expr)
        assert names and names <= exported, f"{expr}: {sorted(names - exported)} not exported by the server"
        concrete = expr.replace("$__rate_interval", "15s").replace("$job", scraped_server["job"])
        if not query(prometheus, concrete)["result"]:
            empty.append(expr)
    # Only what this process-mode, error-free traffic cannot produce may be empty: refusals and queues.
    assert all("serving_rejected_requests_total" in expr or "serving_queue_depth" in expr or "5.." in expr
               or "4..|5.." in expr for expr in empty), empty


RULES = DEPLOY / "prometheus-rules.yml"


def test_the_drift_alerts_fire_above_their_threshold_and_only_then(tmp_path: Path) -> None:
    """promtool's rule unit tests on deploy/prometheus-rules.yml: a band over the threshold for 10 minutes fires
    the input alert, the class prior the prediction alert, and a score under it fires nothing."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install prometheus")
    series = 'serving_drift_score{job="serving",instance="a:8000",model="mnist",version="1",input="%s"}'
    threshold = 'serving_drift_threshold{job="serving",instance="a:8000",model="mnist",version="1"}'
    labels = {"job": "serving", "instance": "a:8000", "model": "mnist", "version": "1", "severity": "warning"}
    rules = {rule["alert"]: rule for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]}

    def fired(alert: str, value: str) -> dict[str, Any]:
        """The alert as promtool renders it: labels, and the annotations' templates filled in."""
        annotations = {key: re.sub(r"\{\{ \$value[^}]*\}\}", value, text).replace("{{ $labels.model }}", "mnist")
                       .replace("{{ $labels.version }}", "1").replace("{{ $labels.instance }}", "a:8000")
                       for key, text in rules[alert]["annotations"].items()}
        return {"exp_labels": labels, "exp_annotations": annotations}
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": [
            {"series": series % "band_1_1", "values": "0.02 0.9x20"},
            {"series": series % "mean_intensity", "values": "0.01x20"},
            {"series": series % "class_prior", "values": "0.03x20"},
            {"series": threshold, "values": "0.25x20"}],
         "alert_rule_test": [
            {"eval_time": "5m", "alertname": "ServingInputDrift", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "ServingInputDrift", "exp_alerts": [fired("ServingInputDrift", "0.90")]},
            {"eval_time": "15m", "alertname": "ServingPredictionDrift", "exp_alerts": []}]},
        {"interval": "1m", "input_series": [
            {"series": series % "class_prior", "values": "0.6x20"},
            {"series": series % "band_0_0", "values": "0.2x20"},
            {"series": threshold, "values": "0.25x20"}],
         "alert_rule_test": [
            {"eval_time": "15m", "alertname": "ServingPredictionDrift",
             "exp_alerts": [fired("ServingPredictionDrift", "0.60")]},
            {"eval_time": "15m", "alertname": "ServingInputDrift", "exp_alerts": []}]}]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(tmp_path / "tests.yml")]):
        result = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_prometheus_loads_the_alert_rules(scraped_server: dict[str, Any]) -> None:
    groups = requests.get(scraped_server["prometheus"] + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {rule["name"] for group in groups for rule in group["rules"]} == {"ServingInputDrift",
                                                                             "ServingPredictionDrift"}
