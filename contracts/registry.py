"""The model registry: which model versions exist, how to load them and how to feed them.

Both services read the same file (``model/registry.yaml`` unless ``REGISTRY_PATH`` says
otherwise): the model service to load the models, the API to validate requests and to list them.
Paths may use ``{models_dir}`` (external weights) and ``{trained_dir}`` (the project's own
trained models).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_REGISTRY_PATH = Path(__file__).resolve().parent.parent / "model" / "registry.yaml"


class Runtime(StrEnum):
    keras = "keras"
    tflite = "tflite"
    openvino = "openvino"


class Preprocessing(StrEnum):
    """How an image becomes a model input; each name maps to one function in the model service."""

    resnet50 = "resnet50"
    mobilenet_v2 = "mobilenet_v2"
    uint8 = "uint8"
    sketch = "sketch"


class InputSpec(BaseModel):
    """The size and colour mode a version's input is resized and converted to."""

    # A misspelt key ("mdoe") would otherwise be dropped, and the version fed RGB images it
    # was never trained on, while its registration answered as if all was said.
    model_config = ConfigDict(extra="forbid")

    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    mode: Literal["RGB", "L"] = "RGB"


Channel = Literal["stable", "canary", "shadow", "retired"]
"""A version's role: ``stable`` answers by default, ``canary`` takes a share of traffic set by its
weight, ``shadow`` receives a copy of traffic whose answers are kept but never returned, ``retired``
is kept for the record and served no more."""

MAX_VERSION = 1_000_000
"""Highest version number an operator may give a version: versions count up one at a time, so a
larger one is a typo, and one near PostgreSQL's integer limit would leave no next number for the
model's training runs and registrations."""

MAX_WEIGHT = 1_000_000
"""Highest traffic weight a version may have: weights are shares of a model's traffic, so a larger
one is a typo, and the registry refuses to store a weight its entries could not hold."""

STATE_FIELDS = frozenset({"name", "version", "channel", "enabled", "weight", "display_name"})
"""A version's identity and the state operators change; the other fields say how to load and feed it."""


class ModelEntry(BaseModel):
    """One model version."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", max_length=64)
    version: int = Field(ge=1, le=2**31 - 1)
    channel: Channel = "stable"
    weight: int | None = Field(default=None, ge=0, le=MAX_WEIGHT)
    """Share of the model's traffic among its enabled versions; None: 100 for a stable version, else 0."""
    display_name: str | None = Field(default=None, max_length=200)
    """What people are shown; None: ``name@version``."""
    description: str = ""
    runtime: Runtime = Runtime.keras
    precision: Literal["fp32", "int8"] = "fp32"
    """Arithmetic of the served model; ``int8`` versions are quantized from ``quantized_from``."""
    quantized_from: str | None = None
    """``name@version`` of the FP32 entry an INT8 version is quantized from by ``model.prepare``."""
    architecture: str | None = None
    """A ``keras.applications`` class name, built here and given weights below."""
    weights: Literal["imagenet", "file", "random"] = "file"
    """``imagenet``: a local file when present, else Keras' own download; ``random``: benchmark only."""
    file: str | None = None
    """Weights (``architecture`` set) or a whole model file (.keras, .tflite)."""
    input: InputSpec
    preprocessing: Preprocessing
    labels: str = "imagenet"
    """``imagenet`` for the 1000 ImageNet classes, else a text file with one label per line."""
    top_k: int = 5
    enabled: bool = True
    benchmark_only: bool = False
    """Served only when ``BENCHMARK_MODE=true`` and never listed to users."""
    training: dict[str, Any] | None = None
    """For models this project trains: the trainer's options, used when the file is missing."""

    @model_validator(mode="after")
    def _check(self) -> ModelEntry:
        if self.weights == "random" and not self.benchmark_only:
            raise ValueError(f"{self.key}: random weights are only allowed for benchmark_only models")
        if self.architecture is None and self.file is None:
            raise ValueError(f"{self.key}: needs an architecture or a file")
        if (self.precision == "int8") != (self.quantized_from is not None):
            raise ValueError(f"{self.key}: an int8 version names the entry it is quantized_from, and only it does")
        if self.quantized_from is not None and (self.runtime != Runtime.openvino or self.file is None):
            raise ValueError(f"{self.key}: quantized versions are OpenVINO model files")
        return self

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def traffic_weight(self) -> int:
        """``weight``, or its default: 100 for a stable version, 0 for the others."""
        if self.weight is not None:
            return self.weight
        return 100 if self.channel == "stable" else 0

    def spec(self) -> dict[str, Any]:
        """How to load and feed this version, as JSON: everything but ``STATE_FIELDS``."""
        return self.model_dump(mode="json", exclude=set(STATE_FIELDS))

    def resolve(self, template: str, *, models_dir: Path, trained_dir: Path) -> Path:
        return Path(template.format(models_dir=models_dir, trained_dir=trained_dir))


class Registry(BaseModel):
    default_order: list[str]
    """Model names tried in order for a request that names none."""
    models: list[ModelEntry]

    @model_validator(mode="after")
    def _unique(self) -> Registry:
        keys = [m.key for m in self.models]
        dupes = {k for k in keys if keys.count(k) > 1}
        if dupes:
            raise ValueError(f"duplicate model versions: {sorted(dupes)}")
        sources = [m.quantized_from for m in self.models if m.quantized_from and m.quantized_from not in keys]
        if sources:
            raise ValueError(f"quantized_from names unknown entries: {sources}")
        names = {m.name for m in self.models}
        unknown = [n for n in self.default_order if n not in names]
        if unknown:
            raise ValueError(f"default_order names unknown models: {unknown}")
        return self

    def served(self, *, benchmark_mode: bool) -> list[ModelEntry]:
        """The enabled entries a deployment serves (a retired version is served no more)."""
        return [
            m for m in self.models if m.enabled and m.channel != "retired" and (benchmark_mode or not m.benchmark_only)
        ]

    def selected(self, refs: str, *, benchmark_mode: bool) -> list[ModelEntry]:
        """The served entries ``refs`` names (``"resnet50@1,sketch"``; a bare name takes every
        version), in registry order; every served entry when ``refs`` is empty.

        Raises ValueError for a reference that matches nothing served: a worker told to serve a
        model it cannot must say so at start-up, not sit idle.
        """
        served = self.served(benchmark_mode=benchmark_mode)
        wanted = [parse_model_ref(ref) for ref in refs.split(",") if ref.strip()]
        if not wanted:
            return served
        chosen: set[str] = set()
        for name, version in wanted:
            matches = {m.key for m in served if m.name == name and version in (None, m.version)}
            if not matches:
                ref = name if version is None else f"{name}@{version}"
                raise ValueError(
                    f"{ref!r} matches no model version served here; served: {', '.join(m.key for m in served)}"
                )
            chosen |= matches
        return [m for m in served if m.key in chosen]

    def public(self) -> list[ModelEntry]:
        """The entries shown to users (never the benchmark-only ones, nor shadows)."""
        return [m for m in self.served(benchmark_mode=False) if m.channel != "shadow"]

    def get(self, key: str) -> ModelEntry:
        return next(m for m in self.models if m.key == key)

    def keras_twin(self, key: str) -> ModelEntry | None:
        """The entry whose Keras graph explains version ``key`` (Grad-CAM needs gradients): the
        entry itself when it is a Keras model or an OpenVINO conversion of a ``keras.applications``
        class; for an INT8 version, the FP32 entry it was quantized from. None when there is none
        (TFLite files, OpenVINO files of unknown origin) or its weights are random."""
        entry = next((m for m in self.models if m.key == key), None)
        if entry is not None and entry.quantized_from is not None:
            entry = next((m for m in self.models if m.key == entry.quantized_from), None)
        if entry is None or entry.weights == "random":
            return None
        if entry.runtime == Runtime.keras or (entry.runtime == Runtime.openvino and entry.architecture):
            return entry
        return None

    def find(self, name: str, version: int | None, *, benchmark_mode: bool) -> ModelEntry | None:
        """The served version ``name@version``; ``version=None`` means the newest served stable
        version of ``name``. None when there is none: a bare name never falls back to a canary or
        a shadow, so a model none of whose versions is promoted yet (one registered a moment ago,
        a canary at weight 0) answers no request by its bare name, only when a version is pinned
        (``doodle@1``), as any canary does."""
        candidates = [m for m in self.served(benchmark_mode=benchmark_mode) if m.name == name]
        if version is not None:
            return next((m for m in candidates if m.version == version), None)
        return max((m for m in candidates if m.channel == "stable"), key=lambda m: m.version, default=None)


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """``"sketch@2"`` -> ``("sketch", 2)``; ``"sketch"`` -> ``("sketch", None)``."""
    name, sep, version = ref.strip().partition("@")
    if not sep:
        return name, None
    if not (version.isascii() and version.isdigit()):  # str.isdigit takes "１" and "²" too
        raise ValueError(f"invalid model version in {ref!r}: expected name@<number>")
    return name, int(version)


def load_registry(path: Path | str = DEFAULT_REGISTRY_PATH) -> Registry:
    with open(path, encoding="utf-8") as fh:
        return Registry.model_validate(yaml.safe_load(fh))


class RegistryUnreadable(Exception):
    """REGISTRY_PATH names no file that can be read; the message, one line, says which and why."""


def read_registry(path: Path | str) -> Registry:
    """The registry file REGISTRY_PATH names (``load_registry``). Raises RegistryUnreadable,
    naming the variable and the path, for a file that is missing, cannot be opened or read as
    UTF-8 YAML, or is not a registry (its first problem by place, never the file's text: the
    variable may name any file)."""
    try:
        return load_registry(path)
    except FileNotFoundError:
        raise RegistryUnreadable(f"REGISTRY_PATH={path}: no such file") from None
    except OSError as exc:
        raise RegistryUnreadable(f"REGISTRY_PATH={path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, yaml.YAMLError):
        raise RegistryUnreadable(f"REGISTRY_PATH={path}: not a YAML file") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise RegistryUnreadable(
            f"REGISTRY_PATH={path}: not a model registry ({exc.error_count()} problem(s); {where}: {first['msg']})"
        ) from None
