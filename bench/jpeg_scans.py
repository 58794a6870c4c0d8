"""How long a progressive JPEG takes to decode by its number of scans.

``python -m bench.jpeg_scans [--side 7000] [--scans 10 100 1000] [--mode L RGB]`` makes, for each
count, a progressive JPEG ``side`` pixels a side whose first AC scan is repeated until it has that
many scans (``scan_bomb``: a few dozen bytes a repeat), and prints its size and the seconds Pillow
takes to decode it whole and at 1/8 scale (``draft``, as the API's check and the workers decode
large JPEGs). Each scan is a pass over every block, so the time grows with the count whatever the
file's size: the figures behind ``contracts.imaging.MAX_JPEG_SCANS``.
"""

from __future__ import annotations

import argparse
import io
import time

from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # the pictures measured here are made here


def segments(jpeg: bytes) -> list[tuple[int, int, int]]:
    """(marker code, start, end) of each segment of ``jpeg`` from SOI's end to EOI; a scan's end is
    past its entropy-coded data."""
    i, found = 2, []
    while jpeg[i + 1] != 0xD9:
        code, end = jpeg[i + 1], i + 2 + int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if code == 0xDA:
            while not (jpeg[end] == 0xFF and jpeg[end + 1] != 0 and not 0xD0 <= jpeg[end + 1] <= 0xD7):
                end += 1
        found.append((code, i, end))
        i = end
    return found


def scan_bomb(side: int = 512, scans: int = 300, mode: str = "L") -> bytes:
    """A uniform progressive JPEG (``mode`` "L" or "RGB"), ``side`` pixels a side, with ``scans``
    scans in all (at least its encoder's own, about ten): its first AC scan (only end-of-band runs,
    a few dozen bytes) repeated. Small, and each repeat costs the decoder a pass over every block."""
    buf = io.BytesIO()
    Image.new(mode, (side, side), 128 if mode == "L" else (128, 96, 64)).save(buf, "JPEG", progressive=True, quality=90)
    jpeg = buf.getvalue()
    found = segments(jpeg)
    # A scan's header: its component count at +4, then two bytes a component, then Ss, Se, Ah/Al.
    start, end = next(
        (s, e)
        for code, s, e in found
        if code == 0xDA and jpeg[s + 5 + 2 * jpeg[s + 4]] >= 1 and jpeg[s + 7 + 2 * jpeg[s + 4]] >> 4 == 0
    )
    copies = max(0, scans - sum(code == 0xDA for code, _, _ in found))
    return jpeg[:end] + jpeg[start:end] * copies + jpeg[end:]


def decode_seconds(data: bytes, *, draft: bool) -> float:
    """Seconds to open and decode ``data`` (at 1/8 scale with ``draft``)."""
    start = time.perf_counter()
    with Image.open(io.BytesIO(data)) as img:
        if draft:
            img.draft(img.mode, (img.width // 8, img.height // 8))
        img.load()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=7000, help="pixels a side (default 7000: 49 megapixels)")
    parser.add_argument("--scans", type=int, nargs="+", default=[10, 100, 1000], help="scan counts to measure")
    parser.add_argument("--mode", nargs="+", default=["L", "RGB"], choices=["L", "RGB"])
    args = parser.parse_args(argv)
    print(f"{'mode':<5} {'scans':>6} {'bytes':>10} {'whole s':>8} {'1/8 s':>8}")
    for mode in args.mode:
        for scans in args.scans:
            data = scan_bomb(args.side, scans, mode)
            whole, eighth = decode_seconds(data, draft=False), decode_seconds(data, draft=True)
            print(f"{mode:<5} {scans:>6} {len(data):>10,} {whole:>8.2f} {eighth:>8.2f}")


if __name__ == "__main__":
    main()
