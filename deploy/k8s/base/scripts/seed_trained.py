"""The model pods' init container: copies the versions the model image carries (its TRAINED_DIR,
``<model>/<version>`` folders) onto the shared volume that the trainer adds new versions to, so
the workers see both. A version already on the volume is left alone.

``python seed_trained.py <image dir> <volume dir>``
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

STAGING = ".seeding"
"""Where copies are made before they are renamed into place. Three levels below it, never two, so
the trainer's scan for ``*/*/metrics.json`` never takes a half-made copy for a trained version."""
STALE_S = 3600.0
"""A staging folder this old was left by a pod killed while copying."""


def seed(source: Path, target: Path) -> list[str]:
    """Copies each ``<model>/<version>`` folder of ``source`` that ``target`` lacks; the ones copied.

    Each is copied under a staging name and renamed into place, so a reader never sees half a
    version, and pods seeding at once end with one whole copy (the later rename fails and its copy
    is dropped).
    """
    staging = target / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    for old in staging.iterdir():
        if time.time() - old.stat().st_mtime > STALE_S:
            shutil.rmtree(old, ignore_errors=True)
    copied = []
    for folder in sorted(p for p in source.glob("*/*") if p.is_dir()):
        relative = folder.relative_to(source)
        destination = target / relative
        if destination.exists():
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=staging))
        try:
            shutil.copytree(folder, work / "copy")
            try:
                (work / "copy").rename(destination)
            except OSError:
                if not destination.exists():
                    raise
                continue  # another pod got there first
            copied.append(relative.as_posix())
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return copied


def main(argv: list[str] | None = None) -> int:
    """Seeds ``argv[1]`` from ``argv[0]`` and says what it copied."""
    source, target = (Path(a) for a in (argv if argv is not None else sys.argv[1:]))
    copied = seed(source, target)
    print(f"seeded {', '.join(copied)}" if copied else f"{target} already holds every version of {source}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
