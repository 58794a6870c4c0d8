"""deploy/k8s checked against the code, with no cluster: each overlay renders, its built-in objects
pass the Kubernetes schemas strictly, its custom resources have the shape KEDA and the Prometheus
Operator read, and what the manifests name (settings, streams, routes, ports, body limits, images,
commands, secrets, who talks to PostgreSQL and Redis) is what the code has."""

from __future__ import annotations

import asyncio
import copy
import functools
import importlib.util
import inspect
import ipaddress
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from alembic.script import ScriptDirectory
from pydantic import AliasChoices
from pydantic_settings import BaseSettings
from sqlalchemy.engine import make_url

from api.app.core.body_limits import BATCH_PATHS, UPLOAD_PATHS, BodyLimitMiddleware
from api.app.core.config import Settings
from api.app.core.startup import asyncpg_dsn
from contracts import keys
from contracts.registry import Registry, load_registry
from model.config import ModelSettings
from tests.support import ROOT
from ui.config import UISettings, get_ui_settings

K8S = ROOT / "deploy" / "k8s"
SCRIPTS = K8S / "base" / "scripts"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
"""The oldest Kubernetes the manifests are meant for, and the newest the validator knows."""
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
"""Custom resources: no schema in the validator, checked by their own tests below."""
SETTINGS: dict[str, type[BaseSettings]] = {"api": Settings, "model": ModelSettings, "ui": UISettings}
"""The settings class of each image's processes (the trainer's is the model service's)."""
SECRET = "portal-secrets"
PLACEHOLDERS = {
    "SECRET_KEY": "k" * 48,
    "DATABASE_URL": "postgresql+asyncpg://portal:secret@postgres:5432/portal",
    "REDIS_URL": "redis://:secret@redis:6379/0",
    "FIRST_ADMIN_EMAIL": "admin@example.com",
    "FIRST_ADMIN_PASSWORD": "a-password-long-enough",
}
"""Stand-ins for the Secret's values, shaped as the settings accept them."""

Obj = dict[str, Any]


@functools.cache
def _rendered(overlay: str) -> str:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(overlay: str) -> list[Obj]:
    """The overlay's objects, parsed afresh for each caller (a test may change its copy)."""
    return [obj for obj in yaml.safe_load_all(_rendered(overlay)) if obj]


def named(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: list[Obj]) -> dict[str, Obj]:
    """Deployments and Jobs by name."""
    return {o["metadata"]["name"]: o for o in objs if o["kind"] in ("Deployment", "Job")}


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def main_container(workload: Obj) -> Obj:
    [container] = pod_spec(workload)["containers"]
    return container


def image_name(container: Obj) -> str:
    """The image without its tag: image-portal/api."""
    return str(container["image"]).rsplit(":", 1)[0]


def service_of(container: Obj) -> str:
    """Which Dockerfile and settings a container's image comes from: api, model or ui."""
    name = image_name(container)
    # An overlay's newName may put a registry in front: registry.example.com/image-portal/api.
    match = re.search(r"(?:^|/)image-portal/(api|model|ui)$", name)
    assert match, name
    return match[1]


def literal_env(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def env_names(container: Obj) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def effective(container: Obj) -> Any:
    """The settings the container's process would read (its image's class, from its environment;
    values it takes from the Secret replaced by stand-ins)."""
    cls = SETTINGS[service_of(container)]
    env = {**literal_env(container)}
    for e in container.get("env", []):
        if "valueFrom" in e:
            env[e["name"]] = PLACEHOLDERS[e["name"]]
    if cls is Settings:
        # A container without SECRET_KEY (the schema wait) would make the settings write a key file.
        env.setdefault("SECRET_KEY", PLACEHOLDERS["SECRET_KEY"])
    saved = dict(os.environ)
    try:
        for name in setting_env_names(cls):
            os.environ.pop(name, None)
        os.environ.update(env)
        return cls(_env_file=None)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def setting_env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variables a pydantic-settings class reads: upper-cased field names behind
    its env_prefix, or a field's alias(es) instead (aliases take no prefix)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias or field.alias
        if isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names |= {c.upper() for c in alias.choices if isinstance(c, str)}
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def deployed_registry(objs: list[Obj]) -> Registry:
    """The registry the ConfigMap mounts (what is served), parsed as the services parse it."""
    [configmap] = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("registry-")]
    return Registry.model_validate(yaml.safe_load(configmap["data"]["registry.yaml"]))


def pools(objs: list[Obj]) -> dict[str, set[str]]:
    """Each worker Deployment (running ``python -m model``) and the stream of every version its
    SERVE_MODELS selects from the deployed registry."""
    registry = deployed_registry(objs)
    out: dict[str, set[str]] = {}
    for name, workload in workloads(objs).items():
        container = main_container(workload)
        if container.get("command") == ["python", "-m", "model"]:
            settings = effective(container)
            out[name] = {keys.job_stream(e.name, e.version) for e in settings.served_entries(registry)}
    return out


def nginx_bytes(size: str) -> int:
    """An nginx size (client_max_body_size): bytes, or k/m/g for KiB, MiB, GiB."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", size)
    assert match, size
    return int(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")


def ingress_for(ingresses: list[Obj], host: str, path: str) -> Obj:
    """The Ingress ingress-nginx routes ``host``+``path`` (as nginx decoded it) by: an Exact path,
    else the longest prefix. A Prefix path matches whole path elements; an ImplementationSpecific
    one (no regex annotation) becomes a plain nginx prefix location, matching any path that starts
    with it."""
    best: tuple[int, Obj] | None = None
    for ingress in ingresses:
        assert "nginx.ingress.kubernetes.io/use-regex" not in ingress["metadata"].get("annotations", {})
        for rule in ingress["spec"]["rules"]:
            if rule["host"] != host:
                continue
            for p in rule["http"]["paths"]:
                if p["pathType"] == "Exact" and p["path"] == path:
                    return ingress
                if p["pathType"] == "ImplementationSpecific":
                    prefix = p["path"]
                    matches = path.startswith(prefix)
                else:
                    prefix = p["path"].rstrip("/")
                    matches = p["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/"))
                if matches and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), ingress)
    assert best is not None, (host, path)
    return best[1]


def dockerfile_final_stage(service: str) -> str:
    """The final stage of ``<service>/Dockerfile``: what the running image has."""
    text = (ROOT / service / "Dockerfile").read_text()
    return text[[m.start() for m in re.finditer(r"^FROM ", text, flags=re.M)][-1] :]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- 1. rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_renders_into_its_namespace_with_pinned_images(overlay: str) -> None:
    objs = render(overlay)
    [namespace] = named(objs, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], obj["metadata"]["name"]
    images = {c["image"] for w in workloads(objs).values() for c in containers(w)}
    assert {service_of({"image": i}) for i in images} == set(SETTINGS)
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), image
    # One release: every image of the overlay carries the same tag.
    assert len({i.rpartition(":")[2] for i in images}) == 1, images


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_built_in_objects_pass_the_strict_schemas(overlay: str, version: str) -> None:
    objs = render(overlay)
    assert {(o["apiVersion"], o["kind"]) for o in objs} >= CUSTOM_KINDS
    checked = 0
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        # Any other custom resource has no schema here and fails (SchemaNotFoundError).
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 25


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_fixed_count_under_an_autoscaler(overlay: str) -> None:
    """An apply would reset the count the autoscaler chose."""
    objs = render(overlay)
    scaled = {
        o["spec"]["scaleTargetRef"]["name"] for o in objs if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    }
    assert scaled == {"api", *pools(objs)}
    for name in scaled:
        assert "replicas" not in named(objs, "Deployment")[name]["spec"], name


def test_strict_validation_refuses_an_unknown_field() -> None:
    """The validator really is strict: a misspelt field fails (else the test above proves nothing)."""
    [api] = [o for o in render("dev") if o["kind"] == "Deployment" and o["metadata"]["name"] == "api"]
    wrong = copy.deepcopy(api)
    wrong["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSIONS[-1], strict=True)


# --- 2. custom resources --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_objects_have_the_shape_keda_reads(overlay: str) -> None:
    objs = render(overlay)
    deployments = named(objs, "Deployment")
    auths = named(objs, "TriggerAuthentication")
    scaled = named(objs, "ScaledObject")
    assert set(scaled) == set(pools(objs))
    for name, obj in scaled.items():
        spec = obj["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        # The API refuses jobs for a model no live worker serves: a pool at zero never sees lag.
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        assert isinstance(spec["cooldownPeriod"], int) and isinstance(spec["pollingInterval"], int)
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] > 0
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis-streams"
            assert trigger["authenticationRef"]["name"] in auths
            metadata = trigger["metadata"]
            assert all(isinstance(v, str) for v in metadata.values()), metadata  # KEDA reads strings
            assert {"stream", "consumerGroup", "databaseIndex"} <= set(metadata)
            # KEDA reads only the lag when a trigger names both, so each trigger names one.
            assert ("lagCount" in metadata) != ("pendingEntriesCount" in metadata), metadata
            if "lagCount" in metadata:
                assert "activationLagCount" in metadata  # required by KEDA with lagCount
    for auth in auths.values():
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        assert set(refs) == {"address", "password"}
        assert {n for n, _ in refs.values()} == {SECRET}


@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_the_service_monitor_scrapes_the_apis_metrics_route(overlay: str) -> None:
    objs = render(overlay)
    [monitor] = named(objs, "ServiceMonitor").values()
    services = [
        s
        for s in named(objs, "Service").values()
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in services] == ["api"]
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    from api.app.main import create_app

    app = create_app(Settings(_env_file=None, secret_key="k" * 48))  # type: ignore[call-arg]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names
            response = await client.get(endpoint["path"])
            assert response.status_code == 200 and "# TYPE" in response.text


# --- 3. the manifests against the code ------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_variables_are_real_settings_with_valid_values(overlay: str) -> None:
    for name, workload in workloads(render(overlay)).items():
        for container in containers(workload):
            cls = SETTINGS[service_of(container)]
            unknown = env_names(container) - setting_env_names(cls)
            assert not unknown, (name, container["name"], unknown)
            effective(container)  # each value parses as its setting's type


def test_setting_names_follow_prefixes_and_aliases() -> None:
    """The helper above reads names as pydantic-settings does, so a prefix cannot hide a typo."""
    from pydantic import Field
    from pydantic_settings import SettingsConfigDict

    class Example(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="portal_")
        plain: int = 0
        renamed: int = Field(default=0, validation_alias="OTHER_NAME")

    assert setting_env_names(Example) == {"PORTAL_PLAIN", "OTHER_NAME"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pool_scales_on_the_streams_and_group_it_consumes(overlay: str) -> None:
    objs = render(overlay)
    deployments = named(objs, "Deployment")
    served = pools(objs)
    for name, obj in named(objs, "ScaledObject").items():
        target = obj["spec"]["scaleTargetRef"]["name"]
        triggers = [t["metadata"] for t in obj["spec"]["triggers"]]
        assert {t["consumerGroup"] for t in triggers} == {keys.JOB_GROUP}, name
        lag = sorted(t["stream"] for t in triggers if "lagCount" in t)
        pending = sorted(t["stream"] for t in triggers if "pendingEntriesCount" in t)
        # One of each per stream, for exactly the streams the pool's workers read.
        assert lag == pending == sorted(served[target]), name
        # A pod holding a full batch counts as busy: the pending target is at most one batch.
        batch = effective(main_container(deployments[target])).max_batch_size
        assert all(int(t["pendingEntriesCount"]) <= batch for t in triggers if "pendingEntriesCount" in t)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_served_version_has_exactly_one_pool(overlay: str) -> None:
    objs = render(overlay)
    served_by = pools(objs)
    assert len(served_by) >= 2
    streams = [s for pool in served_by.values() for s in pool]
    assert len(streams) == len(set(streams)), "two pools on one stream would both scale on its lag"
    for registry in (deployed_registry(objs), load_registry(ROOT / "model" / "registry.yaml")):
        wanted = {keys.job_stream(e.name, e.version) for e in registry.served(benchmark_mode=False)}
        assert set(streams) == wanted


def test_the_deployed_registry_is_the_repositorys() -> None:
    assert (K8S / "base" / "registry.yaml").read_text() == (ROOT / "model" / "registry.yaml").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_registry_path_points_into_the_mounted_configmap(overlay: str) -> None:
    objs = render(overlay)
    for workload in workloads(objs).values():
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        for container in containers(workload):
            path = literal_env(container).get("REGISTRY_PATH")
            if path is None:
                continue
            [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(Path(path).parent)]
            configmap = volumes[mount["name"]]["configMap"]["name"]
            assert Path(path).name in named(objs, "ConfigMap")[configmap]["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_probes_and_ports_are_the_apps(overlay: str) -> None:
    from streamlit.web.server.starlette.starlette_routes import ROUTE_HEALTH

    from api.app.main import create_app

    objs = render(overlay)
    deployments = named(objs, "Deployment")
    services = named(objs, "Service")
    app = create_app(Settings(_env_file=None, secret_key="k" * 48))  # type: ignore[call-arg]

    def port_of(container: Obj, port: str | int) -> int:
        if isinstance(port, int):
            return port
        [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
        return int(number)

    api, ui = main_container(deployments["api"]), main_container(deployments["ui"])
    api_settings, ui_settings = effective(api), effective(ui)
    assert api_settings.api_host == ui_settings.ui_host == "0.0.0.0"
    for container, port, service in ((api, api_settings.api_port, "api"), (ui, ui_settings.ui_port, "ui")):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert port_of(container, container[probe]["httpGet"]["port"]) == port, (service, probe)
        [service_port] = services[service]["spec"]["ports"]
        assert port_of(container, service_port["targetPort"]) == port
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert (await client.get(api[probe]["httpGet"]["path"])).status_code == 200, probe
    assert {ui[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {
        f"/{ROUTE_HEALTH}"
    }
    # The UI reaches the API through its Service.
    url = urlsplit(ui_settings.api_url)
    [api_port] = services["api"]["spec"]["ports"]
    assert (url.hostname, url.port) == ("api", api_port["port"])
    # Workers have no port: each probe asks model.health whether this pod's heartbeat is live.
    for name in pools(objs):
        worker = main_container(deployments[name])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert worker[probe]["exec"]["command"] == ["python", "-m", "model.health"], (name, probe)
        assert (ROOT / "model" / "health.py").is_file()
    # Nor has the explainer, whose heartbeat is its own key (explainer:<id>, not a worker's):
    # model.health --explainer asks for that one.
    import model.health

    explainer = main_container(deployments["explainer"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = explainer[probe]["exec"]["command"]
        assert command == ["python", "-m", "model.health", model.health.EXPLAINER_FLAG], probe
    assert "keys.explainer_key(" in inspect.getsource(model.health.explainer_live)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_body_limits_are_the_apps_own(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import ui.__main__

    objs = render(overlay)
    deployments = named(objs, "Deployment")
    ingresses = list(named(objs, "Ingress").values())
    api_settings = effective(main_container(deployments["api"]))
    limits = BodyLimitMiddleware(
        lambda *_: None,  # type: ignore[arg-type]
        max_upload_bytes=api_settings.max_upload_bytes,
        max_batch_bytes=api_settings.max_batch_bytes,
    )
    api_ingresses = [
        i for i in ingresses if i["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "api"
    ]
    [api_host] = {i["spec"]["rules"][0]["host"] for i in api_ingresses}
    for path in UPLOAD_PATHS:
        ingress = ingress_for(api_ingresses, api_host, path)
        size = nginx_bytes(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"])
        assert size == (limits.batch_limit if path in BATCH_PATHS else limits.upload_limit), path
    # Long enough for the API to hold a request its longest (POST /model/predict its deadline, a
    # heatmap its EXPLANATION_WAIT_SECONDS) and answer 504 itself, with a margin for the answer.
    longest = max(api_settings.predict_deadline_seconds, api_settings.explanation_wait_seconds)
    for path in ("/model/predict", "/v1/predictions/1/explanation"):
        annotations = ingress_for(api_ingresses, api_host, path)["metadata"]["annotations"]
        for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
            assert int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) >= longest + 30, (path, timeout)
    # /metrics is for Prometheus inside the cluster only: the exact path and every path starting
    # so, /metrics%0A included (nginx matches it decoded, "/metrics\n").
    # So is /health/ready (the kubelet asks the pods themselves), as nginx in front refuses it.
    for path in ("/metrics", "/metrics\n", "/metrics\r", "/metrics/", "/metricsx", "/metrics%0A", "/health/ready"):
        metrics = ingress_for(api_ingresses, api_host, path)["metadata"]["annotations"]
        assert metrics.get("nginx.ingress.kubernetes.io/denylist-source-range", "").startswith("0.0.0.0/0"), path
    for path in ("/", "/v1/images", "/health/live"):
        assert "nginx.ingress.kubernetes.io/denylist-source-range" not in (
            ingress_for(api_ingresses, api_host, path)["metadata"]["annotations"]
        ), path

    # The UI states the API's limits, and Streamlit refuses bodies past its own; the Ingress agrees.
    ui_container = main_container(deployments["ui"])
    ui_settings = effective(ui_container)
    assert (ui_settings.max_upload_bytes, ui_settings.max_batch_bytes) == (
        api_settings.max_upload_bytes,
        api_settings.max_batch_bytes,
    )
    from streamlit.web.server.starlette.starlette_routes import _MAX_UPLOAD_MULTIPART_OVERHEAD_BYTES

    args: list[str] = []
    for variable, value in literal_env(ui_container).items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setattr(os, "execv", lambda _path, argv: args.extend(argv))
    get_ui_settings.cache_clear()
    try:
        ui.__main__.main()
    finally:
        get_ui_settings.cache_clear()
    max_upload_mb = int(args[args.index("--server.maxUploadSize") + 1])
    [ui_ingress] = [
        i for i in ingresses if i["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "ui"
    ]
    annotations = ui_ingress["metadata"]["annotations"]
    assert nginx_bytes(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) == (
        max_upload_mb * 1024 * 1024 + _MAX_UPLOAD_MULTIPART_OVERHEAD_BYTES
    )
    # A Streamlit session is a WebSocket that idles while someone reads; its uploads go to its pod.
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert annotations["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert {i["spec"]["ingressClassName"] for i in ingresses} == {"nginx"}


def test_nginx_sizes_are_read_as_nginx_does() -> None:
    assert [nginx_bytes(s) for s in ("512", "10k", "3M", "2g")] == [512, 10240, 3 * 2**20, 2 * 2**30]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_commands_and_users_exist_in_the_dockerfiles(overlay: str) -> None:
    for name, workload in workloads(render(overlay)).items():
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers(workload):
            service = service_of(container)
            stage = dockerfile_final_stage(service)
            copied = set(re.findall(r"^COPY (?:--\S+ )*(\S+?)/? ", stage, flags=re.M))
            uid = re.search(r"useradd .*--uid (\d+)", stage)
            assert uid and spec["securityContext"]["runAsUser"] == int(uid[1]), name
            assert re.search(r"^WORKDIR /app$", stage, flags=re.M)
            command = container["command"]
            assert command[0] == "python", (name, command)
            if command[1] == "-m":
                module = command[2].replace(".", "/")
                path = next(p for p in (f"{module}.py", f"{module}/__main__.py") if (ROOT / p).is_file())
                assert path.split("/")[0] in copied, (name, path)
            else:  # a script of deploy/k8s/base/scripts, mounted from its ConfigMap
                script = Path(command[1])
                [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(script.parent)]
                assert volumes[mount["name"]]["configMap"]["name"].startswith("portal-scripts")
                assert (SCRIPTS / script.name).is_file()
            for arg in command[2:]:
                if arg.startswith("/app/"):  # from the image's WORKDIR copy
                    relative = arg.removeprefix("/app/")
                    assert (ROOT / relative).exists() and relative.split("/")[0] in copied, arg
                elif arg.startswith("/"):  # made by the image (COPY --from, ENV), or a volume
                    mounted = any(arg == m["mountPath"] for m in container.get("volumeMounts", []))
                    assert mounted or re.search(rf"\s{re.escape(arg)}\b", stage), (name, arg)
            for port in container.get("ports", []):
                assert re.search(rf"^EXPOSE {port['containerPort']}$", stage, flags=re.M), (name, port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_and_never_committed(overlay: str) -> None:
    objs = render(overlay)
    assert not named(objs, "Secret")
    example = (K8S / "secrets.example.env").read_text()
    documented = dict(re.findall(r"^([A-Z_]+)=(.*)$", example, flags=re.M))
    assert set(documented.values()) == {""}, "the example holds no value"
    used: set[str] = set()
    for workload in workloads(objs).values():
        for container in containers(workload):
            for env in container.get("env", []):
                if "valueFrom" in env:
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == SECRET and ref["key"] == env["name"]
                    used.add(ref["key"])
                else:
                    assert env["name"] not in PLACEHOLDERS, f"{env['name']} belongs in the Secret"
    for auth in named(objs, "TriggerAuthentication").values():
        used |= {r["key"] for r in auth["spec"]["secretTargetRef"]}
    assert used == set(documented)
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "FIRST_ADMIN_EMAIL", "FIRST_ADMIN_PASSWORD"} <= used


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_postgresql_and_redis_to_their_clients_only(overlay: str) -> None:
    objs = render(overlay)
    policies = named(objs, "NetworkPolicy")
    postgres_port = make_url(Settings.model_fields["database_url"].default).port
    redis_port = urlsplit(Settings.model_fields["redis_url"].default).port
    clients: dict[str, set[str]] = {"postgres": set(), "redis": set()}
    for name, workload in workloads(objs).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        used = {n for c in containers(workload) for n in env_names(c)}
        for backend, variable in (("postgres", "DATABASE_URL"), ("redis", "REDIS_URL")):
            assert (labels.get(f"image-portal/{backend}") == "client") == (variable in used), (name, backend)
            if variable in used:
                clients[backend].add(name)
    assert clients["postgres"] == {"api", "migrate"}
    assert clients["redis"] == {"api", "migrate", "trainer", "explainer", *pools(objs)}
    assert policies["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, policy in policies.items():
        for rule in policy["spec"].get("egress", []):
            assert rule.get("ports"), f"{name}: an egress rule opens every port"
            ports = {p["port"] for p in rule["ports"]}
            for backend, port in (("postgres", postgres_port), ("redis", redis_port)):
                if port in ports:
                    assert policy["spec"]["podSelector"] == {"matchLabels": {f"image-portal/{backend}": "client"}}
    assert {p["port"] for p in policies["postgres-clients"]["spec"]["egress"][0]["ports"]} == {postgres_port}
    assert {p["port"] for p in policies["redis-clients"]["spec"]["egress"][0]["ports"]} == {redis_port}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_locked_down_with_writable_dirs_mounted(overlay: str) -> None:
    for name, workload in workloads(render(overlay)).items():
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in containers(workload):
            where = (name, container["name"])
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            # Every directory a setting points the process to lies on a mounted volume.
            for variable, value in literal_env(container).items():
                if variable.endswith(("_DIR", "_PATH")):
                    assert any(value == m or value.startswith(m + "/") for m in mounts), (where, variable)
        main = main_container(workload)
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        assert mounts["/tmp"] in empty_dirs and mounts["/home/portal"] in empty_dirs, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_threads_fit_the_cpu_limit(overlay: str) -> None:
    objs = render(overlay)
    for name in pools(objs):
        worker = main_container(named(objs, "Deployment")[name])
        limit = str(worker["resources"]["limits"]["cpu"])
        cores = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
        assert effective(worker).inference_threads <= math.ceil(cores), name


def quantity(value: str) -> float:
    """A Kubernetes CPU (cores) or memory (MiB) quantity as a number: "500m", "2", "1536Mi", "1Gi"."""
    for suffix, scale in (("m", 0.001), ("Mi", 1.0), ("Gi", 1024.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * scale
    return float(value)


def test_the_dev_overlay_fits_a_laptops_cluster() -> None:
    """``dev`` is for trying a build on kind or minikube: one replica of everything asked for 5.1
    CPU and 7.4 GiB, and worker-resnet50's 2 CPU could never be scheduled on a 2-vCPU node. Its
    requests fit one 4-CPU, 8 GiB node with room for the cluster's own pods."""
    objs = render("dev")
    cpu = memory = 0.0
    for name, workload in workloads(objs).items():
        if workload["kind"] != "Deployment":
            continue
        requests = main_container(workload)["resources"]["requests"]
        assert quantity(str(requests["cpu"])) <= 1, name
        cpu += quantity(str(requests["cpu"]))
        memory += quantity(str(requests["memory"]))
    assert cpu <= 2.5 and memory <= 5.5 * 1024, (cpu, memory)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_and_trainer_drain_within_their_grace_period(overlay: str) -> None:
    import model.trainer
    import model.worker

    # Both stop on SIGTERM by finishing what they hold rather than dying mid-way.
    for module in (model.worker, model.trainer):
        assert "signal.signal(signal.SIGTERM" in inspect.getsource(module.main), module.__name__
    objs = render(overlay)
    deployments = named(objs, "Deployment")
    for name in pools(objs):
        settings = effective(main_container(deployments[name]))
        # The batch it holds is answered, or taken over by another worker after the visibility
        # timeout; the worker's blocking read lasts a second more.
        drain = settings.visibility_timeout_ms / 1000 + 1 + settings.max_batch_delay_ms / 1000
        assert pod_spec(deployments[name])["terminationGracePeriodSeconds"] > drain, name
    assert pod_spec(deployments["trainer"])["terminationGracePeriodSeconds"] >= 120


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_process_of_the_portal_has_a_deployment(overlay: str) -> None:
    """What ``make run`` starts (scripts/run.py: the API, the workers, the trainer, the explainer,
    the UI) is what the cluster runs, each in a Deployment of its own image."""
    import scripts.run

    started = re.findall(r"^command=python (.+)$", scripts.run.config(1, Path("/nowhere"), python="python"), re.M)
    assert len(started) >= 5 and "-m model.explainer" in started
    deployed = {" ".join(main_container(d)["command"][1:]): d for d in named(render(overlay), "Deployment").values()}
    for command in started:
        assert command in deployed, f"python {command} has no Deployment"
        module = command.removeprefix("-m ").split(".")[0]
        assert service_of(main_container(deployed[command])) == module, command


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_explainer_explains_what_is_served_and_drains(overlay: str) -> None:
    import model.explainer

    objs = render(overlay)
    deployment = named(objs, "Deployment")["explainer"]
    container = main_container(deployment)
    settings = effective(container)
    # It loads the Keras twin of every served version (or those EXPLAIN_MODELS names): some there are.
    twins = model.explainer.twins(deployed_registry(objs), settings)
    assert {t.name for t in twins} >= {"resnet50", "mobilenet_v2", "sketch"}, [t.key for t in twins]
    # Each computation runs on INFERENCE_THREADS: about the cores of its CPU limit.
    limit = str(container["resources"]["limits"]["cpu"])
    cores = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert settings.inference_threads <= math.ceil(cores)
    # It reads the versions the trainer made, from the volume the workers read.
    trained = {m["mountPath"]: m for m in container["volumeMounts"]}[str(settings.trained_dir)]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes[trained["name"]]["persistentVolumeClaim"]["claimName"] == "trained" and trained["readOnly"]
    # On SIGTERM it finishes the heatmap it computes and withdraws its heartbeat.
    assert "signal.signal(signal.SIGTERM" in inspect.getsource(model.explainer.main)
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ui_trusts_the_proxies_the_api_trusts(overlay: str) -> None:
    """Behind the ingress controller the UI sees the controller's address for every browser and
    passes it on as X-Forwarded-For: unless it believes the controller's own X-Forwarded-For, 20
    failed logins from anyone lock every UI user out. Where the API trusts proxies (the pod
    network), the UI trusts the same ones."""
    from uvicorn.middleware.proxy_headers import _TrustedHosts

    deployments = named(render(overlay), "Deployment")
    api, ui = effective(main_container(deployments["api"])), effective(main_container(deployments["ui"]))
    if not api.trusted_proxies:
        return
    assert ui.ui_trusted_proxies, "the UI trusts no proxy while the API does"

    def networks(value: str) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return {ipaddress.ip_network(v.strip()) for v in value.split(",") if v.strip()}

    assert networks(ui.ui_trusted_proxies) == networks(api.trusted_proxies)
    # As uvicorn (under Streamlit) reads FORWARDED_ALLOW_IPS, which python -m ui sets from it.
    trusted = _TrustedHosts(ui.ui_trusted_proxies)
    for network in networks(api.trusted_proxies):
        assert str(next(network.hosts())) in trusted


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_rollout_lets_a_batch_upload_finish(overlay: str) -> None:
    """On SIGTERM the API pod pauses (preStop) while the ingress stops sending it requests, then
    uvicorn waits API_GRACEFUL_SHUTDOWN_SECONDS for the requests in progress: as long as the
    batches Ingress waits for the API, all within the pod's grace period."""
    import api.__main__

    objs = render(overlay)
    deployment = named(objs, "Deployment")["api"]
    container = main_container(deployment)
    settings = effective(container)
    assert "timeout_graceful_shutdown=settings.api_graceful_shutdown_seconds" in inspect.getsource(api.__main__.main)
    [batches] = [
        i for i in named(objs, "Ingress").values() if i["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/v1/batches"
    ]
    waited = int(batches["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"])
    assert settings.api_graceful_shutdown_seconds >= waited
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    assert (
        pod_spec(deployment)["terminationGracePeriodSeconds"] > int(pause[1]) + settings.api_graceful_shutdown_seconds
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_apis_tmp_holds_a_few_spooled_batches(overlay: str) -> None:
    """Multipart uploads are spooled to /tmp while read; past its sizeLimit the kubelet evicts the
    pod. Three full batches at once fit, with room to spare."""
    from api.app.core.body_limits import MULTIPART_OVERHEAD

    deployment = named(render(overlay), "Deployment")["api"]
    container = main_container(deployment)
    mount = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/tmp"]
    [volume] = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount]
    size = str(volume["emptyDir"]["sizeLimit"])
    match = re.fullmatch(r"(\d+)(Mi|Gi)", size)
    assert match, size
    limit = int(match[1]) * 1024 ** {"Mi": 2, "Gi": 3}[match[2]]
    batch = effective(container).max_batch_bytes + MULTIPART_OVERHEAD
    assert limit >= 3 * batch + 512 * 1024**2, size


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_waits_for_the_migrations_job(overlay: str) -> None:
    objs = render(overlay)
    job, api_deployment = named(objs, "Job")["migrate"], named(objs, "Deployment")["api"]
    migrate = main_container(job)
    assert migrate["command"] == ["python", "-m", "api.prestart"]
    # The first admin is created from the Secret, idempotently (created only when missing).
    assert {"FIRST_ADMIN_EMAIL", "FIRST_ADMIN_PASSWORD", "DATABASE_URL"} <= env_names(migrate)
    from api.prestart import prestart

    assert "seed_admin(settings)" in inspect.getsource(prestart)
    [wait] = pod_spec(api_deployment)["initContainers"]
    assert wait["command"][1].endswith("/wait_for_schema.py")
    assert wait["command"][2] == "/app/api/migrations"
    # Same image and tag as the Job, so it waits for the very migrations the Job applies.
    assert wait["image"] == migrate["image"] == main_container(api_deployment)["image"]
    assert main_container(api_deployment)["command"] == ["python", "-m", "api"], "migrations run once, in the Job"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_disruption_budgets_cover_the_replicated_workloads(overlay: str) -> None:
    objs = render(overlay)
    budgets = list(named(objs, "PodDisruptionBudget").values())
    for name, deployment in named(objs, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        if name == "trainer":  # one run at a time: nothing to keep available while a node drains
            assert not matching
            continue
        [budget] = matching
        # maxUnavailable, not minAvailable: a single replica must not block a node drain.
        assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"], name


def replica_bounds(objs: list[Obj]) -> dict[str, tuple[int, int]]:
    """Each Deployment's (fewest, most) replicas, from its autoscaler or its fixed count."""
    bounds = {n: (d["spec"].get("replicas", 1),) * 2 for n, d in named(objs, "Deployment").items()}
    for hpa in named(objs, "HorizontalPodAutoscaler").values():
        bounds[hpa["spec"]["scaleTargetRef"]["name"]] = (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    for scaled in named(objs, "ScaledObject").values():
        spec = scaled["spec"]
        bounds[spec["scaleTargetRef"]["name"]] = (spec["minReplicaCount"], spec["maxReplicaCount"])
    return bounds


def test_dev_runs_one_replica_of_everything() -> None:
    bounds = replica_bounds(render("dev"))
    assert set(bounds) == {"api", "ui", "trainer", "explainer", "worker-resnet50", "worker-small"}
    assert set(bounds.values()) == {(1, 1)}


def test_prod_keeps_two_api_pods_and_scales_them_on_cpu() -> None:
    objs = render("prod")
    bounds = replica_bounds(objs)
    assert bounds["api"][0] >= 2 and bounds["ui"][0] >= 2 and bounds["trainer"] == bounds["explainer"] == (1, 1)
    [metric] = named(objs, "HorizontalPodAutoscaler")["api"]["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert all(low < high for n, (low, high) in bounds.items() if n.startswith("worker-"))


# --- 4. the init containers' scripts ---------------------------------------------------------------


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A new database with no tables (its SQLAlchemy URL), dropped afterwards."""
    admin = os.environ.get("TEST_POSTGRES_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"portal_test_k8s_{uuid.uuid4().hex[:10]}"

    async def execute(sql: str, dsn: str = admin) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{admin.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+asyncpg://')}/{name}"
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def wait_for_schema(database_url: str) -> subprocess.CompletedProcess[str]:
    """The script run as the API pod's init container runs it: from a folder of its own (its
    ConfigMap's mount), in another working directory, with no ``PYTHONPATH`` (``make test`` exports
    one) nor any other path to the project than the migrations folder it is given."""
    with tempfile.TemporaryDirectory() as folder:
        scripts, cwd = Path(folder, "scripts"), Path(folder, "cwd")
        scripts.mkdir()
        cwd.mkdir()
        shutil.copy(SCRIPTS / "wait_for_schema.py", scripts)
        return subprocess.run(
            [
                sys.executable,
                str(scripts / "wait_for_schema.py"),
                str(ROOT / "api" / "migrations"),
                *("--timeout", "0.5", "--interval", "0.1"),
            ],
            env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "DATABASE_URL": database_url},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def test_wait_for_schema_waits_until_the_migrations_reach_head(empty_database: str) -> None:
    script = ScriptDirectory(str(ROOT / "api" / "migrations"))
    [head] = script.get_heads()
    dsn = make_url(empty_database).set(drivername="postgresql").render_as_string(hide_password=False)

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    nothing = wait_for_schema(empty_database)
    assert nothing.returncode == 1 and f"waiting for {head}" in nothing.stdout
    asyncio.run(execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)"))
    asyncio.run(execute(f"INSERT INTO alembic_version VALUES ('{script.get_base()}')"))
    assert wait_for_schema(empty_database).returncode == 1, "an older revision is not head"
    asyncio.run(execute(f"UPDATE alembic_version SET version_num = '{head}'"))
    assert wait_for_schema(empty_database).returncode == 0
    # A newer release migrated already (a revision this image does not know): go ahead.
    asyncio.run(execute("UPDATE alembic_version SET version_num = 'f00dfeedbeef'"))
    assert wait_for_schema(empty_database).returncode == 0
    gone = wait_for_schema(empty_database.rsplit("/", 1)[0] + "/portal_test_k8s_missing")
    assert gone.returncode == 1 and "not reachable" in gone.stdout


@pytest.mark.parametrize("key", ["ssl", "sslmode"])
@pytest.mark.usefixtures("plain_postgres")
def test_wait_for_schema_takes_either_spelling_of_the_tls_mode(key: str, empty_database: str) -> None:
    """``prefer`` falls back to plain on the test server, which offers no TLS (it reads the
    schema: nothing yet); ``require`` is refused by it, so the mode reached asyncpg."""
    prefer = wait_for_schema(f"{empty_database}?{key}=prefer")
    assert prefer.returncode == 1 and "schema at nothing, waiting for" in prefer.stdout, prefer.stdout + prefer.stderr
    require = wait_for_schema(f"{empty_database}?{key}=require")
    assert require.returncode == 1 and "rejected SSL upgrade" in require.stdout, require.stdout + require.stderr


def test_wait_for_schema_finds_the_project_of_the_migrations_it_is_given(tmp_path: Path) -> None:
    """The migration files import ``api...``: the folder above the migrations' packages goes on
    ``sys.path`` (``/app`` in the image, whatever the working directory or ``PYTHONPATH``)."""
    script = load_script("wait_for_schema")
    assert script.project_root(ROOT / "api" / "migrations") == ROOT
    app = tmp_path / "app"
    (app / "api" / "migrations" / "versions").mkdir(parents=True)
    (app / "api" / "__init__.py").touch()
    assert script.project_root(app / "api" / "migrations") == app
    # A migrations folder that is a package itself, or in a folder that is none, alike.
    (app / "api" / "migrations" / "__init__.py").touch()
    assert script.project_root(app / "api" / "migrations") == app
    (tmp_path / "alembic").mkdir()
    assert script.project_root(tmp_path / "alembic") == tmp_path


def test_wait_for_schema_reads_database_url_as_the_api_does() -> None:
    """The script is mounted on its own and carries its own conversion: the same DSN as the API's."""
    script = load_script("wait_for_schema")
    base = "postgresql+asyncpg://u:p@db:5432/portal"
    for url in (
        base,
        f"{base}?ssl=require",
        f"{base}?sslmode=verify-full&application_name=x",
        f"{base}?ssl=a&sslmode=a",
    ):
        assert script.asyncpg_dsn(url) == asyncpg_dsn(url)
    with pytest.raises(SystemExit, match="two TLS modes"):
        script.asyncpg_dsn(f"{base}?ssl=require&sslmode=disable")


def test_seed_trained_adds_the_images_versions_whole_and_keeps_the_volumes(tmp_path: Path) -> None:
    seed_trained = load_script("seed_trained")
    image, volume = tmp_path / "image", tmp_path / "volume"
    for folder, files in {"sketch/v1": ("model.keras", "metrics.json"), "resnet50/v2": ("model.xml",)}.items():
        (image / folder).mkdir(parents=True)
        for file in files:
            (image / folder / file).write_text(f"image {folder}/{file}")
    (volume / "sketch" / "v1").mkdir(parents=True)
    (volume / "sketch" / "v1" / "model.keras").write_text("retrained here")
    stale = volume / seed_trained.STAGING / "left-by-a-killed-pod"
    (stale / "copy").mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * seed_trained.STALE_S,) * 2)

    assert seed_trained.seed(image, volume) == ["resnet50/v2"]
    assert (volume / "resnet50" / "v2" / "model.xml").read_text() == "image resnet50/v2/model.xml"
    assert (volume / "sketch" / "v1" / "model.keras").read_text() == "retrained here"
    assert list((volume / seed_trained.STAGING).iterdir()) == []
    assert seed_trained.seed(image, volume) == []

    # The trainer publishes <model>/<version>/metrics.json records: a copy being staged is deeper.
    import model.trainer

    assert 'glob("*/*/metrics.json")' in inspect.getsource(model.trainer.Trainer.publish_records)
    staged = volume / seed_trained.STAGING / "x" / "copy"
    shutil.copytree(image / "sketch" / "v1", staged)
    assert [p.parent for p in volume.glob("*/*/metrics.json")] == []


def test_seed_trained_leaves_a_version_another_pod_placed_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_trained = load_script("seed_trained")
    image, volume = tmp_path / "image", tmp_path / "volume"
    (image / "birds" / "v1").mkdir(parents=True)
    (image / "birds" / "v1" / "model.tflite").write_text("image")
    copytree = shutil.copytree

    def copy_while_another_pod_does(source: Path, target: Path) -> object:
        result = copytree(source, target)
        (volume / "birds" / "v1").mkdir()
        (volume / "birds" / "v1" / "model.tflite").write_text("the other pod's")
        return result

    monkeypatch.setattr(seed_trained.shutil, "copytree", copy_while_another_pod_does)
    assert seed_trained.seed(image, volume) == []
    assert (volume / "birds" / "v1" / "model.tflite").read_text() == "the other pod's"
    assert list((volume / seed_trained.STAGING).iterdir()) == []
