"""docker-compose.yml and the Dockerfiles checked against the code (no Docker engine needed)."""

from __future__ import annotations

import ipaddress
import re

import yaml
from pydantic_settings import BaseSettings

from api.app.core.config import Settings
from model.config import ModelSettings
from tests.support import ROOT
from ui.config import UISettings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ONE_SHOT = {"seed-trained"}
"""Services that run once and exit, which others wait for (service_completed_successfully)."""
SETTINGS: dict[str, type[BaseSettings]] = {"api": Settings, "model": ModelSettings, "ui": UISettings}


def test_services_and_scaling() -> None:
    assert set(SERVICES) == {
        "db",
        "redis",
        "api",
        "model",
        "explainer",
        "trainer",
        "seed-trained",
        "ui",
        "nginx",
        "prometheus",
        "grafana",
    }
    assert {n for n, svc in SERVICES.items() if svc.get("profiles")} == {"prometheus", "grafana"}
    for name, service in SERVICES.items():
        assert "container_name" not in service, name
        assert name in ONE_SHOT or ("healthcheck" in service and service["healthcheck"]["test"]), name
        for dep, cond in (service.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond == {"condition": wanted}, (name, dep)
    # Scalable: no port, and the one shared disk (trained versions) read-only.
    assert "ports" not in SERVICES["model"] and SERVICES["model"]["volumes"] == ["trained-models:/data/trained:ro"]
    assert SERVICES["trainer"]["command"] == ["python", "-m", "model.trainer"]
    assert "trained-models:/data/trained" in SERVICES["trainer"]["volumes"]
    assert SERVICES["explainer"]["command"] == ["python", "-m", "model.explainer"]


def test_environment_variables_are_real_settings() -> None:
    for name, cls in SETTINGS.items():
        fields = {f.upper() for f in cls.model_fields}
        unknown = set(SERVICES[name].get("environment", {})) - fields
        assert not unknown, (name, unknown)


def test_the_ui_waits_for_the_api_longer_than_the_api_waits_for_an_answer() -> None:
    """The UI's API_TIMEOUT_SECONDS is set where the API's waits are, and by default above both:
    an EXPLANATION_WAIT_SECONDS raised in .env alone made the page give up on a heatmap the API
    was still waiting for."""
    ui, api = SERVICES["ui"]["environment"], SERVICES["api"]["environment"]

    def default(value: str) -> float:
        found = re.fullmatch(r"\$\{(\w+):-([0-9.]+)\}", value)
        assert found, value
        return float(found.group(2))

    assert ui["API_TIMEOUT_SECONDS"] == "${API_TIMEOUT_SECONDS:-40}"
    for wait in ("PREDICT_DEADLINE_SECONDS", "EXPLANATION_WAIT_SECONDS"):
        assert default(api[wait]) < default(ui["API_TIMEOUT_SECONDS"]), wait
    assert UISettings.model_fields["api_timeout_seconds"].default == default(ui["API_TIMEOUT_SECONDS"])


def test_the_api_trusts_nginx_and_the_ui_alone_as_proxies() -> None:
    """nginx forwards each browser's address to the API and the UI, the UI forwards it to the API;
    the API counts it only from their fixed addresses, the UI only from nginx's, all in the
    network's subnet."""
    nginx_address = SERVICES["nginx"]["networks"]["default"]["ipv4_address"]
    ui_address = SERVICES["ui"]["networks"]["default"]["ipv4_address"]
    assert SERVICES["api"]["environment"]["TRUSTED_PROXIES"].split(",") == [nginx_address, ui_address]
    assert SERVICES["ui"]["environment"]["UI_TRUSTED_PROXIES"] == nginx_address
    [subnet] = [c["subnet"] for c in COMPOSE["networks"]["default"]["ipam"]["config"]]
    for address in (nginx_address, ui_address):
        assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet)


def test_nginx_is_the_door() -> None:
    """The official image with the project's template and limits script mounted where its
    entrypoint renders them (only PORTAL_* names), from the same settings the API gets; the API and
    the UI publish no port of their own."""
    nginx = SERVICES["nginx"]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+-alpine", nginx["image"])
    assert nginx["ports"] == ["80:80"] and nginx["environment"]["PORTAL_LISTEN"] == "80"
    assert set(nginx["volumes"]) == {
        "./deploy/nginx/portal.conf.template:/etc/nginx/templates/default.conf.template:ro",
        "./deploy/nginx/portal-limits.envsh:/docker-entrypoint.d/15-portal-limits.envsh:ro",
    }
    assert (
        ROOT / "deploy" / "nginx" / "portal-limits.envsh"
    ).stat().st_mode & 0o111, "the entrypoint runs it only if executable"
    env = nginx["environment"]
    assert env["NGINX_ENVSUBST_FILTER"] == "PORTAL_"
    assert env["PORTAL_API"] == f"api:{SERVICES['api']['environment']['API_PORT']}"
    assert env["PORTAL_UI"] == f"ui:{SERVICES['ui']['environment']['UI_PORT']}"
    for name in ("MAX_UPLOAD_BYTES", "MAX_BATCH_BYTES", "PREDICT_DEADLINE_SECONDS", "EXPLANATION_WAIT_SECONDS"):
        assert env[name] == SERVICES["api"]["environment"][name], name
    assert "ports" not in SERVICES["api"] and "ports" not in SERVICES["ui"]


def test_nginx_refuses_the_networks_gateway_the_monitoring_routes() -> None:
    """Docker's userland proxy connects from the network's gateway for IPv6 clients and hairpin
    connections, a private address nginx would otherwise let read /metrics: the network names its
    gateway, and nginx is given that address to refuse."""
    [config] = COMPOSE["networks"]["default"]["ipam"]["config"]
    gateway = ipaddress.ip_address(config["gateway"])
    assert gateway in ipaddress.ip_network(config["subnet"])
    assert gateway not in ipaddress.ip_network(config["ip_range"]), "no container may be given it"
    assert SERVICES["nginx"]["environment"]["PORTAL_DOCKER_GATEWAY"] == str(gateway)
    template = (ROOT / "deploy" / "nginx" / "portal.conf.template").read_text()
    assert template.count("deny ${PORTAL_DOCKER_GATEWAY};") == 2


def test_the_database_password_reaches_the_api_whole() -> None:
    """compose pastes POSTGRES_PASSWORD into the API's DATABASE_URL as it is: the db and the URL
    share one default, the same as .env.original's, which the URL carries unchanged."""
    from sqlalchemy.engine import make_url

    from scripts.write_env_original import COMPOSE_ONLY

    given = SERVICES["db"]["environment"]["POSTGRES_PASSWORD"]
    match = re.fullmatch(r"\$\{POSTGRES_PASSWORD:-([^}]*)\}", given)
    assert match, given
    default = match[1]
    assert COMPOSE_ONLY["POSTGRES_PASSWORD"][0] == default
    assert f"\nPOSTGRES_PASSWORD={default}\n" in (ROOT / ".env.original").read_text()
    url = SERVICES["api"]["environment"]["DATABASE_URL"]
    assert given in url
    # A password of URL-safe characters (what .env.original asks for) reaches the API unchanged.
    for password in (default, "Ab3-._~xyz"):
        assert make_url(url.replace(given, password)).password == password


def test_redis_never_evicts() -> None:
    """The API and the workers refuse to run on a Redis that may delete keys when it is full."""
    from contracts.redis_policy import SAFE_POLICY

    command = SERVICES["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == SAFE_POLICY


def test_ports_match_setting_defaults() -> None:
    api_default = Settings(_env_file=None).api_port  # type: ignore[call-arg]
    ui_default = UISettings(_env_file=None).ui_port  # type: ignore[call-arg]
    assert SERVICES["api"]["environment"]["API_PORT"] == str(api_default)
    assert SERVICES["ui"]["environment"]["UI_PORT"] == str(ui_default)
    assert f":{api_default}" in SERVICES["ui"]["environment"]["API_URL"]
    assert f":{api_default}/health/live" in " ".join(SERVICES["api"]["healthcheck"]["test"])


def test_dockerfiles_are_multi_stage_pinned_non_root_and_lean() -> None:
    for service in ("api", "model", "ui"):
        path = ROOT / SERVICES[service]["build"]["dockerfile"]
        text = path.read_text()
        bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
        assert len(bases) >= 2, path
        for base in bases:
            assert base in ("build", "weights") or re.search(r":\d+\.\d+\.\d+", base), (path, base)
        assert re.search(r"^USER\s+(?!root)\w+", text, flags=re.M), path
        requirements = re.findall(r"requirements/(\w+)\.txt", text)
        installed = "".join((ROOT / "requirements" / f"{r}.txt").read_text() for r in requirements)
        has_tf = "tensorflow" in installed
        assert has_tf == (service == "model"), service
    assert "python -m model.prepare --require-weights" in (ROOT / "model" / "Dockerfile").read_text()


def test_env_original_lists_every_setting_current() -> None:
    from scripts.write_env_original import render

    assert (ROOT / ".env.original").read_text() == render()


def test_monitoring_files_match_the_code() -> None:
    import json

    from api.app.core import metrics

    scrape = yaml.safe_load((ROOT / "observability" / "prometheus.yml").read_text())
    api_port = Settings(_env_file=None).api_port  # type: ignore[call-arg]
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    defined = {m._name for m in vars(metrics).values() if hasattr(m, "_name")} | {"http_request_duration_seconds"}
    dashboard = json.loads((ROOT / "observability" / "grafana" / "dashboards" / "portal.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b((?:portal|http)_[a-z_]+)", e)}
    suffixes = ("_bucket", "_count", "_sum", "_total")
    base = {next((u[: -len(x)] for x in suffixes if u.endswith(x) and u[: -len(x)] in defined), u) for u in used}
    assert base <= defined, base - defined
    assert {"portal_queue_depth", "portal_live_workers", "portal_end_to_end_seconds", "portal_feedback"} <= base
