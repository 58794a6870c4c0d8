"""The model service's settings: a value no worker can run with stops it at start-up, naming the
setting, instead of failing later as a broken model or an error logged every second."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from model.config import ModelSettings
from tests.support import ROOT

REFUSED = [
    ("calibration_samples", 0),
    ("model_workers", 0),
    ("max_batch_size", 0),
    ("max_batch_delay_ms", -1),
    ("visibility_timeout_ms", 0),
    ("max_deliveries", 0),
    ("registry_check_s", 0),
    ("heartbeat_interval_s", 0),
    ("heartbeat_ttl_s", 0),
    ("heartbeat_ttl_s", 0.0004),  # 0 whole milliseconds: Redis refuses it
    ("inference_threads", 0),  # LiteRT refuses it: the TFLite versions would fail to load
    ("tf_inter_op_threads", -1),
    ("cpu_nice", 20),
    ("cpu_nice", -21),
    ("labels_ttl_s", 0),
    ("explanation_ttl_s", 0),
    ("explain_claim_idle_s", 0),
    ("batch_inference_cpus", -1),
    ("people_anticipation_ms", -1),
    ("batch_max_defer_ms", -1),
]
"""A value out of range for each numeric setting."""

ACCEPTED = {
    "calibration_samples": 1,
    "model_workers": 1,
    "max_batch_size": 1,
    "max_batch_delay_ms": 0,
    "visibility_timeout_ms": 50,
    "max_deliveries": 1,
    "registry_check_s": 0.1,
    "heartbeat_interval_s": 0.5,
    "heartbeat_ttl_s": 3,
    "inference_threads": 1,
    "tf_inter_op_threads": 0,
    "cpu_nice": 0,
    "labels_ttl_s": 1,
    "explanation_ttl_s": 1,
    "explain_claim_idle_s": 0.001,
    "batch_inference_cpus": 0,
    "people_anticipation_ms": 0,
    "batch_max_defer_ms": 0,
}
"""The least values that work, and those the suite's workers run with (``tests.support.model_env``)."""


@pytest.mark.parametrize(("name", "value"), REFUSED)
def test_a_setting_out_of_range_is_refused(name: str, value: float) -> None:
    with pytest.raises(ValidationError) as refused:
        ModelSettings.model_validate({name: value})
    assert [error["loc"] for error in refused.value.errors()] == [(name,)]


def test_the_least_values_that_work_the_suites_and_env_originals_are_accepted() -> None:
    settings = ModelSettings.model_validate(ACCEPTED)
    assert settings.model_dump(include=set(ACCEPTED)) == ACCEPTED
    ModelSettings(_env_file=ROOT / ".env.original")  # type: ignore[call-arg]


def test_a_heartbeat_must_outlive_its_interval() -> None:
    """A heartbeat that expires before it is renewed makes the worker look stopped between two:
    the API lists its models as unavailable and peers take its jobs over."""
    with pytest.raises(
        ValidationError, match=r"HEARTBEAT_TTL_S \(10\) must be longer than HEARTBEAT_INTERVAL_S \(10\)"
    ):
        ModelSettings.model_validate({"heartbeat_interval_s": 10, "heartbeat_ttl_s": 10})


def start_worker_with(variable: str, value: str, *, dropping: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """``python -m model`` with ``variable`` set to ``value``, the environment's variables that
    start with one of ``dropping`` left out, and a Redis address nothing listens on."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(dropping)},
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "WORKER_ID": "misconfigured",
        "PYTHONPATH": str(ROOT),
        variable: value,
    }
    return subprocess.run(
        [sys.executable, "-m", "model"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        # Was a TensorFlow error at warm-up, reported to admins as a model failing to load.
        ("MAX_BATCH_SIZE", "0", "Input should be greater than or equal to 1"),
        # Was "invalid expire time" every second, the worker never announced.
        ("HEARTBEAT_TTL_S", "0", "Input should be greater than or equal to 0.001"),
        # Was "registry follower error" every second.
        ("REGISTRY_CHECK_S", "-1", "Input should be greater than 0"),
        (
            "HEARTBEAT_INTERVAL_S",
            "20",
            "HEARTBEAT_TTL_S (10) must be longer than HEARTBEAT_INTERVAL_S (20): the heartbeat would expire"
            " between two renewals",
        ),
    ],
)
def test_a_worker_given_a_setting_out_of_range_stops_at_start_naming_it(variable: str, value: str, why: str) -> None:
    """One line on stderr and exit status 1, not a traceback, before anything is loaded (no
    Redis needed: the worker never gets that far)."""
    done = start_worker_with(variable, value, dropping=("HEARTBEAT_", "MAX_BATCH_", "REGISTRY_"))
    assert done.returncode == 1, done.stderr[-3000:]
    problem = why if variable == "HEARTBEAT_INTERVAL_S" else f"{variable}={value}: {why}"
    assert done.stderr.strip().splitlines() == [f"model worker refuses to start: {problem}"], done.stderr[-3000:]


@pytest.mark.parametrize(
    ("module", "process"),
    [
        ("model.explainer", "model explainer"),
        ("model.trainer", "model trainer"),
        # Were pydantic's many-line message, before anything was prepared or measured.
        ("model.prepare", "python -m model.prepare"),
        ("bench", "python -m bench"),
    ],
)
def test_the_other_model_side_commands_stop_alike(module: str, process: str) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAX_BATCH_")},
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "PYTHONPATH": str(ROOT),
        "MAX_BATCH_SIZE": "0",
    }
    done = subprocess.run([sys.executable, "-m", module], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"{process} refuses to start: MAX_BATCH_SIZE=0: Input should be greater than or equal to 1"
    ], done.stderr[-3000:]


@pytest.mark.parametrize(
    ("module", "process"), [("model.prepare", "python -m model.prepare"), ("bench", "python -m bench")]
)
def test_prepare_and_bench_name_a_registry_file_they_cannot_read(module: str, process: str) -> None:
    """Were a FileNotFoundError traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REGISTRY_PATH": "/nonexistent/registry.yaml"}
    done = subprocess.run([sys.executable, "-m", module], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"{process} refuses to start: REGISTRY_PATH=/nonexistent/registry.yaml: no such file"
    ], done.stderr[-3000:]


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        # Explained nothing while looking healthy.
        (
            "EXPLAIN_MODELS",
            "sketch,skecth@3",
            "EXPLAIN_MODELS='sketch,skecth@3': 'skecth@3' matches no model version in the registry; known: ",
        ),
        ("EXPLAIN_MODELS", "sketch@x", "EXPLAIN_MODELS='sketch@x': invalid model version in 'sketch@x'"),
        # Was a FileNotFoundError traceback.
        ("REGISTRY_PATH", "/nonexistent/registry.yaml", "REGISTRY_PATH=/nonexistent/registry.yaml: no such file"),
    ],
)
def test_an_explainer_told_to_explain_what_no_registry_has_stops_at_start(variable: str, value: str, line: str) -> None:
    """One line and status 1, before any model is built (Redis down: the file's registry)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EXPLAIN_", "REGISTRY_"))},
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "PYTHONPATH": str(ROOT),
        variable: value,
    }
    done = subprocess.run(
        [sys.executable, "-m", "model.explainer"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr[-3000:]
    said = done.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"model explainer refuses to start: {line}"), done.stderr[-3000:]


def test_prepare_names_a_serve_models_reference_no_registry_serves() -> None:
    """Was the reason alone, without the process that refused."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SERVE_MODELS": "sketch@1,nope"}
    done = subprocess.run(
        [sys.executable, "-m", "model.prepare"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr[-3000:]
    said = done.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(
        "python -m model.prepare refuses to start:"
        " SERVE_MODELS='sketch@1,nope': 'nope' matches no model version served here; served: "
    ), done.stderr[-3000:]


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        # Was a FileNotFoundError traceback.
        ("REGISTRY_PATH", "/nonexistent/registry.yaml", "REGISTRY_PATH=/nonexistent/registry.yaml: no such file"),
        # A YAML file that is no registry: pydantic quoted its text (here, compose's addresses).
        (
            "REGISTRY_PATH",
            str(ROOT / "docker-compose.yml"),
            f"REGISTRY_PATH={ROOT / 'docker-compose.yml'}: not a model registry (",
        ),
        ("REGISTRY_PATH", str(ROOT / ".env.original"), f"REGISTRY_PATH={ROOT / '.env.original'}: not a YAML file"),
        # Was a ValueError traceback from the Redis client; the URL may hold a password: not shown.
        (
            "REDIS_URL",
            "http://user:hunter2@127.0.0.1:1/0",
            "REDIS_URL: Redis URL must specify one of the following schemes (redis://, rediss://, unix://)",
        ),
        ("REDIS_URL", "redis://user:hunter2@127.0.0.1:port/0", "REDIS_URL: Port could not be cast to integer value"),
    ],
)
def test_a_worker_given_a_registry_file_or_redis_url_it_cannot_use_stops_naming_it(
    variable: str, value: str, line: str
) -> None:
    done = start_worker_with(variable, value, dropping=("REGISTRY_PATH", "SERVE_MODELS"))
    assert done.returncode == 1, done.stderr[-3000:]
    said = done.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"model worker refuses to start: {line}"), done.stderr[-3000:]
    assert not {"hunter2", "SECRET_KEY", "172.28.0.10"} & set(re.findall(r"[\w.]+", done.stderr))
