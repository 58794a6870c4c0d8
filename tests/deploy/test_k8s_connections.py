"""The API pods' PostgreSQL connections at their most, in each overlay, against a stock server."""

from __future__ import annotations

import pytest

from api.app.core.config import Settings
from tests.deploy.test_k8s import OVERLAYS, named, render

STOCK_MAX_CONNECTIONS = 100
"""PostgreSQL's default ``max_connections``."""
SUPERUSER_RESERVED = 3
"""PostgreSQL's default ``superuser_reserved_connections``: not for the portal's role."""
BESIDE_THE_POOL = 6
"""Each API process's connections outside its pool: the background loops' 2 (and 2 overflow) and
the exports' 2 (README, "Performance")."""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_pods_at_their_most_fit_a_stock_postgresql(overlay: str) -> None:
    """Every pod the autoscaler may run, and the one a rolling update adds, each with its pool and
    the connections beside it, fit in the connections a stock PostgreSQL gives a normal role (the
    prod overlay's 6 pods at the default pool of 20 needed 182)."""
    objs = render(overlay)
    api = named(objs, "Deployment")["api"]
    hpa = named(objs, "HorizontalPodAutoscaler")["api"]
    (container,) = [c for c in api["spec"]["template"]["spec"]["containers"] if c["name"] == "api"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["API_WORKERS"] == "1"
    pool = int(env.get("DB_POOL_SIZE") or Settings.model_fields["db_pool_size"].default)
    overflow = int(env.get("DB_MAX_OVERFLOW") or Settings.model_fields["db_max_overflow"].default)
    pods = hpa["spec"]["maxReplicas"] + api["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    most = pods * (pool + overflow + BESIDE_THE_POOL)
    assert most <= STOCK_MAX_CONNECTIONS - SUPERUSER_RESERVED, (overlay, pods, pool, most)
