"""What the images must hold for docker-compose.yml and deploy/k8s to run, read from the
Dockerfiles with no Docker engine: the ImageNet weights files the workers load without a download,
the mount points of the volumes owned by the user the container runs as, the script that seeds the
trained-versions volume, what their ENV sets (no weight downloads, the project's packages on the
path); and compose's network, healthchecks, start order, restart policies and the exposure of the
monitoring profile."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from contracts.registry import ModelEntry, Registry, load_registry
from model.config import ModelSettings
from model.explainer import twins
from model.prepare import imagenet_entries
from tests.deploy.test_k8s import (
    OVERLAYS,
    deployed_registry,
    literal_env,
    main_container,
    pod_spec,
    render,
    setting_env_names,
    workloads,
)
from tests.support import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
NAMED_VOLUMES = set(COMPOSE["volumes"])
MODEL_SERVICES = ("model", "explainer", "trainer")
"""The compose services that read or write the trained versions."""


@dataclass
class Stage:
    """One stage of a Dockerfile: its name and its instructions, each as (keyword, arguments) with
    continued lines joined and comments dropped."""

    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]

    def env(self) -> dict[str, str]:
        """The variables its ENV instructions set (``ENV A=1 B=2``)."""
        return dict(item.split("=", 1) for args in self.args("ENV") for item in shlex.split(args))

    def shell_commands(self) -> list[list[str]]:
        """The simple commands of its RUN instructions (split at ``&&`` and ``;``), as words."""
        return [
            shlex.split(part)
            for args in self.args("RUN")
            for part in re.split(r"&&|;", args)
            if part.strip() and not args.lstrip().startswith("[")
        ]

    def copies(self) -> list[tuple[dict[str, str], list[str]]]:
        """Its COPY instructions: (flags such as ``from`` and ``chown``, [sources..., destination])."""
        out = []
        for args in self.args("COPY"):
            words = shlex.split(args)
            flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
            out.append((flags, [w for w in words if not w.startswith("--")]))
        return out


def stages(dockerfile: str) -> list[Stage]:
    """The stages of ``dockerfile`` (a path from the repository's root)."""
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
    out: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            match = re.search(r"\sAS\s+(\S+)", args, flags=re.I)
            out.append(Stage(match[1] if match else None))
        else:
            out[-1].instructions.append((keyword.upper(), args.strip()))
    return out


def final_stage(dockerfile: str) -> Stage:
    return stages(dockerfile)[-1]


def stage_named(dockerfile: str, name: str) -> Stage:
    [stage] = [s for s in stages(dockerfile) if s.name == name]
    return stage


def owned_dirs(stage: Stage) -> dict[str, str]:
    """Each directory the stage creates (``mkdir``) or copies in, with the user owning it: the one
    a later ``chown`` or the COPY's ``--chown`` names, else root."""
    owners: dict[str, str] = {}
    for words in stage.shell_commands():
        if words[:1] == ["mkdir"]:
            owners.update((w.rstrip("/"), "root") for w in words[1:] if not w.startswith("-"))
        elif words[:1] == ["chown"]:
            operands = [w for w in words[1:] if not w.startswith("-")]
            user = operands[0].split(":")[0]
            owners.update((w.rstrip("/"), user) for w in operands[1:] if w.rstrip("/") in owners)
    for flags, paths in stage.copies():
        owners[paths[-1].rstrip("/")] = flags.get("chown", "root").split(":")[0]
    return owners


def image_user(stage: Stage) -> str:
    [user] = stage.args("USER")
    return user


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """A compose service's named-volume mounts: (volume, target, read-only)."""
    out = []
    for mount in service.get("volumes", []):
        source, target, *mode = mount.split(":")
        if source in NAMED_VOLUMES:
            out.append((source, target, mode == ["ro"]))
    return out


def model_settings_in(stage: Stage, env: dict[str, str]) -> ModelSettings:
    """The model settings of a process of the image ``stage`` makes, run with ``env`` (the image's
    ENV under it), as the process reads them."""
    saved = dict(os.environ)
    try:
        for name in setting_env_names(ModelSettings):
            os.environ.pop(name, None)
        os.environ.update({k: v for k, v in {**stage.env(), **env}.items() if k != "PATH"})
        return ModelSettings(_env_file=None)  # type: ignore[call-arg]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def weights_the_image_writes() -> dict[str, Path]:
    """The ImageNet weights files the model image's build writes and its final stage keeps, by
    version: those ``model.prepare`` fetches in the ``weights`` stage (every version of the
    repository's registry it serves, into its MODELS_DIR) under a folder copied whole from that
    stage. Fails unless the build's prepare requires them (a failed download fails the build)."""
    weights = stage_named("model/Dockerfile", "weights")
    [run] = [r for r in weights.args("RUN") if "model.prepare" in r]
    words = shlex.split(run.split("&&")[0])
    assert words[words.index("python") :] == ["python", "-m", "model.prepare", "--require-weights"], run
    build_env = dict(w.split("=", 1) for w in words[: words.index("python")])
    # The repository's registry, every version it serves, downloads allowed.
    assert not {"REGISTRY_PATH", "SERVE_MODELS", "BENCHMARK_MODE"} & {*build_env, *weights.env()}, run
    assert build_env.get("ALLOW_WEIGHT_DOWNLOAD", "true") == "true"
    models_dir = build_env["MODELS_DIR"]
    kept = {paths[0] for flags, paths in final_stage("model/Dockerfile").copies() if flags.get("from") == "weights"}
    assert models_dir in kept, "the final stage copies the weights stage's MODELS_DIR"
    settings = model_settings_in(weights, build_env)
    registry = load_registry(ROOT / "model" / "registry.yaml")
    entries = imagenet_entries(settings.served_entries(registry), registry)
    assert entries, "the registry has versions with ImageNet weights"
    return {
        e.key: e.resolve(e.file or "", models_dir=settings.models_dir, trained_dir=settings.trained_dir)
        for e in entries
    }


def needed_weights(entries: list[ModelEntry], registry: Registry, settings: ModelSettings) -> dict[str, Path]:
    """The ImageNet weights files a process serving or explaining ``entries`` loads, by version."""
    return {
        e.key: e.resolve(e.file or "", models_dir=settings.models_dir, trained_dir=settings.trained_dir)
        for e in imagenet_entries(entries, registry)
    }


# --- the ImageNet weights ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_image_holds_the_weights_its_pods_may_not_download(overlay: str) -> None:
    """The workers and the explainer on Kubernetes run with ALLOW_WEIGHT_DOWNLOAD=false: every
    ImageNet version they serve or explain (ResNet50@1, MobileNetV2@1, and the INT8 versions'
    sources) loads its weights file from the image, at the path the pod's settings give."""
    objs = render(overlay)
    registry = deployed_registry(objs)
    in_image = weights_the_image_writes()
    model = final_stage("model/Dockerfile")
    checked = set()
    for name, workload in workloads(objs).items():
        container = main_container(workload)
        command = container.get("command", [])
        if command not in (["python", "-m", "model"], ["python", "-m", "model.explainer"]):
            continue
        env = literal_env(container)
        assert env.get("ALLOW_WEIGHT_DOWNLOAD") == "false", name
        settings = model_settings_in(model, env)
        served = settings.served_entries(registry) if command[-1] == "model" else twins(registry, settings)
        for key, path in needed_weights(served, registry, settings).items():
            assert in_image.get(key) == path, (name, key, path)
            # The volumes mounted over the image hide none of it.
            for mount in container.get("volumeMounts", []):
                assert not path.is_relative_to(mount["mountPath"]), (name, mount)
            checked.add(key)
    assert {"resnet50@1", "mobilenet_v2@1"} <= checked


def test_compose_model_services_find_the_weights_in_the_image() -> None:
    in_image = weights_the_image_writes()
    model = final_stage("model/Dockerfile")
    registry = load_registry(ROOT / "model" / "registry.yaml")
    for name in ("model", "explainer"):
        service = SERVICES[name]
        assert service["build"]["dockerfile"] == "model/Dockerfile"
        settings = model_settings_in(model, {k: str(v) for k, v in service.get("environment", {}).items()})
        served = settings.served_entries(registry) if name == "model" else twins(registry, settings)
        needed = needed_weights(served, registry, settings)
        assert needed and all(in_image.get(key) == path for key, path in needed.items()), (name, needed)
        for _volume, target, _ro in volume_mounts(service):
            assert not any(path.is_relative_to(target) for path in needed.values()), (name, target)


# --- compose: volumes, seeding, network, healthchecks ---------------------------------------------


def test_every_named_volume_starts_owned_by_the_user_its_containers_run_as() -> None:
    """Docker fills an empty named volume from the image of the first container that mounts it,
    owner included, and creates a missing mount point owned by root: so each mount point of each
    built service is made in its image and owned by the image's USER (read-only mounts too: the
    first to mount a volume may be one of them)."""
    checked = set()
    for name, service in SERVICES.items():
        if "build" not in service:
            continue
        stage = final_stage(service["build"]["dockerfile"])
        user = image_user(stage)
        assert user != "root" and "user" not in service, name
        owners = owned_dirs(stage)
        for volume, target, _read_only in volume_mounts(service):
            assert owners.get(target) == user, (name, volume, target, owners.get(target))
            checked.add((name, target))
    assert {("api", "/data/training"), ("trainer", "/data/trained"), ("trainer", "/data/quickdraw")} <= checked


def test_the_trained_versions_volume_is_seeded_from_the_image_before_the_model_services_start() -> None:
    """As on Kubernetes (the pods' init container): the image's own versions stay in the image's
    TRAINED_DIR, a one-shot service copies those the shared volume lacks onto it with
    seed_trained.py (a rebuilt image's new versions too: a named volume is filled from the image
    only while empty), and the model services read and write the volume once it has finished."""
    seed = SERVICES["seed-trained"]
    assert seed["build"] == SERVICES["model"]["build"]
    image = final_stage("model/Dockerfile")
    python, script, source, target = seed["command"]
    assert python == "python"
    # The script is the one the Kubernetes init containers run, copied into the image.
    copied = {paths[-1]: paths[0] for flags, paths in image.copies() if "from" not in flags}
    assert copied.get(script) == "deploy/k8s/base/scripts/seed_trained.py", script
    assert (ROOT / copied[script]).is_file()
    # From the image's own versions (copied from the build stage that trains them) ...
    assert source == image.env()["TRAINED_DIR"]
    assert source in {paths[-1] for flags, paths in image.copies() if flags.get("from") == "weights"}
    # ... onto the volume, mounted elsewhere so as not to hide them.
    [(volume, mounted_at, read_only)] = volume_mounts(seed)
    assert (mounted_at, read_only) == (target, False) and target != source
    for name in MODEL_SERVICES:
        service = SERVICES[name]
        assert service["build"] == seed["build"], name
        assert service["depends_on"]["seed-trained"] == {"condition": "service_completed_successfully"}, name
        assert service["environment"]["TRAINED_DIR"] == target, name
        assert (volume, target, name != "trainer") in volume_mounts(service), name
        assert all(t != source for _v, t, _ro in volume_mounts(service)), name
    for workload in workloads(render("dev")).values():
        for init in pod_spec(workload).get("initContainers", []):
            if init["name"] == "seed-trained":
                assert Path(init["command"][1]).name == Path(script).name and init["command"][2] == source


def test_fixed_addresses_lie_outside_the_range_docker_hands_out() -> None:
    """Containers started before nginx and the UI take addresses from ip_range; the fixed ones
    (named in TRUSTED_PROXIES) lie in the subnet but outside it, so none is ever taken."""
    [config] = COMPOSE["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(config["subnet"])
    automatic = ipaddress.ip_network(config["ip_range"])
    assert automatic.subnet_of(subnet)  # type: ignore[arg-type]
    fixed = [
        ipaddress.ip_address(network["ipv4_address"])
        for service in SERVICES.values()
        for network in (service.get("networks") or {}).values()
        if network and "ipv4_address" in network
    ]
    assert len(fixed) == 2
    for address in fixed:
        assert address in subnet and address not in automatic, address
        assert address not in (subnet.network_address, subnet.network_address + 1, subnet.broadcast_address)
    # Room for every other container, scaled model workers included.
    assert automatic.num_addresses - 2 >= 64


def test_compose_healthchecks_are_the_kubernetes_probes() -> None:
    """The model worker and the explainer are healthy while their own heartbeat is live, read as
    Kubernetes reads it (the explainer's through the explainers' index, never a KEYS scan)."""
    objs = render("dev")
    probes = {
        container["command"][-1]: container["readinessProbe"]["exec"]["command"]
        for container in map(main_container, workloads(objs).values())
        if "exec" in container.get("readinessProbe", {})
    }
    assert SERVICES["model"]["healthcheck"]["test"] == ["CMD", *probes["model"]]
    assert SERVICES["explainer"]["healthcheck"]["test"] == ["CMD", *probes["model.explainer"]]
    assert probes["model.explainer"] == ["python", "-m", "model.health", "--explainer"]


# --- the images' environment ----------------------------------------------------------------------


def test_the_model_image_and_compose_download_no_weights() -> None:
    """As the README and the Kubernetes pods have it: the model image's processes run with
    ALLOW_WEIGHT_DOWNLOAD=false (a weights file the build did not put in is reported missing,
    never fetched at run time), and compose's model worker and explainer say so too."""
    model = final_stage("model/Dockerfile")
    assert model.env().get("ALLOW_WEIGHT_DOWNLOAD") == "false"
    assert not model_settings_in(model, {}).allow_weight_download
    for name in MODEL_SERVICES:
        service = SERVICES[name]
        environment = {k: str(v) for k, v in service.get("environment", {}).items()}
        if name != "trainer":  # the trainer builds no ImageNet model: the image's value is enough
            assert environment.get("ALLOW_WEIGHT_DOWNLOAD") == "false", name
        assert not model_settings_in(model, environment).allow_weight_download, name


def test_the_api_image_imports_its_packages_in_a_script_run_by_its_path() -> None:
    """``python /opt/portal/scripts/wait_for_schema.py`` (the API pods' init container) has only
    the script's folder on ``sys.path``, and the migrations it reads import ``api...``: the image
    puts its WORKDIR, where ``api/`` is copied, on PYTHONPATH (the script adds it itself too)."""
    api = final_stage("api/Dockerfile")
    [workdir] = api.args("WORKDIR")
    assert workdir in api.env().get("PYTHONPATH", "").split(":")
    copied = {paths[-1].rstrip("/") for flags, paths in api.copies() if "from" not in flags}
    assert {"api", "contracts"} <= copied


# --- compose: restarts and the monitoring profile ----------------------------------------------


def one_shot_services() -> set[str]:
    """The services others wait for to finish (``service_completed_successfully``): they run once."""
    return {
        dependency
        for service in SERVICES.values()
        for dependency, condition in (service.get("depends_on") or {}).items()
        if condition == {"condition": "service_completed_successfully"}
    }


def test_long_running_services_restart_and_one_shot_ones_do_not() -> None:
    """A worker killed for its memory, a crashed API or UI comes back by itself (and after the
    Docker daemon restarts), unless stopped by hand; a one-shot job is never run again, so a
    failed seed stays failed and the services waiting on it are not started."""
    one_shot = one_shot_services()
    assert one_shot == {"seed-trained"}
    for name, service in SERVICES.items():
        if name in one_shot:
            assert service.get("restart", "no") == "no", name
        else:
            assert service.get("restart") == "unless-stopped", name


def published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A compose service's published ports (short syntax): (host address, host port, container
    port), the address ``0.0.0.0`` (every interface) when none is given."""
    out = []
    for port in service.get("ports", []):
        *address, host, container = str(port).split(":")
        out.append((address[0] if address else "0.0.0.0", host, container))
    return out


def test_monitoring_is_published_on_loopback_only() -> None:
    """Prometheus has no login and Grafana's dashboards show the portal's traffic: reachable from
    the host itself only. nginx, the portal's door, is the one port on every interface."""
    for name, service in SERVICES.items():
        for address, _host, _container in published(service):
            if name == "nginx":
                continue
            assert ipaddress.ip_address(address).is_loopback, (name, address)
    monitoring = {n for n, s in SERVICES.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    assert all(published(SERVICES[n]) for n in monitoring)
    assert published(SERVICES["nginx"]) == [("0.0.0.0", "80", "80")]


def grafana_entrypoint(tmp_path: Path, password: str) -> subprocess.CompletedProcess[str]:
    """Grafana's compose entrypoint run by ``sh`` as the container runs it (compose's ``$$``
    unescaped), given ``password`` as GRAFANA_ADMIN_PASSWORD (``""``: unset, which compose's
    ``${GRAFANA_ADMIN_PASSWORD}`` with no default makes empty), and the image's own entrypoint
    (``/run.sh``) replaced by a stand-in that says it ran."""
    grafana = SERVICES["grafana"]
    shell, flag, script, *arguments = grafana["entrypoint"]
    assert (shell, flag) == ("sh", "-c") and "exec /run.sh " in script, grafana["entrypoint"]
    stand_in = tmp_path / "run.sh"
    stand_in.write_text('#!/bin/sh\necho "grafana started as admin/$GF_SECURITY_ADMIN_PASSWORD"\n')
    stand_in.chmod(0o755)
    given = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    match = re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD(:?-)?\}", given)
    assert match, f"no default password: {given}"
    env = {"PATH": os.environ["PATH"], "GF_SECURITY_ADMIN_PASSWORD": password}
    return subprocess.run(
        ["sh", "-c", script.replace("$$", "$").replace("/run.sh", str(stand_in)), *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("password", ["", "admin"])
def test_grafana_refuses_to_start_without_a_password_of_its_own(tmp_path: Path, password: str) -> None:
    """Grafana would create admin/admin: its password comes from GRAFANA_ADMIN_PASSWORD, with no
    default, and the container stops at once, saying so, when it is missing or Grafana's default."""
    refused = grafana_entrypoint(tmp_path, password)
    assert refused.returncode == 1, refused
    assert "set GRAFANA_ADMIN_PASSWORD" in refused.stderr and "started" not in refused.stdout


def test_grafana_starts_with_the_password_it_is_given(tmp_path: Path) -> None:
    started = grafana_entrypoint(tmp_path, "a-long-grafana-password")
    assert started.returncode == 0, started
    assert started.stdout == "grafana started as admin/a-long-grafana-password\n"


def test_no_variable_is_required_by_a_profile_a_plain_up_leaves_out() -> None:
    """compose interpolates every service before it drops those of inactive profiles: a
    ``${VAR:?...}`` (or ``${VAR?...}``) there would stop a plain ``docker compose up`` too."""
    for name, service in SERVICES.items():
        if service.get("profiles"):
            text = yaml.safe_dump(service)
            assert not re.search(r"\$\{\w+:?\?", text.replace("$$", "")), name
