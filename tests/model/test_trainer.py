"""The training worker's loop with entries it cannot read."""

from __future__ import annotations

import json
import threading
import time
from typing import cast

import redis

from contracts import training
from model.config import ModelSettings
from model.trainer import Trainer
from tests.support import RedisServer


def test_a_run_with_an_option_the_trainer_does_not_know_fails_and_the_trainer_goes_on(
    private_redis: RedisServer, model_settings: ModelSettings
) -> None:
    r = redis.Redis.from_url(private_redis.url)
    options = training.TrainingOptions().model_dump() | {"ema_decay": 0.999}  # a newer API's option
    unknown = {"run_id": "from-a-newer-api", "model": "sketch", "version": 9, "categories": ["cat"], "options": options}
    r.xadd(training.JOB_STREAM, {"meta": json.dumps(unknown).encode()})
    r.xadd(training.JOB_STREAM, {"meta": b"not json"})
    trainer = Trainer(model_settings.model_copy(update={"redis_url": private_redis.url, "worker_id": "trainer-test"}))
    loop = threading.Thread(target=trainer.run, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while not r.exists(training.EVENT_STREAM) or not r.xlen(training.EVENT_STREAM):
            assert time.monotonic() < deadline, "no event for the unreadable run"
            time.sleep(0.1)
        [(_, fields)] = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(training.EVENT_STREAM))
        event = training.TrainingEvent.model_validate_json(fields[b"meta"])
        assert (event.run_id, event.kind) == ("from-a-newer-api", "failed")
        assert event.error is not None and "ema_decay" in event.error
        # Both entries are taken, and the loop still reads the stream.
        time.sleep(1.5)
        assert loop.is_alive() and r.xpending(training.JOB_STREAM, training.JOB_GROUP)["pending"] == 0
        assert r.xinfo_groups(training.JOB_STREAM)[0]["entries-read"] == 2
    finally:
        trainer.stop()
        loop.join(10)
