"""A small kustomize, for the features deploy/k8s uses: enough to render the overlays without the binary.

Supported ``kustomization.yaml`` fields: ``resources`` (files, or folders with a kustomization),
``namespace``, ``images`` (``name`` -> ``newName`` / ``newTag``) and ``patches`` with a ``path`` to a
strategic-merge patch, matched by kind and name. Strategic merge follows Kubernetes' merge keys for the
lists deploy/k8s patches (containers, env, volumes by ``name``; volumeMounts by ``mountPath``; ports by
``containerPort``); other lists are replaced. Any other field is refused, so that a manifest using a
feature this does not implement fails here instead of rendering wrong. ``tests/deploy/test_deploy.py`` compares
the result with the rendered files that real kustomize (``kubectl kustomize``) wrote to deploy/k8s/rendered/.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
#: Kubernetes' patchMergeKey for the lists deploy/k8s patches.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
#: Kinds without a namespace, which the namespace field leaves alone.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def build(folder: Path) -> list[dict[str, Any]]:
    """The resources ``folder``'s kustomization.yaml renders to."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml uses {sorted(unknown)}, which tests/kustomize.py does not"
                         " implement: extend it or compare against kubectl kustomize only")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = (folder / entry).resolve()
        resources += build(target) if target.is_dir() else load_documents(target)
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise ValueError(f"{folder}: only patches with a path are implemented, not {patch_entry}")
        for patch in load_documents(folder / patch_entry["path"]):
            matches = [r for r in resources if r["kind"] == patch["kind"]
                       and r["metadata"]["name"] == patch["metadata"]["name"]]
            if len(matches) != 1:
                raise ValueError(f"patch {patch_entry['path']} matches {len(matches)} resources")
            merged = strategic_merge(matches[0], patch)
            resources[resources.index(matches[0])] = merged
    for image in kustomization.get("images", []):
        for resource in resources:
            _set_images(resource, image)
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """``patch`` merged into a copy of ``base``: maps recursively, lists with a merge key by that key."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        # As kustomize orders them: the patch's items first (merged into their originals), then the rest.
        key = MERGE_KEYS[field]
        originals = {item.get(key): item for item in base}
        merged_list = [strategic_merge(originals[item.get(key)], item, "") if item.get(key) in originals
                       else copy.deepcopy(item) for item in patch]
        patched = {item.get(key) for item in patch}
        return merged_list + [copy.deepcopy(item) for item in base if item.get(key) not in patched]
    return copy.deepcopy(patch)


def _set_images(resource: dict[str, Any], image: dict[str, str]) -> None:
    pod = resource.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        reference = container["image"]
        split = reference.rfind(":") if reference.rfind(":") > reference.rfind("/") else len(reference)
        name, tag = reference[:split], reference[split + 1:]
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
