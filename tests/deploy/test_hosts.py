"""The portal as separate hosts on this machine (tests/deploy/hosts.py): one for PostgreSQL and
Redis, one for the API, two for model workers, each a network namespace on one bridge, the test
process on the bridge too, as a client would be.

No disk is shared between the API and the workers: the API's image store is a tmpfs mounted in
the API host's own mount namespace, which no other process sees (the machine's directory under it
stays empty). A worker gets the image bytes in the job's Redis message (contracts/messages.py), so
nothing else is needed. Workers share only what a worker image would hold: the code, and the model
weights read from MODELS_DIR.

One test, in phases that build on each other, since starting the hosts (about 20 s) is most of its time:
a photo is classified; under load a worker host is cut off the network while it holds jobs, then
plugged back in; under load the other worker host is killed while it holds jobs; the API host is
cut off while answers for it are produced. Every accepted job is answered exactly once, and the
portal recovers each time without a restart.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import httpx
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import Service, start_redis, wait_until
from contracts import keys, workers
from contracts.messages import JobMessage
from scripts.local_services import PrivatePostgres
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.deploy import hosts
from tests.deploy.hosts import Host, Network
from tests.support import ARTIFACTS, PHOTOS, ROOT, http_ok

NOT_AVAILABLE = hosts.available()
pytestmark = [
    pytest.mark.skipif(NOT_AVAILABLE is not None, reason=f"separate hosts: {NOT_AVAILABLE}"),
    pytest.mark.timeout(300),  # 40-55 s; every wait inside is bounded, this bounds their sum
]

MODEL = "mobilenet_v2"
SERVED = "mobilenet_v2@1"
"""What the workers load: the version "mobilenet_v2" is routed to (its stable one), alone, so
they start in seconds."""
STREAM = keys.job_stream(MODEL, 1)
BURST = 24
"""Concurrent predictions of distinct images under which a worker host fails."""
VISIBILITY_TIMEOUT_MS = 3000
"""After this, a job held by a worker that went silent is taken over by the other."""
CUT_SECONDS = 5.0
"""The shortest a cable stays pulled: longer than the heartbeat TTL (3 s), so the portal does
notice the host gone, and than the visibility timeout."""
RECOVERY_SECONDS = 30.0
"""The longest the portal may take to serve again once a cable is plugged back in."""
PG_PORT, REDIS_PORT, API_PORT = 5432, 6379, 8000
"""Each host has its own ports, so the usual ones (nothing of the machine's own is touched)."""

T = TypeVar("T")


@dataclass
class Portal:
    """The running hosts and what runs on them; ``close`` stops and removes all of it."""

    net: Network
    logs: Path
    secret: str = field(default_factory=lambda: os.urandom(32).hex())
    services: list[Service] = field(default_factory=list)
    workers: dict[str, Service] = field(default_factory=dict)
    postgres: PrivatePostgres | None = None
    folders: list[Path] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://{self.net.hosts['db'].address}:{REDIS_PORT}/0"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.net.hosts['db'].address}:{PG_PORT}/portal"

    @property
    def url(self) -> str:
        return f"http://{self.net.hosts['api'].address}:{API_PORT}"

    def worker_id(self, role: str) -> str:
        return f"hosts-{self.net.tag}-{role}"

    def start(self) -> None:
        self.net.up()
        db, api = self.net.add_host("db"), self.net.add_host("api")
        w1, w2 = self.net.add_host("w1"), self.net.add_host("w2")
        for host in self.net.hosts.values():
            # Each host reaches its link's subnet and nothing else: no default route, no NAT.
            routes = host.routes()
            assert len(routes) == 1 and routes[0].startswith(f"{self.net.subnet} dev eth0 "), routes
        self._start_db(db)
        for host in (w1, w2):  # they load their model while the API gets ready
            self.workers[host.role] = self._start_worker(host)
        self._start_api(api)
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        for role, worker in self.workers.items():

            def ready(worker: Service = worker, role: str = role) -> bool:
                assert worker.alive(), f"worker {role} exited:\n{worker.log()[-3000:]}"
                return bool(client.exists(keys.heartbeat_key(self.worker_id(role))))

            wait_until(ready, 180, f"worker host {role}")

    def _start_db(self, db: Host) -> None:
        # A folder of its own: PostgreSQL runs as another user, who must be able to reach it.
        folder = Path(tempfile.mkdtemp(prefix=f"portal-hosts-{self.net.tag}-pg-"))
        self.folders.append(folder)
        self.postgres = PrivatePostgres(folder, db.address, PG_PORT, netns=db.netns, trusted=[str(self.net.subnet)])
        self.postgres.init()
        self.postgres.start()
        self.services.append(
            start_redis(REDIS_PORT, host=db.address, launcher=db.launcher, log_dir=self.logs, cwd=self.logs)
        )

    def _start_worker(self, host: Host) -> Service:
        env = {
            "REDIS_URL": self.redis_url,
            "WORKER_ID": self.worker_id(host.role),
            "SERVE_MODELS": SERVED,
            "ALLOW_WEIGHT_DOWNLOAD": "false",
            "VISIBILITY_TIMEOUT_MS": str(VISIBILITY_TIMEOUT_MS),
            "MAX_BATCH_SIZE": "4",
            "INFERENCE_THREADS": "1",  # two workers share this machine's two cores
            "HEARTBEAT_INTERVAL_S": "0.5",
            "HEARTBEAT_TTL_S": "3",
            "LOG_JSON": "true",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": str(ROOT),
        }
        args = [*host.launcher, sys.executable, "-m", "model"]
        worker = Service(f"worker-{host.role}", args, env, log_dir=self.logs, cwd=ROOT).start()
        self.services.append(worker)
        return worker

    def _start_api(self, api: Host) -> None:
        disk = Path(tempfile.mkdtemp(prefix=f"portal-hosts-{self.net.tag}-api-"))
        self.folders.append(disk)
        env = {
            "ENVIRONMENT": "test",
            "SECRET_KEY": self.secret,
            "DATABASE_URL": self.dsn.replace("postgresql://", "postgresql+asyncpg://"),
            "REDIS_URL": self.redis_url,
            "STORAGE_DIR": str(disk / "storage"),
            "TRAINING_DATA_DIR": str(disk / "storage" / "training"),
            "FIRST_ADMIN_EMAIL": ADMIN_EMAIL,
            "FIRST_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "API_HOST": api.address,
            "API_PORT": str(API_PORT),
            "DB_POOL_SIZE": "10",
            "MAX_JOBS_IN_FLIGHT_PER_USER": "200",
            "LOG_JSON": "true",
            "PYTHONPATH": str(ROOT),
        }
        with (self.logs / "prestart.log").open("ab") as log:
            done = subprocess.run(
                [*api.launcher, sys.executable, "-m", "api.prestart"],
                env={**os.environ, **env},
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=180,
            )
        assert done.returncode == 0, (self.logs / "prestart.log").read_text(errors="replace")[-3000:]
        (disk / "storage").mkdir()
        # The API's disk: a tmpfs in the mount namespace `ip netns exec` gives the API alone.
        private_disk = 'mount -t tmpfs -o mode=0700 tmpfs "$STORAGE_DIR" && exec "$@"'
        args = [*api.launcher, "sh", "-c", private_disk, "sh", sys.executable, "-m", "api"]
        api_service = Service("api", args, env, log_dir=self.logs, cwd=ROOT)
        self.services.append(api_service)
        api_service.start(lambda: http_ok(f"{self.url}/health/live"), timeout=90)

    @property
    def machine_storage(self) -> Path:
        """The API's storage directory as the rest of the machine (the workers too) sees it."""
        return next(folder for folder in self.folders if "-api-" in folder.name) / "storage"

    def close(self) -> None:
        """Stops everything, the API first, and removes the hosts; each step is tried even if
        one fails, so a failed run leaves nothing behind."""
        for worker in self.workers.values():
            with suppress(Exception):
                if worker.alive():
                    worker.proc.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM
        for service in reversed(self.services):
            with suppress(Exception):
                service.stop()
        if self.postgres is not None:
            with suppress(Exception):
                self.postgres.stop(mode="immediate")
            with suppress(OSError):  # kept with the other logs: its folder goes
                shutil.copy(self.postgres.log, self.logs / "postgres.log")
        self.net.close()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def running_portal() -> Iterator[Portal]:
    net = Network()
    logs = ARTIFACTS / f"hosts-{net.tag}"
    logs.mkdir(parents=True, exist_ok=True)
    portal = Portal(net, logs)
    try:
        portal.start()
        yield portal
    finally:
        portal.close()


def photo_variants(count: int, seed: str) -> list[bytes]:
    """Distinct JPEGs cut from the real photos (a random crop each), so no cached answer
    stands in for a worker's."""
    rng = random.Random(seed)
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".bmp"))
    out = []
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as opened:
            img = opened.convert("RGB")
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 0.95)), int(h * rng.uniform(0.6, 0.95))
        x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        buf = io.BytesIO()
        img.crop((x, y, x + cw, y + ch)).resize((256, 256)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    assert len(set(out)) == count
    return out


def predict(client: httpx.Client, headers: dict[str, str], name: str, data: bytes) -> httpx.Response:
    return client.post(
        "/model/predict", params={"models": MODEL}, files={"file": (name, data, "image/jpeg")}, headers=headers
    )


def wait_done(client: httpx.Client, headers: dict[str, str], job_id: str, within: float) -> dict[str, Any]:
    """The job once final; fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        r = client.get(f"/v1/predictions/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        if (body := cast(dict[str, Any], r.json()))["status"] not in ("pending", "queued", "running"):
            return body
        assert time.monotonic() < deadline, f"job {job_id} not final within {within:.0f} s: {body}"
        time.sleep(0.2)


def burst(
    portal: Portal,
    headers: dict[str, str],
    images: list[bytes],
    during: Callable[[], T],
) -> tuple[list[httpx.Response], T]:
    """Sends every image at once to POST /model/predict and calls ``during`` while they are
    being answered; the responses, in order, and what ``during`` returned."""
    limits = httpx.Limits(max_connections=len(images))
    with (
        httpx.Client(base_url=portal.url, timeout=httpx.Timeout(90, connect=10), limits=limits) as client,
        ThreadPoolExecutor(len(images)) as pool,
    ):
        futures = [pool.submit(predict, client, headers, f"load-{i}.jpg", data) for i, data in enumerate(images)]
        outcome = during()
        return [f.result() for f in futures], outcome


def accepted(portal: Portal, headers: dict[str, str], responses: list[httpx.Response]) -> list[str]:
    """The jobs of a burst, each checked answered: 200 with a done result; 504 (accepted, its
    answer late) only if the job is done later. The API refuses a job only with 503 and
    Retry-After, and then queued nothing."""
    jobs = []
    with httpx.Client(base_url=portal.url, timeout=10) as client:
        for r in responses:
            if r.status_code == 200:
                body = r.json()
                assert body["success"] and body["results"][SERVED]["status"] == "done", body
                jobs.append(body["job_id"])
            elif r.status_code == 504:
                late = re.search(r"/v1/predictions/([0-9a-f-]{36})", r.json()["detail"])
                assert late, r.text
                assert wait_done(client, headers, late.group(1), 60)["status"] == "done"
                jobs.append(late.group(1))
            else:
                assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
    return jobs


def held_jobs(client: redis.Redis, consumer: str) -> set[str]:
    """The jobs a worker has taken and not answered (its pending entries of the job stream)."""
    pending = client.xpending_range(STREAM, keys.JOB_GROUP, min="-", max="+", count=1000, consumername=consumer)
    jobs = set()
    for entry in pending:
        for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(STREAM, entry["message_id"])):
            jobs.add(JobMessage.from_fields(fields).job_id)
    return jobs


def freeze_holding(client: redis.Redis, worker: Service, consumer: str) -> set[str]:
    """SIGSTOPs ``worker`` at a moment it holds jobs (a batch takes tens of milliseconds: it must
    not finish them); the jobs it holds."""
    held: set[str] = set()

    def attempt() -> bool:
        if not held_jobs(client, consumer):
            return False
        worker.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)  # an answer already on its way to Redis lands first
        if jobs := held_jobs(client, consumer):
            held.update(jobs)
            return True
        worker.proc.send_signal(signal.SIGCONT)
        return False

    wait_until(attempt, 30, f"{consumer} holding jobs", interval=0.005)
    return held


def answers(portal: Portal, job_ids: list[str]) -> dict[str, tuple[int, str, str]]:
    """Per job: how many predictions it has, their status and the worker that answered."""

    async def query() -> dict[str, tuple[int, str, str]]:
        conn = await asyncpg.connect(portal.dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT job_id::text AS job, count(*) AS n, min(status) AS status, min(worker_id) AS worker"
                " FROM predictions WHERE job_id = ANY($1::uuid[]) GROUP BY job_id",
                job_ids,
            )
        finally:
            await conn.close()
        return {row["job"]: (row["n"], row["status"], row["worker"]) for row in rows}

    return asyncio.run(query())


def stored_answers(portal: Portal) -> float:
    """Answers the API has stored for the model (a duplicate one is not stored, so not counted)."""
    text = httpx.get(f"{portal.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "portal_jobs_total" and (labels["model"], labels["status"]) == (MODEL, "done"):
                return sample.value
    return 0.0


def assert_answered_once(portal: Portal, jobs: list[str], expected_total: int) -> None:
    """Each job has its one prediction, done, and the API stored as many answers in all as jobs
    were accepted: none lost, none stored twice."""
    found = answers(portal, jobs)
    assert {job: (n, status) for job, (n, status, _) in found.items()} == {job: (1, "done") for job in jobs}
    assert stored_answers(portal) == expected_total


def login(url: str) -> dict[str, str]:
    r = httpx.post(f"{url}/login", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}, timeout=30)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def test_portal_on_separate_hosts_loses_no_job_to_a_dead_or_cut_off_host() -> None:
    started = time.monotonic()
    with running_portal() as portal:
        up = time.monotonic() - started
        net, w1, w2 = portal.net, portal.workers["w1"], portal.workers["w2"]
        id1, id2 = portal.worker_id("w1"), portal.worker_id("w2")
        rds = redis.Redis.from_url(portal.redis_url, socket_timeout=10)
        headers = login(portal.url)
        total = 0

        # 1. A real photo, from this (the client's) host through the API host to a worker host.
        with httpx.Client(base_url=portal.url, timeout=60) as client:
            r = predict(client, headers, "parrot.jpg", (PHOTOS / "parrot.jpg").read_bytes())
        assert r.status_code == 200, r.text
        assert r.json()["prediction"] == "macaw" and r.json()["score"] > 0.5, r.json()
        total += 1
        assert answers(portal, [r.json()["job_id"]])[r.json()["job_id"]][2] in (id1, id2)
        # The image is on the API host's disk alone: the worker had it from the message.
        assert not any(portal.machine_storage.iterdir())

        # 2. Worker host 1's cable pulled while it holds jobs: host 2 takes them over, and
        # host 1, plugged back in, serves again (its late answers, if any, are not stored again).
        def cut_w1() -> tuple[set[str], float]:
            held = freeze_holding(rds, w1, id1)
            net.cut(net.hosts["w1"])
            w1.proc.send_signal(signal.SIGCONT)  # it answers into a dead link
            return held, time.monotonic()

        responses, (held, cut_at) = burst(portal, headers, photo_variants(BURST, f"{net.tag}-cut"), cut_w1)
        time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
        jobs = accepted(portal, headers, responses)  # answered while host 1 was still cut off
        assert not rds.exists(keys.heartbeat_key(id1)), "worker host 1 was not cut off"
        net.restore(net.hosts["w1"])
        restored, restored_at = time.monotonic(), time.time()
        assert held <= set(jobs), "a job worker host 1 held was refused"
        total += len(jobs)
        assert_answered_once(portal, jobs, total)
        assert {answers(portal, sorted(held))[job][2] for job in held} == {id2}
        wait_until(
            lambda: (rds.zscore(workers.LIVE_WORKERS, id1) or 0) > restored_at, RECOVERY_SECONDS, "worker host 1 back"
        )
        w1_back = time.monotonic() - restored

        # 3. Worker host 2 killed (SIGKILL to its process group) while it holds jobs: host 1,
        # the one that was cut off and never restarted, answers them all.
        def kill_w2() -> set[str]:
            held = freeze_holding(rds, w2, id2)
            w2.kill()
            return held

        responses, held = burst(portal, headers, photo_variants(BURST, f"{net.tag}-kill"), kill_w2)
        jobs = accepted(portal, headers, responses)
        assert held <= set(jobs), "a job worker host 2 held was refused"
        total += len(jobs)
        assert_answered_once(portal, jobs, total)
        assert {answers(portal, sorted(held))[job][2] for job in held} == {id1}

        # 4. The API host's cable pulled while a worker answers its jobs: the answers wait in
        # Redis, and once it is plugged back in the API stores them and serves again.
        with httpx.Client(base_url=portal.url, timeout=30) as client:
            images = [
                client.post("/v1/images", files={"file": (f"late-{i}.jpg", data)}, headers=headers).json()["id"]
                for i, data in enumerate(photo_variants(6, f"{net.tag}-api"))
            ]
            w1.proc.send_signal(signal.SIGSTOP)  # briefly (under the heartbeat TTL): jobs queue up
            try:
                queued = [
                    client.post("/v1/predictions", json={"image_id": i, "models": [MODEL]}, headers=headers)
                    for i in images
                ]
                net.cut(net.hosts["api"])
                cut_at = time.monotonic()
            finally:
                w1.proc.send_signal(signal.SIGCONT)
        assert [r.status_code for r in queued] == [202] * len(queued), [r.text for r in queued]
        jobs = [r.json()["job_id"] for r in queued]
        # Answered while the API cannot hear it: the job stream empties into the result stream.
        wait_until(lambda: rds.xlen(STREAM) == 0, 30, "worker host 1 answering the API host's jobs")
        time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
        net.restore(net.hosts["api"])
        restored = time.monotonic()
        with httpx.Client(base_url=portal.url, timeout=10) as client:
            for job in jobs:
                assert wait_done(client, headers, job, RECOVERY_SECONDS)["status"] == "done"
            api_back = time.monotonic() - restored
            r = predict(client, headers, "owl.jpg", (PHOTOS / "owl.jpg").read_bytes())
            assert r.status_code == 200 and r.json()["success"], r.text
        total += len(jobs) + 1
        assert_answered_once(portal, [*jobs, r.json()["job_id"]], total)
        assert not any(portal.machine_storage.iterdir())
        published = rds.xinfo_stream(keys.RESULT_STREAM)["entries-added"]

    print(
        f"\nseparate hosts: up in {up:.1f} s; worker host back {w1_back:.1f} s and API host's answers stored "
        f"{api_back:.1f} s after their cables were plugged back in; {total} answers stored of {published} "
        f"published; {time.monotonic() - started:.1f} s in all"
    )
