"""The registry's rules for INT8 versions and runtimes."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from contracts.registry import Registry, Runtime, load_registry, parse_model_ref

FP32 = {
    "name": "m",
    "version": 1,
    "runtime": "openvino",
    "architecture": "MobileNetV2",
    "weights": "imagenet",
    "input": {"height": 224, "width": 224},
    "preprocessing": "mobilenet_v2",
}
INT8 = {**FP32, "version": 2, "architecture": None, "precision": "int8", "quantized_from": "m@1", "file": "q.xml"}


def registry(*models: dict[str, Any]) -> Registry:
    return Registry.model_validate({"default_order": ["m"], "models": list(models)})


def test_an_int8_version_names_its_fp32_source() -> None:
    reg = registry(FP32, INT8)
    assert reg.get("m@2").quantized_from == "m@1"
    with pytest.raises(ValidationError, match="quantized_from"):
        registry(FP32, {**INT8, "quantized_from": None})
    with pytest.raises(ValidationError, match="unknown entries"):
        registry(FP32, {**INT8, "quantized_from": "m@7"})


def test_only_openvino_files_are_quantized() -> None:
    with pytest.raises(ValidationError, match="OpenVINO model files"):
        registry(FP32, {**INT8, "runtime": "keras"})
    with pytest.raises(ValidationError, match="only it does"):
        registry({**FP32, "quantized_from": "m@1"})


def test_the_shipped_registry_serves_imagenet_models_through_openvino() -> None:
    reg = load_registry()
    for key in ("resnet50@1", "mobilenet_v2@1", "resnet50_random@1"):
        assert reg.get(key).runtime == Runtime.openvino and reg.get(key).precision == "fp32"
    for key, source in (("resnet50@2", "resnet50@1"), ("mobilenet_v2@2", "mobilenet_v2@1")):
        entry = reg.get(key)
        assert entry.precision == "int8" and entry.quantized_from == source and entry.channel == "canary"
    # An INT8 copy of the random ResNet50 is as benchmark-only and as random as its source.
    assert reg.get("resnet50_random@2").benchmark_only and reg.get("resnet50_random@2").weights == "random"


def test_a_worker_serves_the_versions_it_is_told() -> None:
    reg = load_registry()
    served = [m.key for m in reg.served(benchmark_mode=False)]
    assert [m.key for m in reg.selected("", benchmark_mode=False)] == served
    assert [m.key for m in reg.selected(" mobilenet_v2@1 ", benchmark_mode=False)] == ["mobilenet_v2@1"]
    # A bare name takes every version; the order is the registry's, duplicates collapse.
    both = reg.selected("sketch,mobilenet_v2@2,sketch@1", benchmark_mode=False)
    assert [m.key for m in both] == [k for k in served if k.startswith("sketch@") or k == "mobilenet_v2@2"]
    assert len([m for m in both if m.name == "sketch"]) >= 2
    with pytest.raises(ValueError, match="'nope' matches no model version served here"):
        reg.selected("mobilenet_v2,nope", benchmark_mode=False)
    with pytest.raises(ValueError, match="mobilenet_v2@9"):
        reg.selected("mobilenet_v2@9", benchmark_mode=False)
    # Benchmark-only entries exist only in benchmark mode.
    with pytest.raises(ValueError, match="resnet50_random"):
        reg.selected("resnet50_random", benchmark_mode=False)
    assert [m.key for m in reg.selected("resnet50_random@1", benchmark_mode=True)] == ["resnet50_random@1"]


@pytest.mark.parametrize("ref", ["sketch@x", "sketch@", "sketch@-1", "sketch@１", "sketch@²", "sketch@1.0"])
def test_a_version_is_ascii_digits_only(ref: str) -> None:
    """A full-width or superscript digit is no version number, though Python's int() reads one."""
    with pytest.raises(ValueError, match="expected name@<number>"):
        parse_model_ref(ref)
    assert parse_model_ref("sketch@12") == ("sketch", 12) and parse_model_ref(" sketch ") == ("sketch", None)


def test_an_input_refuses_keys_it_does_not_know() -> None:
    """A misspelt ``mode`` was dropped: the version was fed RGB images, the default."""
    with pytest.raises(ValidationError, match=r"input\.mdoe\n  Extra inputs are not permitted"):
        registry({**FP32, "input": {"height": 224, "width": 224, "mdoe": "L"}})
    assert registry({**FP32, "input": {"height": 224, "width": 224, "mode": "L"}}).get("m@1").input.mode == "L"


def test_a_bare_name_finds_a_stable_version_never_a_canary() -> None:
    """A model none of whose versions is promoted yet (registered a moment ago: canaries at weight
    0) answers no request by its name alone; each version still answers when named."""
    canaries = registry({**FP32, "channel": "canary"}, {**FP32, "version": 2, "channel": "shadow"})
    assert canaries.find("m", None, benchmark_mode=False) is None
    assert canaries.find("m", 1, benchmark_mode=False) == canaries.get("m@1")
    assert canaries.find("m", 2, benchmark_mode=False) == canaries.get("m@2")
    promoted = registry({**FP32, "channel": "stable"}, {**FP32, "version": 2, "channel": "canary"})
    assert promoted.find("m", None, benchmark_mode=False) == promoted.get("m@1")
    # Of several stable versions (left by an older release), the newest.
    both = registry({**FP32, "channel": "stable"}, {**FP32, "version": 2, "channel": "stable"})
    found = both.find("m", None, benchmark_mode=False)
    assert found is not None and found.version == 2
