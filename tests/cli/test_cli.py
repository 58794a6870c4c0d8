"""``portal`` end to end against the real API and model worker: login, predict, batches (with a
resume after an interruption) and the exit code of each kind of failure."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import pytest
from PIL import Image

from api.app.batches.service import _fingerprint
from api.app.catalog.service import NOT_SERVED as CATALOGUE_NOT_SERVED
from api.app.core.config import Settings
from contracts.imaging import UPLOAD_EXTENSIONS
from portal_cli import main as cli_main
from portal_cli.archive import IMAGE_EXTENSIONS, collect, temporary_zip, zip_images
from portal_cli.config import BatchState, BatchStates, config_path
from portal_cli.errors import Terminated
from portal_cli.main import NOT_SERVED, _models, _unavailable_reason
from tests.cli.conftest import Account, run, stored
from tests.images import noise_png
from tests.support import PHOTOS, Service, free_port

MODEL = "mobilenet_v2@1"
PORTAL = Path(sys.executable).with_name("portal")
"""The console script ``pip install -e ./cli`` put beside this interpreter."""


def one_line(text: str) -> str:
    """``text`` when it is exactly one line (a CLI error), failing the test otherwise."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def make_images(folder: Path, n: int) -> list[str]:
    """``n`` different small PNGs of noise in ``folder`` (some in a subfolder); their names as the
    batch reports them (relative paths)."""
    rng = np.random.default_rng(n)
    names = []
    for i in range(n):
        name = f"part{i % 2}/img{i:03d}.png" if i % 3 == 0 else f"img{i:03d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def batches(account: Account) -> dict[str, object]:
    body = httpx.get(f"{account.url}/v1/batches", headers=account.headers()).json()
    assert isinstance(body, dict)
    return body


def test_extensions_are_the_portals() -> None:
    assert set(UPLOAD_EXTENSIONS) == IMAGE_EXTENSIONS


def test_login_keeps_a_private_token_that_works(account: Account, config_dir: Path) -> None:
    result = run("login", "--url", account.url + "/", "--email", account.email, input=account.password + "\n")
    assert result.exit_code == 0, result.output
    assert account.password not in result.output  # the prompt hides it
    assert stat.S_IMODE(config_path().stat().st_mode) == 0o600
    body = stored()
    assert body["url"] == account.url and body["email"] == account.email
    login = body["login"]
    assert isinstance(login, dict)
    me = httpx.get(f"{account.url}/v1/users/me", headers={"Authorization": f"Bearer {login['token']}"})
    assert me.status_code == 200 and me.json()["email"] == account.email

    wrong = run("login", "--email", account.email, input="not-the-password\n")
    assert wrong.exit_code == 3
    assert "Incorrect" in one_line(wrong.stderr)
    assert stored()["login"] == login  # a failed login keeps the one that works


def test_predict_prints_one_line_per_file_and_model(logged_in: Account) -> None:
    parrot = str(PHOTOS / "parrot.jpg")
    result = run("predict", parrot, "--model", MODEL)
    assert result.exit_code == 0, result.output
    line = one_line(result.stdout)
    match = re.fullmatch(rf"{re.escape(parrot)}  {MODEL}  (\S+)  (\d+\.\d)%", line)
    assert match and match[1] == "macaw", line
    assert 50 < float(match[2]) <= 100

    as_json = run("predict", parrot, "-m", MODEL, "--json")
    assert as_json.exit_code == 0, as_json.output
    [answer] = json.loads(as_json.stdout)
    assert (answer["file"], answer["model"], answer["status"], answer["label"]) == (parrot, MODEL, "done", "macaw")
    assert 0.5 < answer["score"] <= 1 and len(answer["top_k"]) >= 5


def test_a_refused_file_is_one_line_and_exit_1(logged_in: Account, tmp_path: Path) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is text, not a photo")
    result = run("predict", str(fake), str(PHOTOS / "parrot.jpg"), "-m", MODEL)
    assert result.exit_code == 1, result.output
    error = one_line(result.stderr)
    assert error.startswith(f"portal: {fake}: ") and "not an image" in error
    assert "Traceback" not in result.output
    assert "macaw" in one_line(result.stdout)  # the other file still answered

    unknown = run("predict", str(PHOTOS / "parrot.jpg"), "-m", "no_such_model@9")
    assert unknown.exit_code == 1 and "no_such_model" in one_line(unknown.stderr)

    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = run("batch", str(empty), "--out", str(tmp_path / "out.csv"))
    assert nothing.exit_code == 1 and "No images" in one_line(nothing.stderr)

    # A model the portal does not offer is refused before the folder is zipped and sent.
    folder = tmp_path / "collection"
    make_images(folder, 3)
    misnamed = run("batch", str(folder), "-m", "no_such_model@9", "--out", str(tmp_path / "out.csv"))
    assert "Zipping" not in misnamed.stderr and "Uploading" not in misnamed.stderr, misnamed.stderr
    error = one_line(misnamed.stderr)
    assert misnamed.exit_code == 1 and "Unknown model 'no_such_model@9'" in error and MODEL in error, error
    assert batches(logged_in)["count"] == 0 and BatchStates().get(str(folder.resolve())) is None


def test_predict_refuses_what_is_not_a_regular_file_before_sending_anything(logged_in: Account, tmp_path: Path) -> None:
    """A named pipe (reading it waits for a writer: the run would hang) or a device (/dev/zero
    never ends) among the files is refused up front, one line naming it and exit 1, before any
    file is read or sent: the photo before it is not classified either."""
    parrot = str(PHOTOS / "parrot.jpg")
    fifo = tmp_path / "odd" / "fifo.jpg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    # Its own process, so that a run stuck on the pipe fails the test instead of hanging it.
    piped = subprocess.run(
        [str(PORTAL), "predict", parrot, str(fifo), "-m", MODEL], capture_output=True, text=True, timeout=60
    )
    assert piped.returncode == 1 and piped.stdout == "", piped
    assert one_line(piped.stderr) == f"portal: {fifo} is a named pipe, not a regular file: nothing was sent."

    device = run("predict", parrot, "/dev/zero", "-m", MODEL)
    assert device.exit_code == 1 and device.stdout == "", device.output
    assert one_line(device.stderr) == "portal: /dev/zero is a device, not a regular file: nothing was sent."


def test_batch_refuses_a_pipe_or_device_as_its_input(logged_in: Account, tmp_path: Path) -> None:
    """``portal batch`` on a named pipe (it would wait for a writer) or a device (/dev/zero never
    ends) is wrong usage, exit 2, before anything is read or sent."""
    fifo = tmp_path / "collection.zip"
    os.mkfifo(fifo)
    out = str(tmp_path / "out.csv")
    piped = subprocess.run(
        [str(PORTAL), "batch", str(fifo), "--out", out, "-m", MODEL], capture_output=True, text=True, timeout=60
    )
    assert piped.returncode == 2 and "is a named pipe" in " ".join(piped.stderr.split()), piped
    device = run("batch", "/dev/zero", "--out", out, "-m", MODEL)
    assert device.exit_code == 2 and "/dev/zero is a device" in " ".join(device.output.split()), device.output


def test_predict_refuses_a_file_of_gigabytes_unread(logged_in: Account, tmp_path: Path) -> None:
    """A file far past any upload the portal takes is refused by what it holds, without reading it
    into memory first (a sparse file of 50 GiB here: read whole, it failed with MemoryError)."""
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as f:
        f.truncate(50 * 2**30)
    result = run("predict", str(huge), "-m", MODEL)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert "is larger than 64 MiB" in one_line(result.stderr), result.stderr


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc")
def test_predict_sends_a_file_as_read_whatever_size_it_said(logged_in: Account) -> None:
    """A file whose size changes while it is read is sent as it was read, not cut off or overrun
    against the size it had first: /proc's files say 0 bytes and then read as more. The portal
    refuses this one as an image, which is the answer (exit 1), not an unexpected error."""
    result = run("predict", "/proc/self/status", "-m", MODEL)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    error = one_line(result.stderr)
    assert error.startswith("portal: /proc/self/status: "), error


def test_a_model_the_portal_refuses_batches_for_is_refused_before_anything_is_zipped(
    logged_in: Account, tmp_path: Path
) -> None:
    """A version the catalogue lists but its workers say cannot answer (not trained on this
    server, not installed, failed to load) is refused as the portal refuses its batch (422, the
    catalogue's reason), before the folder is zipped and sent; by name too when no version of it
    is served."""
    headers = logged_in.headers()
    offered = httpx.get(f"{logged_in.url}/v1/models", headers=headers).json()["data"]
    broken = [m for m in offered if not m["available"] and m["reason"] not in (None, NOT_SERVED)]
    assert broken, offered
    entry = broken[0]
    said = f"Model {entry['ref']} is unavailable: {entry['reason']}"
    # What the portal answers that batch itself, after its upload.
    r = httpx.post(
        f"{logged_in.url}/v1/batches",
        files={"file": ("a.png", noise_png())},
        data={"models": entry["ref"]},
        headers=headers,
    )
    assert r.status_code == 422 and r.json()["detail"] == said, r.text
    folder = tmp_path / "collection"
    make_images(folder, 3)
    refs = [entry["ref"]]
    if not any(m["available"] for m in offered if m["name"] == entry["name"]):
        refs.append(entry["name"])
    for ref in refs:
        result = run("batch", str(folder), "-m", ref, "--out", str(tmp_path / "out.csv"))
        assert "Zipping" not in result.stderr and "Uploading" not in result.stderr, result.stderr
        error = one_line(result.stderr)
        assert result.exit_code == 1 and error.startswith(f"portal: {said}") and "nothing was sent" in error, error
    assert batches(logged_in)["count"] == 0 and BatchStates().get(str(folder.resolve())) is None


def test_only_what_the_portal_refuses_is_refused_before_sending() -> None:
    """A version no live worker serves now (its worker restarting, or loading it) is the
    portal's to take (the batch waits for it), as are a bare name with a served version and a version that
    serves; a version whose workers said why it cannot answer is refused, and a bare name with
    none served by its newest stable version's reason."""

    def version(ref: str, channel: str, available: bool, reason: str | None) -> dict[str, object]:
        name, _, number = ref.partition("@")
        return {
            "ref": ref,
            "name": name,
            "version": int(number),
            "channel": channel,
            "available": available,
            "reason": reason,
        }

    not_trained = "it has not been trained on this server yet"
    offered = [
        version("sketch@2", "canary", False, NOT_SERVED),
        version("sketch@3", "stable", False, not_trained),
        version("birds@1", "stable", False, NOT_SERVED),
        version("mobilenet_v2@1", "stable", True, None),
        version("resnet50@1", "stable", False, "its model files are not installed on this server"),
        version("resnet50@2", "canary", True, None),
    ]
    assert NOT_SERVED == CATALOGUE_NOT_SERVED
    assert _unavailable_reason("sketch@3", offered) == ("sketch@3", not_trained)
    assert _unavailable_reason("sketch", offered) == ("sketch@3", not_trained)
    for ref in ("sketch@2", "birds@1", "birds", "mobilenet_v2@1", "mobilenet_v2", "resnet50"):
        assert _unavailable_reason(ref, offered) is None, ref


def test_a_directory_of_200_images_as_a_batch(logged_in: Account, tmp_path: Path) -> None:
    folder = tmp_path / "collection"
    names = make_images(folder, 200)
    (folder / "README.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"never sent")
    (folder / "link.png").symlink_to(folder / names[0])
    (folder / "loop").symlink_to(folder)  # a link to a folder is never followed, and counted
    out = tmp_path / "results.csv"
    result = run("batch", str(folder), "-m", MODEL, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "1 file(s) without an image extension left out" in result.stderr
    assert "2 symbolic link(s), pipe(s) or device(s) left out" in result.stderr
    table = rows(out)
    assert len(table) == 200
    assert sorted(r["file_name"] for r in table) == sorted(names)
    assert {(r["model"], r["version"], r["status"]) for r in table} == {("mobilenet_v2", "1", "done")}
    assert all(r["label"] and 0 < float(r["score"]) <= 1 for r in table)
    assert BatchStates().get(str(folder.resolve())) is None  # done: nothing left to resume
    assert batches(logged_in)["count"] == 1


def test_names_that_are_not_utf8_are_sent_with_replacement_characters(logged_in: Account, tmp_path: Path) -> None:
    """A file or folder name with bytes that are not UTF-8 (which Linux allows) is sent and shown
    with U+FFFD for those bytes; the folder's state file, named from its path, works as well, and
    the folder still zips to the same bytes twice."""
    folder = tmp_path / os.fsdecode(b"caf\xe9s")
    names = make_images(folder, 2)
    odd = folder / os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(PHOTOS / "parrot.jpg", odd)
    # Two names that differ only in such bytes: both sent, under names of their own.
    for raw in (b"\xe8.png", b"\xe9.png"):
        shutil.copy(folder / names[0], folder / os.fsdecode(raw))
    out = tmp_path / "results.csv"
    result = run("batch", str(folder), "-m", MODEL, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "Duplicate name" not in result.output
    expected = [*names, "caf\ufffd.jpg", "\ufffd.png", "\ufffd~2.png"]
    assert sorted(r["file_name"] for r in rows(out)) == sorted(expected)
    assert BatchStates().get(str(folder.resolve())) is None  # done: nothing left to resume

    predicted = run("predict", str(odd), "-m", MODEL)
    assert predicted.exit_code == 0, predicted.output
    assert one_line(predicted.stdout).startswith(f"{tmp_path}/caf\ufffds/caf\ufffd.jpg  {MODEL}  macaw  ")

    images = collect(folder).images
    with temporary_zip() as first, temporary_zip() as second:
        zip_images(first, folder, images)
        zip_images(second, folder, images)
        assert first.read_bytes() == second.read_bytes()


def start_batch(folder: Path, out: Path, **env: str) -> subprocess.Popen[str]:
    """``portal batch FOLDER --out OUT`` as its own process (with ``env`` added to this one's),
    to be interrupted with Ctrl-C."""
    return subprocess.Popen(
        [str(PORTAL), "batch", str(folder), "-m", MODEL, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        # Ctrl-C's default, even when the suite runs as a background job (which ignores SIGINT,
        # and Python then installs no KeyboardInterrupt for it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def remembered_batch(run: subprocess.Popen[str], key: str) -> BatchState:
    """The state ``run`` (a running ``portal batch``) remembers for ``key`` once it holds the batch's
    id; fails if the run ends first or takes a minute."""
    deadline = time.monotonic() + 60
    while (state := BatchStates().get(key)) is None or state.batch_id is None:
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "the batch id was never saved"
        time.sleep(0.02)
    return state


def test_an_interrupted_batch_is_resumed_not_sent_again(logged_in: Account, tmp_path: Path) -> None:
    folder = tmp_path / "collection"
    names = make_images(folder, 60)
    out = tmp_path / "results.csv"
    key = str(folder.resolve())
    first = start_batch(folder, out)
    try:
        state = remembered_batch(first, key)
        first.send_signal(signal.SIGINT)  # Ctrl-C while the batch runs
        _, err = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 130, err
    assert "Traceback" not in err and f"Batch {state.batch_id} goes on" in err
    assert not out.exists()
    headers = logged_in.headers()
    running = httpx.get(f"{logged_in.url}/v1/batches/{state.batch_id}", headers=headers).json()
    assert running["counts"]["done"] < 60, "the batch finished before the interruption: nothing was resumed"

    again = run("batch", str(folder), "-m", MODEL, "--out", str(out))
    assert again.exit_code == 0, again.output
    assert f"Following batch {state.batch_id}" in again.stderr
    assert sorted(r["file_name"] for r in rows(out)) == sorted(names)
    assert {r["status"] for r in rows(out)} == {"done"}
    listed = batches(logged_in)
    assert listed["count"] == 1, listed  # followed, not uploaded a second time
    assert BatchStates().get(key) is None


def test_cancel_says_numbers_that_add_up_to_the_batch(logged_in: Account, tmp_path: Path, worker: Service) -> None:
    """``portal batch DIR --cancel`` after an interrupted run: what was done, what was cancelled and
    what a worker already had (still answered) add up to the batch's images; one deleted since is
    said apart."""
    folder = tmp_path / "collection"
    make_images(folder, 60)
    key = str(folder.resolve())
    first = start_batch(folder, tmp_path / "results.csv")
    group = os.getpgid(worker.proc.pid)
    try:
        state = remembered_batch(first, key)
        url = f"{logged_in.url}/v1/batches/{state.batch_id}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = httpx.get(url, headers=logged_in.headers()).json()["counts"]
            if counts["done"] and counts["queued"] + counts["running"]:
                break
            time.sleep(0.05)
        os.killpg(group, signal.SIGSTOP)  # the job it holds stays in flight through the cancel
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=30)
        # One of its images deleted meanwhile: no longer among them, said apart.
        newest = httpx.get(f"{logged_in.url}/v1/images", params={"limit": 1}, headers=logged_in.headers())
        image_id = newest.json()["data"][0]["id"]
        assert httpx.delete(f"{logged_in.url}/v1/images/{image_id}", headers=logged_in.headers()).status_code == 204
        cancel = run("batch", str(folder), "-m", MODEL, "--cancel")
    finally:
        os.killpg(group, signal.SIGCONT)
        first.kill()
    assert cancel.exit_code == 0, cancel.output
    said = re.search(rf"Cancelled batch {state.batch_id}: (.*) \(of 59 images\); 1 deleted since\.", cancel.stderr)
    assert said is not None and "already with a worker" in said.group(1), cancel.stderr
    assert sum(int(part.split()[0]) for part in said.group(1).split(", ")) == 59, said.group(0)


def test_a_batch_cancelled_while_followed_stops_the_bar_where_the_answers_stopped(
    logged_in: Account, tmp_path: Path
) -> None:
    """Its owner cancels the batch while a run follows it: the run's last bar says Cancelled at
    the images answered (not full), the results of those are written and it exits 1."""
    folder = tmp_path / "collection"
    make_images(folder, 120)
    out = tmp_path / "results.csv"
    key = str(folder.resolve())
    following = start_batch(folder, out)
    try:
        state = remembered_batch(following, key)
        cancelled = httpx.delete(f"{logged_in.url}/v1/batches/{state.batch_id}", headers=logged_in.headers())
        _, err = following.communicate(timeout=60)
    finally:
        following.kill()
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    assert cancelled.json()["counts"]["cancelled"] > 0, "the batch finished before its cancel"
    assert following.returncode == 1, err
    final = httpx.get(f"{logged_in.url}/v1/batches/{state.batch_id}", headers=logged_in.headers()).json()
    answered = final["counts"]["done"] + final["counts"]["failed"]
    assert re.search(rf"Cancelled\b.*\b{answered}/120\b.*{final['counts']['cancelled']} not classified", err), err
    assert not re.search(r"(Classifying|Cancelled)\b.*\b120/120", err), err
    assert f"Batch {state.batch_id} cancelled: {final['counts']['done']} done" in err, err
    assert sum(1 for r in rows(out) if r["status"] == "done") == final["counts"]["done"]


def test_a_batch_interrupted_before_its_answer_is_followed_not_sent_twice(logged_in: Account, tmp_path: Path) -> None:
    """Ctrl-C once the portal has the batch but before its answer reached the CLI: the next run
    finds the batch the portal already had by the send's Idempotency-Key and follows it, without
    uploading the zip again."""
    folder = tmp_path / "collection"
    names = make_images(folder, 200)
    out = tmp_path / "results.csv"
    key = str(folder.resolve())
    headers = logged_in.headers()
    first = start_batch(folder, out)
    try:
        deadline = time.monotonic() + 60
        while not httpx.get(f"{logged_in.url}/v1/batches", headers=headers).json()["count"]:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the portal never received the batch"
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)  # the portal is receiving it; its answer has not come
        _, err = first.communicate(timeout=30)
    finally:
        first.kill()
    state = BatchStates().get(key)
    assert first.returncode == 130 and state is not None and state.batch_id is None, err
    assert "interrupted while the batch was being sent" in err and state.idempotency_key

    again = run("batch", str(folder), "-m", MODEL, "--out", str(out))
    assert again.exit_code == 0, again.output
    assert "Uploading" not in again.stderr, again.stderr
    listed = batches(logged_in)["data"]
    assert isinstance(listed, list) and len(listed) == 1, listed  # followed, not sent a second time
    made = listed[0]
    assert re.search(rf"(had received|still receiving) batch {made['id']}", again.stderr), again.stderr
    assert sorted(r["file_name"] for r in rows(out)) == sorted(names)
    assert BatchStates().get(key) is None


def test_cancel_after_a_send_interrupted_before_its_answer_finds_the_batch_by_its_key(
    logged_in: Account, tmp_path: Path
) -> None:
    """The run was interrupted before the portal's answer, so only the send's key is remembered:
    ``--cancel`` finds the batch the portal received with that key and cancels it."""
    folder = tmp_path / "collection"
    make_images(folder, 2)
    key, idempotency_key = str(folder.resolve()), "interrupted-send-to-cancel"
    r = httpx.post(
        f"{logged_in.url}/v1/batches",
        files=[("file", (f"{i}.png", noise_png(900 + i), "image/png")) for i in range(150)],
        data={"models": MODEL},
        headers={**logged_in.headers(), "Idempotency-Key": idempotency_key},
    )
    assert r.status_code == 202, r.text
    BatchStates().remember(BatchState(key, None, logged_in.url, [MODEL], time.time(), idempotency_key))
    cancel = run("batch", str(folder), "-m", MODEL, "--cancel")
    assert cancel.exit_code == 0, cancel.output
    assert f"Cancelled batch {r.json()['id']}: " in cancel.stderr, cancel.stderr
    detail = httpx.get(f"{logged_in.url}/v1/batches/{r.json()['id']}", headers=logged_in.headers()).json()
    assert detail["status"] == "cancelled", detail
    assert BatchStates().get(key) is None


def test_new_and_cancel_together_are_wrong_usage_and_cancel_nothing(logged_in: Account, tmp_path: Path) -> None:
    """``--new --cancel`` asks for two opposite things: refused as wrong usage (exit 2) in one line,
    and the remembered batch is neither cancelled nor forgotten."""
    folder = tmp_path / "collection"
    make_images(folder, 2)
    key = str(folder.resolve())
    r = httpx.post(
        f"{logged_in.url}/v1/batches",
        files={"file": ("a.png", noise_png(), "image/png")},
        data={"models": MODEL},
        headers=logged_in.headers(),
    )
    assert r.status_code == 202, r.text
    BatchStates().remember(BatchState(key, str(r.json()["id"]), logged_in.url, [MODEL], time.time()))
    for extra in ([], ["--out", str(tmp_path / "results.csv")]):
        result = run("batch", str(folder), "-m", MODEL, "--new", "--cancel", *extra)
        assert result.exit_code == 2, result.output
        said = [line for line in result.stderr.splitlines() if "--new" in line or "--cancel" in line]
        assert len(said) == 1 and "--new: it cannot be used together with --cancel" in said[0], result.stderr
    detail = httpx.get(f"{logged_in.url}/v1/batches/{r.json()['id']}", headers=logged_in.headers()).json()
    assert detail["status"] != "cancelled", detail
    remembered = BatchStates().get(key)
    assert remembered is not None and remembered.batch_id == str(r.json()["id"])


@pytest.mark.parametrize(
    ("remembered_models", "extra"),
    [([MODEL], []), ([MODEL], ["--new"]), (["nope"], [])],
    ids=["other models", "--new", "batch gone"],
)
def test_an_unknown_model_is_refused_before_a_new_batch_is_announced(
    logged_in: Account, tmp_path: Path, remembered_models: list[str], extra: list[str]
) -> None:
    """With a batch remembered for the folder, an unknown ``-m`` model is the one thing said (exit 1),
    not first that a new batch is being sent instead (the remembered one used other models,
    ``--new``, or the portal no longer has it); the remembered batch stays."""
    folder = tmp_path / "collection"
    make_images(folder, 2)
    key = str(folder.resolve())
    # The batch id is either never looked at or not one the portal has (gone).
    state = BatchState(key, str(uuid.uuid4()), logged_in.url, remembered_models, time.time())
    BatchStates().remember(state)
    result = run("batch", str(folder), "-m", "nope", "--out", str(tmp_path / "results.csv"), *extra)
    assert result.exit_code == 1, result.output
    error = one_line(result.stderr)
    assert error.startswith("portal: Unknown model 'nope'"), error
    remembered = BatchStates().get(key)
    assert remembered is not None and remembered.batch_id == state.batch_id
    assert batches(logged_in)["count"] == 0


def test_a_damaged_remembered_batch_is_said_before_a_new_one_is_sent(logged_in: Account, tmp_path: Path) -> None:
    """A state file that cannot be read costs a new upload, said with where an earlier batch is."""
    folder = tmp_path / "collection"
    make_images(folder, 2)
    key = str(folder.resolve())
    states = BatchStates()
    states.remember(BatchState(key, None, logged_in.url, [MODEL], time.time(), "k"))
    damaged = states.unreadable(key)
    assert damaged is None
    file = next(states.folder.glob("*.json"))
    file.write_text("{garbage", encoding="utf-8")
    assert states.unreadable(key) == file
    sent = run("batch", str(folder), "-m", MODEL, "--out", str(tmp_path / "results.csv"))
    assert sent.exit_code == 0, sent.output
    assert f"could not be read ({file})" in sent.stderr and "GET /v1/batches" in sent.stderr, sent.stderr
    assert batches(logged_in)["count"] == 1


def test_a_resent_batch_whose_files_changed_follows_the_batch_the_portal_received(
    logged_in: Account, tmp_path: Path
) -> None:
    """A run interrupted before its answer, then the folder changed: the next run finds the batch
    the interrupted send made by its key and follows it, as it follows a batch whose id it had,
    without sending anything; --new then sends the folder as it is now."""
    folder = tmp_path / "collection"
    make_images(folder, 3)
    out = tmp_path / "results.csv"
    key = str(folder.resolve())
    idempotency_key = "interrupted-send-1"
    headers = {**logged_in.headers(), "Idempotency-Key": idempotency_key}
    earlier = (folder / "img001.png").read_bytes()
    r = httpx.post(
        f"{logged_in.url}/v1/batches",
        files={"file": ("earlier.png", earlier, "image/png")},
        data={"models": MODEL},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    BatchStates().remember(BatchState(key, None, logged_in.url, [MODEL], time.time(), idempotency_key))

    followed = run("batch", str(folder), "-m", MODEL, "--out", str(out))
    assert followed.exit_code == 0, followed.output
    assert f"had received batch {r.json()['id']} before the interruption" in followed.stderr
    assert "--new sends" in followed.stderr and "Uploading" not in followed.stderr
    assert [row["file_name"] for row in rows(out)] == ["earlier.png"] and batches(logged_in)["count"] == 1
    assert BatchStates().get(key) is None
    anew = run("batch", str(folder), "-m", MODEL, "--out", str(out), "--new")
    assert anew.exit_code == 0, anew.output
    assert len(rows(out)) == 3 and batches(logged_in)["count"] == 2


def test_a_batch_cut_off_while_received_is_sent_again_by_the_next_run(
    logged_in: Account, tmp_path: Path, settings: Settings
) -> None:
    """An interrupted send left the portal receiving the batch (409): the next run follows it.
    It ends cancelled before it was all received (here its owner cancels it; a stopped process
    is cancelled by the lane): that run says so and exits 1, not undoing a cancel by itself, and
    the run after it sends the folder again with the same key, which makes a new batch."""
    folder = tmp_path / "collection"
    names = make_images(folder, 4)
    out = tmp_path / "results.csv"
    key, idempotency_key = str(folder.resolve()), "interrupted-send-2"
    with temporary_zip() as archive, archive.open("rb") as zipped:
        zip_images(archive, folder, collect(folder).images)
        fingerprint = _fingerprint([("collection.zip", zipped)], [], [MODEL])
    headers = logged_in.headers()
    me = httpx.get(f"{logged_in.url}/v1/users/me", headers=headers).json()
    receiving = asyncio.run(insert_receiving_batch(settings, me["id"], idempotency_key, fingerprint))
    BatchStates().remember(BatchState(key, None, logged_in.url, [MODEL], time.time(), idempotency_key))

    second = start_batch(folder, out)
    try:
        deadline = time.monotonic() + 60
        while (state := BatchStates().get(key)) is None or state.batch_id != receiving:
            assert second.poll() is None, second.communicate()
            assert time.monotonic() < deadline, "the run never followed the batch being received"
            time.sleep(0.05)
        cancelled = httpx.delete(f"{logged_in.url}/v1/batches/{receiving}", headers=headers)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        _, err = second.communicate(timeout=120)
    finally:
        second.kill()
    assert second.returncode == 1 and f"still receiving batch {receiving}" in err, err
    assert f"Batch {receiving} was cancelled before the portal had received all of it" in err, err
    state = BatchStates().get(key)
    assert state is not None and state.batch_id is None and state.idempotency_key == idempotency_key
    assert not out.exists() and batches(logged_in)["count"] == 1

    third = run("batch", str(folder), "-m", MODEL, "--out", str(out))
    assert third.exit_code == 0, third.output
    assert sorted(r["file_name"] for r in rows(out)) == sorted(names)
    listed = batches(logged_in)
    assert listed["count"] == 2, listed


async def insert_receiving_batch(settings: Settings, owner_id: int, idempotency_key: str, fingerprint: str) -> str:
    """A batch ``receiving`` with that key and fingerprint, as a send still being received leaves it."""
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        batch_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO batches (id, owner_id, status, models, entries, idempotency_key, request_fingerprint,"
            " fully_received, received_at, created_at) VALUES ($1, $2, 'receiving', $3, 4, $4, $5, false, now(), now())",
            batch_id,
            owner_id,
            json.dumps([MODEL]),
            idempotency_key,
            fingerprint,
        )
        return str(batch_id)
    finally:
        await conn.close()


def zip_written(temporary: Path, run: subprocess.Popen[str]) -> None:
    """Waits (up to 60 s) until the ``portal batch`` run has begun writing its zip in ``temporary``:
    a file of the zip's name, not any file (Python's ``tempfile`` makes and deletes one of its own
    there as it first looks for the temporary folder)."""
    deadline = time.monotonic() + 60
    while not list(temporary.glob("portal-batch-*.zip")):
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "no zip was written"
        time.sleep(0.01)


def signalled_while_sending(temporary: Path, run: subprocess.Popen[str], signum: int) -> str:
    """Sends ``signum`` to the ``portal batch`` run once its zip is being written (``zip_written``),
    waits for it to end, and returns what it wrote on stderr."""
    try:
        zip_written(temporary, run)
        run.send_signal(signum)
        _, err = run.communicate(timeout=30)
    finally:
        run.kill()
    return err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_batch_terminated_while_it_is_sent_leaves_no_temporary_zip(
    logged_in: Account, tmp_path: Path, signum: int, code: int
) -> None:
    """SIGTERM (a kill) or SIGHUP (a closed terminal) during the upload: exit 128 + the signal,
    the zip of the folder written to the temporary folder is deleted, and the run says how to go
    on, as after Ctrl-C."""
    folder, temporary = tmp_path / "collection", tmp_path / "tmp"
    make_images(folder, 500)
    temporary.mkdir()
    sending = start_batch(folder, tmp_path / "results.csv", TMPDIR=str(temporary))
    err = signalled_while_sending(temporary, sending, signum)
    assert sending.returncode == code and list(temporary.iterdir()) == [], err
    assert "portal: terminated" in err and "Run the same command again" in err, err


def test_a_killed_runs_zip_is_deleted_by_the_next_run_and_a_living_runs_is_not(
    logged_in: Account, tmp_path: Path
) -> None:
    """A run killed outright (SIGKILL: no ``finally`` runs) while it zips or uploads leaves its
    temporary zip; the next ``portal batch`` deletes it, and never the zip of a run still going."""
    folder, temporary = tmp_path / "collection", tmp_path / "tmp"
    make_images(folder, 500)
    temporary.mkdir()
    killed = start_batch(folder, tmp_path / "results.csv", TMPDIR=str(temporary))
    signalled_while_sending(temporary, killed, signal.SIGKILL)
    (left,) = list(temporary.iterdir())
    # Another run, still going, holding its zip.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_ZIP],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(temporary)},
    )
    try:
        assert holder.stdout is not None
        living = Path(holder.stdout.readline().strip())
        assert living.parent == temporary and living.exists(), living
        other = tmp_path / "other"
        make_images(other, 2)
        done = subprocess.run(
            [str(PORTAL), "batch", str(other), "-m", MODEL, "--out", str(tmp_path / "other.csv")],
            capture_output=True,
            text=True,
            env={**os.environ, "TMPDIR": str(temporary)},
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "Deleted 1 temporary zip(s)" in done.stderr, done.stderr
        assert not left.exists() and living.exists()
        assert sorted(temporary.iterdir()) == [living]
    finally:
        holder.kill()
        holder.communicate()


HOLD_A_ZIP = """
import sys, time
from portal_cli.archive import temporary_zip
with temporary_zip() as path:
    print(path, flush=True)
    time.sleep(120)
"""


def test_the_same_images_zip_to_the_same_bytes_whatever_their_files_times(tmp_path: Path) -> None:
    """A touched file, or one dated before 1980 (which a zip cannot hold), zips as before: an
    interrupted batch sent again is the same request."""
    folder = tmp_path / "collection"
    make_images(folder, 3)
    images = collect(folder).images
    with temporary_zip() as first, temporary_zip() as second:
        zip_images(first, folder, images)
        os.utime(images[0], (time.time() + 3600, time.time() + 3600))
        os.utime(images[1], (157_766_400, 157_766_400))  # 1975
        images[2].chmod(0o600)
        zip_images(second, folder, images)
        assert first.read_bytes() == second.read_bytes()
    assert not first.exists() and not second.exists()


def test_two_runs_of_one_input_at_once_send_it_once(logged_in: Account, tmp_path: Path) -> None:
    """While one ``portal batch`` of a folder runs (holds its lock), another of the same folder
    is refused before anything is sent."""
    folder = tmp_path / "collection"
    make_images(folder, 2)
    lock = BatchStates().lock(str(folder.resolve()))
    with lock:
        second = run("batch", str(folder), "-m", MODEL, "--out", str(tmp_path / "r.csv"))
    assert second.exit_code == 1 and "Another `portal batch`" in one_line(second.stderr), second.output
    assert batches(logged_in)["count"] == 0


def test_a_stale_login_is_renewed_and_an_expired_one_refused(logged_in: Account) -> None:
    body = stored()
    login = body["login"]
    assert isinstance(login, dict)
    # Past half its life (this machine's clock is the one the CLI goes by).
    login["issued_at"] = time.time() - 0.6 * login["expires_in"]
    config_path().write_text(json.dumps(body))
    result = run("predict", str(PHOTOS / "parrot.jpg"), "-m", MODEL)
    assert result.exit_code == 0, result.output
    renewed = stored()["login"]
    assert isinstance(renewed, dict)
    assert renewed["token"] != login["token"] and time.time() - renewed["issued_at"] < 60
    me = httpx.get(f"{logged_in.url}/v1/users/me", headers={"Authorization": f"Bearer {renewed['token']}"})
    assert me.status_code == 200

    renewed["issued_at"] = time.time() - renewed["expires_in"] - 5
    config_path().write_text(json.dumps({**stored(), "login": renewed}))
    expired = run("predict", str(PHOTOS / "parrot.jpg"))
    assert expired.exit_code == 3
    assert "portal login" in one_line(expired.stderr)


def test_a_wrong_token_exits_3(logged_in: Account) -> None:
    body = stored()
    login = body["login"]
    assert isinstance(login, dict)
    config_path().write_text(json.dumps({**body, "login": {**login, "token": login["token"][:-4] + "AAAA"}}))
    result = run("predict", str(PHOTOS / "parrot.jpg"))
    assert result.exit_code == 3, result.output
    assert "portal login" in one_line(result.stderr) and result.stdout == ""

    # The stored token belongs to its portal: another URL gets no token, and says so.
    elsewhere = run("predict", str(PHOTOS / "parrot.jpg"), "--url", "http://127.0.0.1:9")
    assert elsewhere.exit_code == 3 and "Not logged in to http://127.0.0.1:9" in one_line(elsewhere.stderr)


def test_an_unreachable_portal_exits_4(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    login = run("login", "--url", dead, "--email", "someone@example.com", input="password\n")
    assert login.exit_code == 4
    assert f"Cannot reach the portal at {dead}" in one_line(login.stderr)

    monkeypatch.setenv("PORTAL_URL", dead)
    monkeypatch.setenv("PORTAL_API_KEY", "ipk_not_checked_before_the_connection")
    result = run("predict", str(PHOTOS / "parrot.jpg"))
    assert result.exit_code == 4 and "Cannot reach" in one_line(result.stderr)


def boxed(text: str) -> str:
    """The words of a usage error, as Click draws it in a box over several lines."""
    return " ".join(text.replace("│", " ").split())


def test_usage_errors_exit_2(config_dir: Path, tmp_path: Path) -> None:
    assert run("predict").exit_code == 2
    assert run("predict", str(tmp_path / "missing.jpg")).exit_code == 2
    assert run("batch", str(PHOTOS / "parrot.jpg"), "--out", "x.csv").exit_code == 2
    assert run("batch", str(tmp_path)).exit_code == 2  # no --out
    # An --out the results could not be written to is refused before anything is sent.
    result = run("batch", str(tmp_path), "--out", str(tmp_path / "missing" / "out.csv"))
    assert result.exit_code == 2 and "missing does not exist" in boxed(result.stderr), result.output
    result = run("batch", str(tmp_path), "--out", str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in boxed(result.stderr), result.output


def test_a_malformed_url_is_a_usage_error(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --url or PORTAL_URL that is not an http(s) address is refused as wrong usage, naming it."""
    parrot = str(PHOTOS / "parrot.jpg")
    for bad in ("http://[::1", "127.0.0.1:8000", "http://127.0.0.1:99999"):
        result = run("predict", parrot, "--url", bad, "--api-key", "ipk_never_sent")
        assert result.exit_code == 2 and repr(bad) in boxed(result.stderr), result.output
        login = run("login", "--url", bad, "--email", "someone@example.com", input="password\n")
        assert login.exit_code == 2 and repr(bad) in boxed(login.stderr), login.output
    monkeypatch.setenv("PORTAL_URL", "http://[::1")
    from_env = run("predict", parrot, "--api-key", "ipk_never_sent")
    assert from_env.exit_code == 2 and "'http://[::1'" in boxed(from_env.stderr), from_env.output


def test_an_out_that_is_the_input_is_refused(config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An --out that would overwrite what is sent is a usage error: the input zip, also through a
    relative path or a symbolic link, or an image of the input folder; a CSV in the folder is not."""
    folder = tmp_path / "collection"
    names = make_images(folder, 2)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(folder / names[1], names[1])
    sent = archive.read_bytes()
    (tmp_path / "link.zip").symlink_to(archive)
    monkeypatch.chdir(folder)
    for source, out in [
        (archive, archive),
        (archive, Path("../photos.zip")),
        (tmp_path / "link.zip", archive),
        (archive, tmp_path / "link.zip"),
    ]:
        result = run("batch", str(source), "--out", str(out))
        assert result.exit_code == 2 and "is the input" in boxed(result.stderr), (source, out, result.output)
    assert archive.read_bytes() == sent
    for source, out in [(folder, folder / names[0]), (Path("."), Path("part0/../part0") / Path(names[0]).name)]:
        result = run("batch", str(source), "--out", str(out))
        assert result.exit_code == 2 and "which is being sent" in boxed(result.stderr), (source, out, result.output)
    # Past the arguments to the missing login: a file the folder does not send may be the CSV.
    assert run("batch", str(folder), "--out", str(folder / "results.csv")).exit_code == 3


def test_an_api_key_runs_a_batch_and_stops_working_once_revoked(
    account: Account, config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script's key, without any login: a batch of 200 generated images, then 401 once revoked."""
    headers = account.headers()
    r = httpx.post(
        f"{account.url}/v1/api-keys", json={"name": "nightly", "scopes": ["read", "predict"]}, headers=headers
    )
    assert r.status_code == 201, r.text
    key = r.json()
    monkeypatch.setenv("PORTAL_URL", account.url)
    monkeypatch.setenv("PORTAL_API_KEY", key["key"])
    folder = tmp_path / "collection"
    make_images(folder, 200)
    out = tmp_path / "results.csv"
    result = run("batch", str(folder), "-m", MODEL, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert len(rows(out)) == 200 and {r["status"] for r in rows(out)} == {"done"}
    assert not config_path().exists() or "token" not in config_path().read_text()  # no login was stored

    assert httpx.delete(f"{account.url}/v1/api-keys/{key['id']}", headers=headers).status_code == 204
    result = run("predict", str(PHOTOS / "parrot.jpg"), "-m", MODEL)
    assert result.exit_code == 3 and "revoked" in one_line(result.stderr), result.output
    assert ".." not in one_line(result.stderr), result.stderr


@pytest.mark.parametrize(("scopes", "lacking"), [(["predict"], "read"), (["read"], "predict")])
def test_an_api_key_without_a_scope_a_batch_needs_is_refused_before_it_is_sent(
    account: Account,
    config_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scopes: list[str],
    lacking: str,
) -> None:
    """Refused (exit 3) before anything is zipped or sent, with or without ``-m``: a key that may
    predict but not read could send a batch but never follow it nor download its results; a
    read-only key would upload the whole batch for a 403."""
    r = httpx.post(
        f"{account.url}/v1/api-keys", json={"name": f"only {scopes[0]}", "scopes": scopes}, headers=account.headers()
    )
    assert r.status_code == 201, r.text
    monkeypatch.setenv("PORTAL_URL", account.url)
    folder = tmp_path / "collection"
    make_images(folder, 2)
    for models in (["-m", MODEL], []):
        result = run("batch", str(folder), *models, "--out", str(tmp_path / "r.csv"), "--api-key", r.json()["key"])
        assert "Zipping" not in result.stderr and "Uploading" not in result.stderr, result.stderr
        error = one_line(result.stderr)
        assert result.exit_code == 3 and f"lacks the {lacking} scope" in error and "nothing was sent" in error, error
    assert batches(account)["count"] == 0 and BatchStates().get(str(folder.resolve())) is None


def test_model_references_are_read_as_the_portal_reads_them() -> None:
    """``sketch@03`` is ``sketch@3`` to the portal: the CLI's check before sending must not turn
    it away as unknown."""
    assert _models(["sketch@03, mobilenet_v2", " birds@1 "]) == ["sketch@3", "mobilenet_v2", "birds@1"]
    assert _models(["sketch@x"]) == ["sketch@x"]  # left for the portal to refuse, saying why


def unprivileged() -> list[str]:
    """A command prefix under which file permissions hold: for root (as the suite may run),
    ``setpriv`` drops the capabilities that let root read past them (the interpreter, under
    /root, stays reachable to its owner, which it would not be to another user)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("as root, needs setpriv (util-linux) to make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", caps, "--inh-caps", caps]


def test_folders_and_files_that_cannot_be_read_are_left_out_and_named(logged_in: Account, tmp_path: Path) -> None:
    """A subfolder that cannot be listed and image files that cannot be opened are left out,
    counted and named (the first five), and the rest is sent; when no image can be read, nothing
    is sent (exit 1)."""
    folder = tmp_path / "collection"
    names = make_images(folder, 12)
    locked = folder / "locked"
    make_images(locked, 2)
    closed = [name for name in names if "/" not in name][:6]
    out = tmp_path / "results.csv"
    others = tmp_path / "all-closed"
    make_images(others, 2)
    shut = [locked, *(folder / name for name in closed), *others.rglob("*.png")]
    for path in shut:
        path.chmod(0o000)
    try:
        sent = subprocess.run(
            [*unprivileged(), str(PORTAL), "batch", str(folder), "-m", MODEL, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=180,
        )
        nothing = subprocess.run(
            [*unprivileged(), str(PORTAL), "batch", str(others), "-m", MODEL, "--out", str(tmp_path / "none.csv")],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        for path in shut:
            path.chmod(0o755)
    assert sent.returncode == 0, sent.stderr
    assert "1 folder(s) that could not be read left out: locked/ (Permission denied)." in sent.stderr, sent.stderr
    named = ", ".join(f"{name} (Permission denied)" for name in closed[:5])
    assert f"6 file(s) that could not be read left out: {named}, and 1 more." in sent.stderr, sent.stderr
    assert sorted(r["file_name"] for r in rows(out)) == sorted(set(names) - set(closed))
    assert nothing.returncode == 1, nothing.stderr
    assert f"portal: None of the 2 images in {others} could be read: nothing was sent." in nothing.stderr
    assert batches(logged_in)["count"] == 1


@contextmanager
def worker_stopped(worker: Service) -> Iterator[None]:
    """The suite's model worker stopped (SIGSTOP) for the block: its heartbeat expires within 3 s,
    after which the portal knows no live worker serving its versions; the batch's images wait."""
    group = os.getpgid(worker.proc.pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(group, signal.SIGCONT)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_a_batch_waiting_for_a_version_no_worker_serves_says_so(
    logged_in: Account, tmp_path: Path, worker: Service
) -> None:
    """While the batch's ``waiting_for`` names a version (no live worker serves it), the bar says
    so instead of an ETA, and a note says it once (a log without a terminal has no bar); it goes
    on once the worker is back."""
    folder = tmp_path / "collection"
    make_images(folder, 60)
    out, log = tmp_path / "results.csv", tmp_path / "stderr.txt"
    key = str(folder.resolve())
    # A terminal as rich sees one: the bar is drawn while it changes, not only at its end.
    terminal = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "160"}
    with log.open("w") as err:
        following = subprocess.Popen(
            [str(PORTAL), "batch", str(folder), "-m", MODEL, "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            env={**os.environ, **terminal},
        )
    try:
        state = remembered_batch(following, key)
        with worker_stopped(worker):
            deadline = time.monotonic() + 60
            while "waiting for" not in ANSI.sub("", log.read_text()):
                assert following.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"the bar never said what the batch waits for: {log.read_text()}"
                time.sleep(0.1)
        following.wait(timeout=180)
    finally:
        following.kill()
    said = ANSI.sub("", log.read_text())
    assert following.returncode == 0, said
    assert f"waiting for {MODEL}: no live worker serves it" in said, said
    note = f"Batch {state.batch_id} waits for {MODEL}: no live worker serves it now."
    assert said.count(note) == 1, said
    assert len(rows(out)) == 60 and {r["status"] for r in rows(out)} == {"done"}


GOES_ON = "goes on at the portal: run the same command again to follow it and download the results (or add --cancel)."


@pytest.mark.parametrize("credential", ["login", "api key"])
def test_a_batch_followed_when_its_credential_is_revoked_goes_on_and_is_resumed(
    account: Account,
    config_dir: Path,
    tmp_path: Path,
    worker: Service,
    monkeypatch: pytest.MonkeyPatch,
    credential: str,
) -> None:
    """The login or the API key is revoked while the batch is followed: exit 3, saying that the
    batch goes on at the portal and how to resume it; the same command, logged in again or with a
    key that works, follows it to its results."""
    headers = account.headers()
    env = {**os.environ}
    if credential == "login":
        assert (
            run("login", "--url", account.url, "--email", account.email, input=account.password + "\n").exit_code == 0
        )
    else:
        made = httpx.post(
            f"{account.url}/v1/api-keys", json={"name": "nightly", "scopes": ["read", "predict"]}, headers=headers
        ).json()
        env.update(PORTAL_URL=account.url, PORTAL_API_KEY=made["key"])
    folder = tmp_path / "collection"
    names = make_images(folder, 60)
    out = tmp_path / "results.csv"
    key = str(folder.resolve())
    following = subprocess.Popen(
        [str(PORTAL), "batch", str(folder), "-m", MODEL, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        state = remembered_batch(following, key)
        with worker_stopped(worker):  # the batch cannot end before the credential does
            if credential == "login":
                login = stored()["login"]
                assert isinstance(login, dict)
                revoked = httpx.post(
                    f"{account.url}/v1/auth/logout", headers={"Authorization": f"Bearer {login['token']}"}
                )
            else:
                revoked = httpx.delete(f"{account.url}/v1/api-keys/{made['id']}", headers=headers)
            assert revoked.status_code in (200, 204), revoked.text
            _, err = following.communicate(timeout=60)
    finally:
        following.kill()
    assert following.returncode == 3, err
    assert err.strip().splitlines()[-1].endswith(f"Batch {state.batch_id} {GOES_ON}"), err
    assert "revoked" in err.strip().splitlines()[-1], err

    if credential == "login":
        assert run("login", "--email", account.email, input=account.password + "\n").exit_code == 0
    else:
        fresh = httpx.post(
            f"{account.url}/v1/api-keys", json={"name": "again", "scopes": ["read", "predict"]}, headers=headers
        ).json()
        monkeypatch.setenv("PORTAL_URL", account.url)
        monkeypatch.setenv("PORTAL_API_KEY", fresh["key"])
    again = run("batch", str(folder), "-m", MODEL, "--out", str(out))
    assert again.exit_code == 0, again.output
    assert f"Following batch {state.batch_id}" in again.stderr, again.stderr
    assert sorted(r["file_name"] for r in rows(out)) == sorted(names)
    assert batches(account)["count"] == 1


class Relay:
    """A TCP relay on a port of its own to the portal at ``url``, to cut off: the portal then is as
    unreachable through it (connections refused, the open ones closed) as a stopped API process,
    while it goes on for everyone else."""

    def __init__(self, url: str) -> None:
        target = httpx.URL(url)
        self.target = (target.host, target.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._copy, args=(source, sink), daemon=True).start()

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.closed.set()
        self.listener.close()
        for connection in self.open:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()


def test_a_batch_whose_portal_goes_away_while_followed_says_it_goes_on(
    account: Account, config_dir: Path, tmp_path: Path, worker: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The portal becomes unreachable while the batch is followed, past the retries (here one):
    exit 4, saying that the batch goes on at the portal and how to resume it."""
    monkeypatch.setattr(cli_main, "RETRIES", 1)
    monkeypatch.setattr(cli_main, "RETRY_SECONDS", 0.1)
    made = httpx.post(
        f"{account.url}/v1/api-keys", json={"name": "nightly", "scopes": ["read", "predict"]}, headers=account.headers()
    ).json()
    relay = Relay(account.url)
    monkeypatch.setenv("PORTAL_URL", relay.url)
    monkeypatch.setenv("PORTAL_API_KEY", made["key"])
    folder = tmp_path / "collection"
    make_images(folder, 60)
    key = str(folder.resolve())
    group = os.getpgid(worker.proc.pid)
    sent: list[BatchState] = []

    def cut_once_sent() -> None:
        deadline = time.monotonic() + 60
        while (state := BatchStates().get(key)) is None or state.batch_id is None:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        os.killpg(group, signal.SIGSTOP)  # the batch cannot end before the portal is out of reach
        sent.append(state)
        relay.cut()

    cutter = threading.Thread(target=cut_once_sent, daemon=True)
    cutter.start()
    try:
        result = run("batch", str(folder), "-m", MODEL, "--out", str(tmp_path / "results.csv"))
    finally:
        cutter.join(timeout=60)
        os.killpg(group, signal.SIGCONT)
        relay.cut()
    assert sent, result.output
    assert result.exit_code == 4, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"portal: Cannot reach the portal at {relay.url}"), result.stderr
    assert last.endswith(f"Batch {sent[0].batch_id} {GOES_ON}"), result.stderr
    remembered = BatchStates().get(key)
    assert remembered is not None and remembered.batch_id == sent[0].batch_id
    # Its images would otherwise go ahead of the batches of later tests of this test process.
    assert httpx.delete(f"{account.url}/v1/batches/{sent[0].batch_id}", headers=account.headers()).status_code == 200


def test_the_summary_counts_files_identical_to_another(logged_in: Account, tmp_path: Path) -> None:
    """Identical files are classified once and share a result: the notes count them apart, so
    that images, skipped files and these add up to the files sent (one CSV row each)."""
    folder = tmp_path / "collection"
    names = make_images(folder, 5)
    for copy in ("copy1.png", "copy2.png"):
        shutil.copy(folder / names[1], folder / copy)
    (folder / "notes.png").write_text("text, not a picture")
    out = tmp_path / "results.csv"
    result = run("batch", str(folder), "-m", MODEL, "--out", str(out))
    assert result.exit_code == 0, result.output
    listed = batches(logged_in)["data"]
    assert isinstance(listed, list) and len(listed) == 1
    batch_id = listed[0]["id"]
    identical = "2 file(s) identical to another (sharing its result)"
    assert f"Batch {batch_id}: 5 images to classify, 1 files skipped, {identical}." in result.stderr, result.stderr
    done = f"Batch {batch_id} done: 5 done, 0 failed, 1 skipped, {identical}; results in {out}."
    assert done in result.stderr, result.stderr
    assert len(rows(out)) == 8


def test_cancel_goes_ahead_while_another_run_follows_the_batch(
    logged_in: Account, tmp_path: Path, worker: Service
) -> None:
    """``--cancel`` does not wait for the lock of the run following the batch: it cancels the
    batch that run remembers, leaving that run's state alone, and the run ends as it does for any
    cancel (the results of the images answered, exit 1), forgetting the batch itself."""
    folder = tmp_path / "collection"
    make_images(folder, 60)
    out = tmp_path / "results.csv"
    key = str(folder.resolve())
    following = start_batch(folder, out)
    try:
        state = remembered_batch(following, key)
        with worker_stopped(worker):  # the batch cannot end before its cancel
            cancel = run("batch", str(folder), "-m", MODEL, "--cancel")
            assert BatchStates().get(key) == state  # the following run's, left to it
        _, err = following.communicate(timeout=120)
    finally:
        following.kill()
    assert cancel.exit_code == 0, cancel.output
    assert f"Cancelled batch {state.batch_id}: " in cancel.stderr, cancel.stderr
    assert "following it ends once it sees the cancel" in cancel.stderr, cancel.stderr
    assert following.returncode == 1, err
    assert f"Batch {state.batch_id} cancelled: " in err, err
    assert BatchStates().get(key) is None
    assert rows(out)


def test_cancel_while_another_run_sends_leaves_its_state(logged_in: Account, tmp_path: Path) -> None:
    """``--cancel`` while another run holds the lock but has no batch at the portal yet (zipping,
    or sending): nothing to cancel (exit 1), saying so, and that run's state stays."""
    folder = tmp_path / "collection"
    make_images(folder, 2)
    key = str(folder.resolve())
    with BatchStates().lock(key):
        zipping = run("batch", str(folder), "-m", MODEL, "--cancel")
        assert zipping.exit_code == 1, zipping.output
        assert "has sent none there yet" in one_line(zipping.stderr), zipping.stderr
        state = BatchState(key, None, logged_in.url, [MODEL], time.time(), "a-send-still-on-its-way")
        BatchStates().remember(state)
        sending = run("batch", str(folder), "-m", MODEL, "--cancel")
        assert sending.exit_code == 1, sending.output
        assert "is sending it and the portal has no batch with its key yet" in one_line(sending.stderr)
        assert BatchStates().get(key) == state


@pytest.mark.parametrize("email", [True, False], ids=["password", "email"])
def test_login_with_standard_input_ended_is_wrong_usage(config_dir: Path, email: bool) -> None:
    """A script that pipes nothing to ``portal login`` (no terminal to ask on) is told what was
    missing, exit 2, not "interrupted" (130) as after Ctrl-C."""
    given = ["--email", "someone@example.com"] if email else []
    login = subprocess.run(
        [str(PORTAL), "login", "--url", f"http://127.0.0.1:{free_port()}", *given],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no controlling terminal: getpass reads standard input
    )
    missing = "password" if email else "email"
    assert login.returncode == 2, login.stderr
    # getpass, with no terminal, warns on stderr that the password would be echoed.
    said = login.stderr.strip().splitlines()[-1].strip()
    assert said == f"portal: No {missing} given: standard input ended.", login.stderr
    assert "interrupted" not in login.stderr


def _piped_login(url: str, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """``portal login --url URL ARGS --password-stdin`` with ``stdin`` piped, without a terminal."""
    return subprocess.run(
        [str(PORTAL), "login", "--url", url, *args, "--password-stdin"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )


def test_a_script_logs_in_with_the_password_on_standard_input(account: Account, config_dir: Path) -> None:
    """``--password-stdin`` reads the piped password without a prompt or getpass's "may be echoed"
    warning; the line ending after it is not part of it."""
    login = _piped_login(account.url, "--email", account.email, stdin=account.password + "\r\n")
    assert login.returncode == 0, login.stderr
    assert (
        login.stderr.strip() == f"Logged in to {account.url} as {account.email} (token kept in {config_path()})."
    ), login.stderr
    token = stored()["login"]
    assert isinstance(token, dict)
    me = httpx.get(f"{account.url}/v1/users/me", headers={"Authorization": f"Bearer {token['token']}"})
    assert me.status_code == 200 and me.json()["email"] == account.email

    # Only the one line ending goes: a trailing space is part of the password, here a wrong one.
    wrong = _piped_login(account.url, "--email", account.email, stdin=account.password + " \n")
    assert wrong.returncode == 3, wrong.stderr
    assert stored()["login"] == token


@pytest.mark.parametrize(
    ("args", "stdin", "said"),
    [
        (["--email", "someone@example.com"], "", "No password given: standard input was empty."),
        (["--email", "someone@example.com"], "\n", "No password given: standard input was empty."),
        ([], "password\n", "--password-stdin needs --email: standard input holds the password."),
    ],
    ids=["empty", "empty-line", "no-email"],
)
def test_a_piped_login_without_a_password_or_email_is_wrong_usage(
    config_dir: Path, args: list[str], stdin: str, said: str
) -> None:
    login = _piped_login(f"http://127.0.0.1:{free_port()}", *args, stdin=stdin)
    assert login.returncode == 2, login.stderr
    assert login.stderr.strip() == f"portal: {said}", login.stderr


def test_a_piped_password_that_is_not_utf8_is_wrong_usage(config_dir: Path) -> None:
    login = subprocess.run(
        [str(PORTAL), "login", "--url", f"http://127.0.0.1:{free_port()}", "-e", "x@example.com", "--password-stdin"],
        input=b"p\xe4ss\n",
        capture_output=True,
        timeout=60,
        start_new_session=True,
    )
    assert login.returncode == 2, login.stderr
    assert login.stderr.decode().strip() == "portal: The password on standard input is not valid UTF-8."


def test_a_termination_lost_in_a_finalizer_still_ends_the_zipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP that lands while Python runs a finalizer: the handler's raise is dropped (as any
    ``__del__``'s), and the folder was zipped, sent and followed to its end. The next image
    zipped ends the command with 128 + the signal."""
    folder = tmp_path / "collection"
    make_images(folder, 3)
    monkeypatch.setattr(cli_main, "_TERMINATING", [], raising=False)
    previous = signal.signal(signal.SIGHUP, cli_main._terminated)
    try:

        class Finalized:
            def __del__(self) -> None:
                signal.raise_signal(signal.SIGHUP)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dropped raise, reported as unraisable
            Finalized()
        with pytest.raises(Terminated) as ended:
            cli_main._zip_folder(folder, tmp_path / "out.zip")
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert ended.value.code == 128 + signal.SIGHUP
