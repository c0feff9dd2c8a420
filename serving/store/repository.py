"""The model repository on disk: ``<root>/<model>/<version>/`` with artifacts and ``metadata.json``.

Layout of one version directory (written by ``train.py``)::

    models/digits-tf/1/
        model.keras | model.pt     native artifact (Keras v3 archive / TorchScript)
        model.onnx                 ONNX export of the same network
        labels.json                ["0", "1", ...]
        sample.json                {"data": [[...]], "label": "3"}: a labelled smoke-test sample
                                   (label null when unknown: a synthetic sample of an import)
        metadata.json              see ``ModelMetadata``

Names and versions are validated against a strict pattern before any path is built, so a model
name such as ``../../etc`` can never escape the repository root.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from serving.errors import ModelLoadError, ModelNotFound

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NATIVE_ARTIFACTS = {"tensorflow": "model.keras", "pytorch": "model.pt"}  # what train.py writes
ONNX_ARTIFACT = "model.onnx"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def where(version_dir: Path, filename: str = "metadata.json") -> str:
    """A file of a version as answers and logs name it, ``model.onnx of digits-torch:2``: never the
    server path where it lies."""
    return f"{filename} of {version_dir.parent.name}:{version_dir.name}"


def valid_name(name: str) -> bool:
    """True for a model name that is safe to use as one path component."""
    return bool(NAME_PATTERN.match(name)) and ".." not in name


def list_versions(model_dir: Path) -> list[int]:
    """The integer versions present under a model directory, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(root: Path, name: str) -> int:
    """The version number a new training run of ``name`` should write: latest + 1, or 1."""
    versions = list_versions(root / name)
    return versions[-1] + 1 if versions else 1


#: What a model's one input tensor holds: an image (H x W pixels: uploads, the drawing pad and
#: 8-bit pixel scales apply) or a feature vector (a row of N values, each with a name).
INPUT_KINDS = ("image", "features")
UNBOUNDED = (-math.inf, math.inf)


@dataclass(frozen=True)
class Feature:
    """One value of a feature vector: its name and, when known, the range seen in training (a
    description, not a limit: ``input.range`` is the limit, when the model has one)."""

    name: str
    range: tuple[float, float] | None = None


@dataclass(frozen=True)
class ModelMetadata:
    """What ``metadata.json`` says about one model version."""

    name: str
    version: int
    framework: str
    path: Path
    input_name: str
    input_shape: tuple[int, ...]  # one sample, without the batch dimension: (8, 8), or (4,)
    input_dtype: str
    input_range: tuple[float, float]  # values outside are refused; UNBOUNDED for most features
    output_name: str
    labels: list[str]
    raw: dict[str, Any]
    input_kind: str = "image"
    features: tuple[Feature, ...] = ()

    @property
    def is_image(self) -> bool:
        """True for an image model (H x W pixels), False for a feature-vector model."""
        return self.input_kind == "image"

    @property
    def bounded(self) -> bool:
        """Whether the input has a range values must lie in (images always; features when the
        model's metadata sets one)."""
        return self.input_range != UNBOUNDED

    def describe_input(self) -> str:
        """The input in words, for messages: ``28x28 pixels`` or ``4 features (a, b, ...)``."""
        if self.is_image:
            return "x".join(str(d) for d in self.input_shape) + " pixels"
        names = ", ".join(feature.name for feature in self.features[:8])
        more = ", ..." if len(self.features) > 8 else ""
        return f"{self.sample_size} features" + (f" ({names}{more})" if names else "")

    @property
    def sample_size(self) -> int:
        """Number of values in one flat sample."""
        size = 1
        for dim in self.input_shape:
            size *= dim
        return size

    def verify(self, filename: str) -> None:
        """Refuse a version whose files differ from what its metadata.json records.

        ``filename`` (the artifact the backend loads) must exist; every other file in the folder, in
        subfolders too, must be listed with a sha256 and match it, so an unlisted file (an ONNX
        external-data file, a script dropped in) is refused like a modified one. This detects
        corruption and accidents; against an attacker who can write the folder, pin metadata.json's
        own digest out of band (``SERVING_MODEL_SHA256``).
        """
        artifacts = self.raw.get("artifacts", {})
        if not (self.path / filename).is_file():
            raise ModelLoadError(
                f"{where(self.path, filename)} is missing: this backend loads it (retrain, import"
                " the model, or choose the backend that fits its files)"
            )
        if not artifacts.get(filename, {}).get("sha256"):
            raise ModelLoadError(f"{where(self.path)} records no sha256 for {filename}")
        for path in sorted(self.path.rglob("*")):
            if path.is_dir() or path == self.path / "metadata.json":
                continue
            expected = artifacts.get(path.relative_to(self.path).as_posix(), {}).get("sha256")
            if not expected:
                raise ModelLoadError(
                    f"{where(self.path, path.relative_to(self.path).as_posix())} is not listed with"
                    " a sha256 in metadata.json; refusing a version"
                    " with files nobody recorded"
                )
            actual = sha256_file(path)
            if actual != expected:
                raise ModelLoadError(
                    f"{where(self.path, path.relative_to(self.path).as_posix())} was modified after"
                    f" training (sha256 {actual[:12]}... != recorded "
                    f"{expected[:12]}...);"
                    " refusing to load it"
                )

    @property
    def verified(self) -> bool:
        """False for a TF Serving folder, whose files no metadata.json records."""
        return not self.raw.get("unverified")

    def sample(self) -> tuple[list[Any], str | None]:
        """The stored smoke-test sample and its label: a real labelled sample (from training, or
        ``serving import --sample``), or ``None`` for the label when nobody knows it (a synthetic
        sample; a TF Serving folder: a blank one)."""
        if not (self.path / "sample.json").is_file():
            if self.verified:
                raise ModelLoadError(f"{where(self.path, 'sample.json')} is missing")
            return [0.0] * self.sample_size, None
        raw = orjson.loads((self.path / "sample.json").read_bytes())
        label = raw.get("label")
        return raw["data"], None if label is None else str(label)


class ModelRepository:
    """Read access to a model repository root."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def models(self) -> list[str]:
        """Model names with at least one version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and valid_name(p.name) and list_versions(p)
        )

    def index(self) -> list[tuple[str, int]]:
        """Every (model, version) on disk, sorted."""
        return [
            (name, version) for name in self.models() for version in list_versions(self.root / name)
        ]

    def select(self, spec: str) -> list[tuple[str, int]]:
        """The (model, version) pairs a ``SERVING_MODELS`` value names, in order, without repeats.

        ``*`` is every version of every model; ``name`` its latest version, ``name:N`` version N and
        ``name:*`` every version of it. ModelNotFound when a named model or version is absent.
        """
        if spec.strip() == "*":
            return self.index()
        chosen: list[tuple[str, int]] = []
        for entry in (part.strip() for part in spec.split(",") if part.strip()):
            name, _, version = entry.partition(":")
            if version == "*":
                self.resolve(name)  # refuses an unknown or unsafe name with the usual message
                pairs = [(name, v) for v in list_versions(self.root / name)]
            else:
                pairs = [(name, self.resolve(name, int(version) if version else None).version)]
            chosen.extend(pair for pair in pairs if pair not in chosen)
        return chosen

    def resolve(self, name: str, version: int | None = None) -> ModelMetadata:
        """Metadata of ``name`` at ``version`` (latest when None); ModelNotFound when absent."""
        if not valid_name(name):
            raise ModelNotFound(f"invalid model name {name!r}")
        versions = list_versions(self.root / name)
        if not versions:
            known = ", ".join(self.models()) or "none"
            raise ModelNotFound(
                f"no model {name!r} in {self.root}/ (models there: {known}); run `python train.py`"
            )
        if version is None:
            version = versions[-1]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version} (versions: {versions})")
        meta = self.load_metadata(self.root / name / str(version))
        # a copied directory would be served under a wrong id
        if (meta.name, meta.version) != (name, version):
            raise ModelLoadError(
                f"{where(meta.path)} says {meta.name} version {meta.version}; it must match "
                "its directory"
            )
        return meta

    @staticmethod
    def load_metadata(path: Path) -> ModelMetadata:
        """Parse and check one version directory's ``metadata.json``; a TF Serving folder without
        one (``saved_model.pb``) is described from its signature instead
        (``serving.store.tfserving``)."""
        meta_path = path / "metadata.json"
        try:
            raw = orjson.loads(meta_path.read_bytes())
        except FileNotFoundError as exc:
            if (path / "saved_model.pb").is_file():
                from serving.store.tfserving import metadata_for

                return parse_metadata(metadata_for(path, path.parent.name, int(path.name)), path)
            raise ModelLoadError(
                f"{where(path)} is missing: retrain with `python train.py`, or import the model"
                " with `serving import`"
            ) from exc
        except orjson.JSONDecodeError as exc:
            raise ModelLoadError(
                f"{where(path)} is corrupt ({exc.__class__.__name__}: {exc})"
            ) from exc
        return parse_metadata(raw, path)


def parse_metadata(raw: Any, path: Path) -> ModelMetadata:
    """A ``ModelMetadata`` from the parsed ``metadata.json`` of the version directory ``path``."""
    try:
        spec = raw["input"]
        kind = str(spec.get("kind", "image"))
        if kind not in INPUT_KINDS:
            raise ValueError(f"input.kind {kind!r} is not one of {', '.join(INPUT_KINDS)}")
        shape = tuple(int(d) for d in spec["shape"])
        if kind == "image" and (len(shape) != 2 or min(shape) < 1):
            raise ValueError(f"an image input has a shape [H, W], not {list(shape)}")
        if kind == "features" and (len(shape) != 1 or shape[0] < 1):
            raise ValueError(f"a feature input has a shape [N], not {list(shape)}")
        bounds = spec.get("range")
        if bounds is None and kind == "image":
            raise ValueError("an image input needs its range")
        features = tuple(_feature(entry) for entry in spec.get("features") or ())
        if features and len(features) != shape[0]:
            raise ValueError(f"{len(features)} features are named for an input of {shape[0]}")
        return ModelMetadata(
            name=str(raw["name"]),
            version=int(raw["version"]),
            framework=str(raw["framework"]),
            path=path,
            input_name=str(spec["name"]),
            input_shape=shape,
            input_dtype=str(spec["dtype"]),
            input_range=UNBOUNDED if bounds is None else (float(bounds[0]), float(bounds[1])),
            output_name=str(raw["output"]["name"]),
            labels=[str(label) for label in raw["labels"]],
            raw=raw,
            input_kind=kind,
            features=features,
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"{where(path)} is corrupt ({exc.__class__.__name__}: {exc})") from exc


def _feature(entry: Any) -> Feature:
    """One entry of ``input.features``: ``{"name": ..., "range": [low, high] | null}``."""
    bounds = entry.get("range")
    return Feature(
        str(entry["name"]), None if bounds is None else (float(bounds[0]), float(bounds[1]))
    )
