"""A directory zipped for a batch while it changes: files gone or replaced between their listing
and their zipping are left out and named, and the rest is zipped."""

from __future__ import annotations

import os
import threading
import zipfile
from pathlib import Path
from typing import Any

from portal_cli.archive import collect, temporary_zip, zip_images


def photos(folder: Path, names: list[str]) -> None:
    """Files of a few distinct bytes under those names (the zip does not look inside them)."""
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(bytes([i]) * (100 + i))


def test_a_file_gone_since_it_was_listed_is_left_out_and_the_rest_zipped(tmp_path: Path) -> None:
    """A folder still being written to: a file deleted between the listing and the zipping is
    left out with why, the others are zipped, and the names keep their order."""
    folder = tmp_path / "collection"
    photos(folder, ["a.png", "b.png", "c.png", "sub/d.png"])
    found = collect(folder)
    assert [p.relative_to(folder).as_posix() for p in found.images] == ["a.png", "b.png", "c.png", "sub/d.png"]
    (folder / "b.png").unlink()
    done: list[int] = []
    with temporary_zip() as target:
        left = zip_images(target, folder, found.images, done.append)
        with zipfile.ZipFile(target) as archive:
            assert archive.namelist() == ["a.png", "c.png", "sub/d.png"]
            assert archive.read("c.png") == (folder / "c.png").read_bytes()
    assert [(u.path, u.reason, u.folder) for u in left] == [(folder / "b.png", "gone since it was listed", False)]
    assert done == [1, 2, 3, 4]  # the progress counts the one left out too


def test_a_file_replaced_by_a_folder_link_or_pipe_is_left_out_without_waiting(tmp_path: Path) -> None:
    """Between the listing and the zipping a file became a folder, a symbolic link (to a file
    outside) or a named pipe: none is read (a pipe would wait for a writer forever), each is left
    out with why, and the others are zipped."""
    folder = tmp_path / "collection"
    photos(folder, ["a.png", "b.png", "c.png", "d.png"])
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not in the folder")
    found = collect(folder)
    (folder / "a.png").unlink()
    (folder / "a.png").mkdir()
    (folder / "b.png").unlink()
    (folder / "b.png").symlink_to(outside)
    (folder / "c.png").unlink()
    os.mkfifo(folder / "c.png")
    result: list[list[Any]] = []
    with temporary_zip() as target:
        zipping = threading.Thread(target=lambda: result.append(zip_images(target, folder, found.images)), daemon=True)
        zipping.start()
        zipping.join(timeout=30)
        if zipping.is_alive():
            # Stuck reading the pipe: a writer lets it end before the test fails.
            with open(folder / "c.png", "wb"):
                pass
            zipping.join(timeout=30)
            raise AssertionError("zipping waited on a named pipe")
        with zipfile.ZipFile(target) as archive:
            assert archive.namelist() == ["d.png"]
    (left,) = result
    assert [(u.path.name, u.folder) for u in left] == [("a.png", False), ("b.png", False), ("c.png", False)]
    assert left[0].reason == "Is a directory" and left[1].reason == "a symbolic link since it was listed"
    assert left[2].reason == "no longer a regular file"
