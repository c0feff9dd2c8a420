"""The deployment files under deploy/: valid where a schema exists, and consistent with the code.

- Kubernetes manifests (deploy/k8s, the kustomize output included) validate against the schemas of
  Kubernetes ``K8S_VERSION`` bundled with kubernetes-validate, strictly (no unknown field).
- The KServe ServingRuntime and InferenceService validate against the CRD schemas of KServe v0.20.0
  (tests/data/kserve, extracted from kserve/kserve's config/crd/full at that tag), strictly too.
- The manifests agree with the code: every SERVING_* name is a setting and its value is accepted, the
  container port is the bind port, the probe paths answer 200 on a real server, the grace periods exceed
  the graceful timeout, workers follow the CPU limit as an integer.
- The systemd unit passes systemd-analyze verify; gunicorn really sends READY=1 for Type=notify.

Prometheus and the Grafana dashboard are tested in tests/deploy/test_monitoring.py, the replicas behind nginx in
tests/server/test_replicas.py; the container images by deploy/test-image.sh (too slow for the suite).
"""

from __future__ import annotations

import copy
import gzip
import inspect
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.config import PREFIX, Settings
from serving.errors import ConfigError
from serving.http.security import Gate
from tests import kustomize
from tests.conftest import ROOT

#: The Kubernetes release the manifests target (its schemas ship with kubernetes-validate).
K8S_VERSION = "1.32.0"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(path.parent for path in (K8S / "overlays").glob("*/kustomization.yaml"))
KSERVE_SCHEMAS = ROOT / "tests" / "data" / "kserve"
ADMIN_KEY = "admin-" + "a" * 32
API_KEY = "api-" + "b" * 32
SAMPLE = {"data": [[0.0] * 8] * 8}


# --- helpers -------------------------------------------------------------------------------------------

def documents(path: Path) -> list[dict[str, Any]]:
    return kustomize.load_documents(path)


def complete_manifests() -> list[Path]:
    """Every file under deploy/k8s and deploy/kserve that holds whole objects (not kustomizations or patches)."""
    files = [K8S / "secret.example.yaml", *sorted((K8S / "base").glob("*.yaml")),
             *sorted((K8S / "rendered").glob("*.yaml")), *sorted((K8S / "overlays").glob("*/pvc.yaml"))]
    return [path for path in files if path.name != "kustomization.yaml"]


def rendered(overlay: str) -> list[dict[str, Any]]:
    return documents(K8S / "rendered" / f"{overlay}.yaml")


def find(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (match,) = [resource for resource in resources if resource["kind"] == kind]
    return match


def pod_container(resource: dict[str, Any]) -> dict[str, Any]:
    (container,) = resource["spec"]["template"]["spec"]["containers"]
    return container


def runtime_container() -> dict[str, Any]:
    runtime = documents(DEPLOY / "kserve" / "servingruntime.yaml")[0]
    (container,) = runtime["spec"]["containers"]
    return container


def all_deployments() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(name, Deployment, ConfigMap data) of the base and of every rendered overlay."""
    base = [documents(K8S / "base" / name)[0] for name in ("deployment.yaml", "configmap.yaml")]
    found = [("base", base[0], base[1]["data"])]
    for overlay in OVERLAYS:
        resources = rendered(overlay.name)
        found.append((overlay.name, find(resources, "Deployment"), find(resources, "ConfigMap")["data"]))
    return found


def setting_names() -> set[str]:
    return {row.variable for row in Settings.describe()}


def bind_port(bind: str) -> int:
    return int(bind.rpartition(":")[2])


def strict(schema: Any) -> Any:
    """A CRD schema where objects with declared properties refuse any other field, as kubectl's strict field
    validation does; objects that preserve unknown fields or declare additionalProperties keep their rule."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def kserve_schema(kind: str, version: str) -> dict[str, Any]:
    with gzip.open(KSERVE_SCHEMAS / f"{kind.lower()}-{version}.schema.json.gz") as source:
        return json.load(source)


# --- schemas ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", complete_manifests(), ids=lambda path: str(path.relative_to(K8S)))
def test_kubernetes_manifests_validate_against_the_pinned_schemas(path: Path) -> None:
    resources = documents(path)
    assert resources, f"{path} holds no object"
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {resource['kind']}/{resource['metadata']['name']}: {exc.path}: {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda path: path.name)
def test_the_committed_kustomize_output_is_what_the_overlay_renders(overlay: Path) -> None:
    def key(resource: dict[str, Any]) -> tuple[str, str]:
        return resource["kind"], resource["metadata"]["name"]

    committed = sorted(rendered(overlay.name), key=key)
    assert sorted(kustomize.build(overlay), key=key) == committed, "regenerate deploy/k8s/rendered (docs/deploy.md)"
    kubectl = shutil.which("kubectl")
    if kubectl:  # real kustomize too, where it is installed
        output = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60,
                                check=True).stdout
        assert sorted((doc for doc in yaml.safe_load_all(output) if doc), key=key) == committed


@pytest.mark.parametrize(("path", "kind", "version"), [("servingruntime.yaml", "ServingRuntime", "v1alpha1"),
                                                         ("inferenceservice.yaml", "InferenceService", "v1beta1"),
                                                         ("inferenceservice-grpc.yaml", "InferenceService", "v1beta1")])
def test_kserve_manifests_validate_against_kserve_crd_schemas(path: str, kind: str, version: str) -> None:
    saved = kserve_schema(kind, version)
    assert saved["source"].startswith("kserve/kserve v0.20.0")
    (resource,) = documents(DEPLOY / "kserve" / path)
    assert resource["apiVersion"] == f"{saved['group']}/{version}" and resource["kind"] == kind
    validator = jsonschema.Draft202012Validator(strict(saved["openAPIV3Schema"]))
    errors = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
              for error in validator.iter_errors(resource)]
    assert not errors, errors
    # The strict schema does refuse what KServe does not know.
    broken = copy.deepcopy(resource)
    broken["spec"]["protocolVersion" if kind == "ServingRuntime" else "predictorr"] = "v2"
    assert list(validator.iter_errors(broken))


def test_the_kserve_pair_fits_together() -> None:
    (runtime,) = documents(DEPLOY / "kserve" / "servingruntime.yaml")
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    for name in ("inferenceservice.yaml", "inferenceservice-grpc.yaml"):
        (service,) = documents(DEPLOY / "kserve" / name)
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        assert model["modelFormat"]["name"] in {fmt["name"] for fmt in runtime["spec"]["supportedModelFormats"]}
    container = runtime_container()
    assert container["name"] == "kserve-container"  # the name KServe merges the predictor into
    env = {item["name"]: item.get("value") for item in container["env"]}
    # KServe's storage initializer downloads storageUri to /mnt/models; the server serves the model named
    # like the InferenceService, which KServe fills into {{.Name}}.
    assert env["SERVING_MODEL_REPOSITORY"] == "/mnt/models" and env["SERVING_MODEL"] == "{{.Name}}"
    assert "onnx" in container["image"]  # the ONNX image sets SERVING_BACKEND=onnx itself
    port = bind_port(env["SERVING_BIND"])
    assert [p["containerPort"] for p in container["ports"]] == [port] == [8080]
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(port)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port
    # gRPC: KServe routes the h2c port the gRPC InferenceService names, which is the runtime's SERVING_GRPC_BIND
    (grpc_service,) = documents(DEPLOY / "kserve" / "inferenceservice-grpc.yaml")
    grpc_model = grpc_service["spec"]["predictor"]["model"]
    assert grpc_model["protocolVersion"] == "grpc-v2"
    h2c = [(p["name"], p["containerPort"]) for p in grpc_model["ports"]]
    assert h2c == [("h2c", bind_port(env["SERVING_GRPC_BIND"]))]
    assert {item["name"]: item["value"] for item in grpc_model["env"]}["SERVING_MODEL"] == "digits-torch"


# --- manifests against the code -----------------------------------------------------------------------

def test_every_serving_variable_in_deploy_is_a_setting_and_its_value_is_accepted(tmp_path: Path) -> None:
    names = setting_names()
    sources: dict[str, dict[str, str]] = {}
    for name, deployment, config in all_deployments():
        env = dict(config)
        for item in pod_container(deployment)["env"]:
            env[item["name"]] = item.get("value", "2")  # valueFrom: the Downward API's whole number of cores
        sources[f"k8s {name}"] = env
    sources["kserve"] = {item["name"]: item.get("value", "2") for item in runtime_container()["env"]}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    sources["Dockerfile"] = dict(re.findall(r"\b(SERVING_[A-Z_]+)=(\S+)", dockerfile))
    unit = (DEPLOY / "systemd" / "serving.service").read_text()
    sources["systemd unit"] = dict(re.findall(r"\b(SERVING_[A-Z_]+)=(\S+)", unit))
    template = (DEPLOY / "systemd" / "serving.env").read_text()
    sources["serving.env"] = dict(re.findall(r"^#?\s*(SERVING_[A-Z_]+)=(\S*)", template, re.MULTILINE))
    for where, env in sources.items():
        serving = {key: value for key, value in env.items() if key.startswith(PREFIX)}
        assert serving, where
        unknown = set(serving) - names
        assert not unknown, f"{where}: {sorted(unknown)} are not settings (serving/config.py)"
        values = {key: value for key, value in serving.items() if value != "{{.Name}}"}
        Settings.from_env(values)  # raises ConfigError on a value the server would refuse


@pytest.mark.parametrize("limit", ["500m", "1", "2", "3500m", "4"])
def test_workers_follow_the_cpu_limit_as_an_integer(limit: str) -> None:
    """The Downward API writes limits.cpu divided by the divisor, rounded up to an integer: SERVING_WORKERS
    takes that. A divisor below 1 core (e.g. 1m) would give 2000 workers: it must be 1."""
    for name, deployment, _ in all_deployments():
        container = pod_container(deployment)
        (workers,) = [item for item in container["env"] if item["name"] == "SERVING_WORKERS"]
        field = workers["valueFrom"]["resourceFieldRef"]
        assert (field["resource"], field["divisor"], field["containerName"]) == ("limits.cpu", "1", container["name"])
        cpu = container["resources"]["limits"]["cpu"]
        assert re.fullmatch(r"\d+", cpu), f"{name}: a whole-core CPU limit, so workers x 1 math thread = the limit"
        assert container["resources"]["requests"]["cpu"] == cpu, name
    cores = int(limit[:-1]) / 1000 if limit.endswith("m") else int(limit)
    downward_value = str(math.ceil(cores / 1))
    assert Settings.from_env({"SERVING_WORKERS": downward_value}).workers == math.ceil(cores)
    with pytest.raises(ConfigError, match="not a whole number"):
        Settings.from_env({"SERVING_WORKERS": "0.5"})


def test_ports_probes_and_security_context_agree_with_the_image() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    uid = int(re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE).group(1))  # type: ignore[union-attr]
    image_port = bind_port(re.search(r"SERVING_BIND=(\S+)", dockerfile).group(1))  # type: ignore[union-attr]
    image_grpc_port = bind_port(re.search(r"SERVING_GRPC_BIND=(\S+)", dockerfile).group(1))  # type: ignore[union-attr]
    assert f"EXPOSE {image_port} {image_grpc_port}" in dockerfile
    for name, deployment, config in all_deployments():
        pod = deployment["spec"]["template"]["spec"]
        container = pod_container(deployment)
        port = bind_port(config["SERVING_BIND"])
        grpc_port = bind_port(config["SERVING_GRPC_BIND"])
        assert (port, grpc_port) == (image_port, image_grpc_port)
        ports = [(p["name"], p["containerPort"]) for p in container["ports"]]
        assert ports == [("http", port), ("grpc", grpc_port)], name
        assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert container["startupProbe"]["httpGet"]["path"] == "/health/ready"
        assert container["readinessProbe"]["grpc"] == {"port": grpc_port}  # grpc.health.v1 on the gRPC port
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
        assert context["capabilities"]["drop"] == ["ALL"]
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        assert "/tmp" in mounts, "the only writable directory: metrics files and worker heartbeats"
        assert pod["enableServiceLinks"] is False, "a Service named serving would inject SERVING_* variables"
        keys = [volume for volume in pod["volumes"] if "secret" in volume]
        assert [volume["secret"]["secretName"] for volume in keys] == ["serving-keys"]
        assert config["SERVING_API_KEYS_FILE"].startswith(mounts["/etc/serving/keys"]["mountPath"])
        if "/models" in mounts:
            assert mounts["/models"]["readOnly"]
    (service,) = documents(K8S / "base" / "service.yaml")
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", "http"), ("grpc", "grpc")]
    assert service["spec"]["ports"][1]["appProtocol"] == "kubernetes.io/h2c"


def test_grace_periods_exceed_the_graceful_timeout() -> None:
    default = Settings().graceful_timeout
    for name, deployment, config in all_deployments():
        pod = deployment["spec"]["template"]["spec"]
        command = pod_container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        graceful = int(config.get("SERVING_GRACEFUL_TIMEOUT", default))
        assert pod["terminationGracePeriodSeconds"] > int(command[1]) + graceful, name
    env = {item["name"]: item.get("value") for item in runtime_container()["env"]}
    (service,) = documents(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] > int(env["SERVING_GRACEFUL_TIMEOUT"])
    unit = (DEPLOY / "systemd" / "serving.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert stop > default


def test_the_example_secret_is_refused_until_replaced(tmp_path: Path) -> None:
    (secret,) = documents(K8S / "secret.example.yaml")
    for key, value in secret["stringData"].items():
        path = tmp_path / key
        path.write_text(value + "\n")
        with pytest.raises(ConfigError, match="at least 16 printable ASCII characters without spaces"):
            Gate(Settings(api_keys_file=str(path)))
    path.write_text(API_KEY + "\n")
    assert Gate(Settings(api_keys_file=str(path))).keys_on


def test_the_dockerfile_has_what_the_issue_asks() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile and "STOPSIGNAL SIGTERM" in dockerfile
    assert re.search(r"HEALTHCHECK .*\n.*/health/ready", dockerfile)
    assert {"FROM base AS onnx", "FROM base AS full"} <= set(dockerfile.splitlines())
    assert dockerfile.count("pip uninstall -y -q pip setuptools") == 2  # no pip in either final venv
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and not {"!.venv", "!reports", "!tests", "!.git"} & set(ignored)  # an allowlist


# --- systemd ----------------------------------------------------------------------------------------

def test_the_systemd_unit_verifies_and_gunicorn_notifies(tmp_path: Path) -> None:
    """Type=notify is right only because gunicorn's master sends READY=1 once it listens (checked in the
    installed gunicorn); systemd-analyze verify must print nothing at all (it exits 0 on unknown keys)."""
    import gunicorn.arbiter

    assert 'sd_notify("READY=1' in inspect.getsource(gunicorn.arbiter.Arbiter.start)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    unit = (DEPLOY / "systemd" / "serving.service").read_text()
    assert "Type=notify" in unit and "KillMode=mixed" in unit
    serving = Path(sys.executable).with_name("serving")  # the venv's command, installed with the package
    copy_path = tmp_path / "serving.service"
    copy_path.write_text(unit.replace("/opt/serving/venv/bin/serving", str(serving)))
    result = subprocess.run([analyze, "verify", str(copy_path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    copy_path.write_text(unit.replace("KillMode=mixed", "KillMode=blend"))  # the check can fail
    result = subprocess.run([analyze, "verify", str(copy_path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert "kill mode" in result.stderr.lower()


# --- a real server -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_manifest_probe_paths_answer_200_without_a_key_on_a_real_server(server_factory: Any, tmp_path: Path) -> None:
    """The base ConfigMap's settings (keys from files, any Host) on a real server: the probes of the Deployment and
    of the ServingRuntime answer 200 to a kubelet that has no key and uses the pod's IP as Host."""
    (config,) = documents(K8S / "base" / "configmap.yaml")
    (tmp_path / "api-keys").write_text(API_KEY + "\n")
    (tmp_path / "admin-keys").write_text(ADMIN_KEY + "\n")
    settings = {key[len(PREFIX):].lower(): value for key, value in config["data"].items()
                if key not in ("SERVING_BIND", "SERVING_GRPC_BIND", "SERVING_MODEL_REPOSITORY")}
    settings.update(api_keys_file=tmp_path / "api-keys", admin_keys_file=tmp_path / "admin-keys", backend="onnx")
    server = server_factory(**settings).start()
    deployment = documents(K8S / "base" / "deployment.yaml")[0]
    container = pod_container(deployment)
    paths = {container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe")}
    paths |= {runtime_container()[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")}
    assert len(paths) == 4
    # the readiness probe: grpc.health.v1's Check for the whole server (service ""), as the kubelet sends it
    with grpc.insecure_channel(server.grpc_target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    pod_host = {"Host": f"10.1.2.3:{container['ports'][0]['containerPort']}"}
    for path in sorted(paths):
        assert requests.get(server.url + path, headers=pod_host, timeout=5).status_code == 200, path
    # /metrics, scraped by IP too, needs the admin key; inference needs a key.
    assert requests.get(server.url + "/metrics", headers=pod_host, timeout=5).status_code == 401
    admin = {**pod_host, "Authorization": f"Bearer {ADMIN_KEY}"}
    assert requests.get(server.url + "/metrics", headers=admin, timeout=5).status_code == 200
    assert requests.post(server.url + "/predict", json=SAMPLE, headers=pod_host, timeout=5).status_code == 401
