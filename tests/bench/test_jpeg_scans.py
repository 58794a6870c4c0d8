"""The JPEG scan benchmark: its pictures have the scans asked for, decode, and are measured."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bench import jpeg_scans


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_bomb_has_the_scans_asked_for_and_decodes(mode: str) -> None:
    for scans in (20, 150):
        data = jpeg_scans.scan_bomb(256, scans, mode)
        assert sum(code == 0xDA for code, _, _ in jpeg_scans.segments(data)) == scans
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert (img.size, img.mode) == ((256, 256), mode)


def test_the_table_has_a_row_per_mode_and_count(capsys: pytest.CaptureFixture[str]) -> None:
    jpeg_scans.main(["--side", "128", "--scans", "10", "120", "--mode", "L", "RGB"])
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [["L", "10"], ["L", "120"], ["RGB", "10"], ["RGB", "120"]]
