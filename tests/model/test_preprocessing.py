"""An upload the API accepts can always be prepared for every model: the API checks it with the
same decoding the workers run, so the whole kind of broken file is refused at the door."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from contracts.imaging import ImageRejected, inspect_image
from contracts.registry import ModelEntry, Preprocessing, load_registry
from model.config import ModelSettings
from model.preprocessing import preprocess
from tests.support import PHOTOS, SHARED

BAD_UPLOADS = SHARED / "data" / "bad_uploads"
MAX_PIXELS = 50_000_000


def _entries() -> list[ModelEntry]:
    registry = load_registry(ModelSettings().registry_path)
    # One entry per way of decoding (colour mode, and whether JPEG may decode at a reduced scale):
    # past decoding, preparation is arithmetic on a valid image.
    seen: dict[tuple[str, bool], ModelEntry] = {}
    for entry in registry.served(benchmark_mode=True):
        seen.setdefault((entry.input.mode, entry.preprocessing == Preprocessing.sketch), entry)
    return list(seen.values())


ENTRIES = _entries()


def truncations(data: bytes, count: int = 12) -> Iterator[bytes]:
    """``data`` cut at ``count`` offsets spread from the first bytes to the last one."""
    for i in range(count):
        yield data[: max(1, (len(data) - 1) * i // (count - 1))]


def exif_segment(jpeg: bytes) -> tuple[int, int]:
    """Start and end offsets of a JPEG's APP1 (EXIF) segment, marker included."""
    pos = 2
    while pos + 4 <= len(jpeg):
        marker, length = jpeg[pos + 1], struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
        if marker == 0xE1:
            return pos, pos + 2 + length
        pos += 2 + length
    raise AssertionError("no EXIF segment")


def byte_changes(data: bytes, start: int, end: int) -> Iterator[bytes]:
    """``data`` with one byte of ``[start, end)`` changed at a time: inverted, its lowest or highest
    bit flipped, zeroed, set to 0xFF."""
    for i in range(start, end):
        for value in sorted({data[i] ^ 0xFF, data[i] ^ 0x01, data[i] ^ 0x80, 0x00, 0xFF} - {data[i]}):
            yield data[:i] + bytes([value]) + data[i + 1 :]


def accepted_means_prepared(data: bytes) -> bool:
    """True when the API would accept ``data``; then every model's preparation must work too."""
    try:
        inspect_image(data, max_pixels=MAX_PIXELS)
    except ImageRejected as exc:
        assert 400 <= exc.status < 500 and exc.message
        return False
    for entry in ENTRIES:
        preprocess(data, entry)  # raising here is the bug: accepted, then failed in the worker
    return True


@pytest.mark.parametrize("photo", sorted(p.name for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".bmp")))
def test_every_truncation_of_a_photo_is_refused_or_preparable(photo: str) -> None:
    data = (PHOTOS / photo).read_bytes()
    outcomes = [accepted_means_prepared(cut) for cut in truncations(data)]
    assert not outcomes[0] and not outcomes[5], "a file cut to a byte or in half is accepted"


def test_every_byte_change_in_an_exif_block_is_refused_or_preparable() -> None:
    data = (BAD_UPLOADS / "parrot_exif6_malformed_gps.jpg").read_bytes()
    variants = list(byte_changes(data, *exif_segment(data)))
    assert len(variants) > 200
    accepted = sum(accepted_means_prepared(variant) for variant in variants)
    # Most changes leave a decodable picture: the test must exercise the accepted path too.
    assert accepted > len(variants) // 2


def test_the_shared_bad_uploads_get_their_answers() -> None:
    for name in ("truncated_half.webp", "jpeg_cut_inside_exif.jpg", "png_oversized_icc_chunk.png"):
        with pytest.raises(ImageRejected) as caught:
            inspect_image((BAD_UPLOADS / name).read_bytes(), max_pixels=MAX_PIXELS)
        assert caught.value.status == 422, name
    assert accepted_means_prepared((BAD_UPLOADS / "parrot_exif6_malformed_gps.jpg").read_bytes())
