"""How both services read uploads: every format converted correctly, every bad file refused."""

from __future__ import annotations

import contextlib
import io
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import ExifTags, Image

from bench.jpeg_scans import scan_bomb
from contracts.imaging import HEAD_BYTES, MAX_JPEG_SCANS, ImageRejected, inspect_image, load_image, may_be_image
from tests.images import animated_gif, encode, exif_rotated_jpeg, png_bomb, sixteen_bit_png, split_colour
from tests.support import PHOTOS, ROOT

MAX = 50_000_000


def pixel(img: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[y, x])


def test_rgb_formats_round_trip() -> None:
    for fmt in ("PNG", "BMP", "WEBP", "TIFF", "GIF"):
        data = encode(split_colour(), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert inspect_image(data, max_pixels=MAX).format == fmt
        img = load_image(data)
        assert img.mode == "RGB"
        assert pixel(img, 5, 5)[0] > 200 and pixel(img, 60, 5)[2] > 200, fmt


def test_grayscale_palette_rgba_cmyk() -> None:
    grey = load_image(encode(Image.new("L", (8, 8), 128), "PNG"))
    assert pixel(grey, 0, 0) == (128, 128, 128)
    palette = load_image(encode(split_colour().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    assert pixel(palette, 5, 5)[0] > 200
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    transparent.putpixel((1, 1), (0, 0, 0, 255))
    rgba = load_image(encode(transparent, "PNG"))
    assert pixel(rgba, 0, 0) == (255, 255, 255) and pixel(rgba, 1, 1) == (0, 0, 0)
    cmyk = load_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = pixel(cmyk, 4, 4)
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    img = load_image(sixteen_bit_png(), mode="L")
    assert abs(int(np.asarray(img)[0, 0]) - 128) <= 1


@pytest.mark.parametrize(
    ("mode", "values"),
    [("I", 255.0), ("I", 65535.0), ("I", 10_000_000.0), ("F", 1.0), ("F", 255.0)],
    ids=["int32-0-255", "int32-0-65535", "int32-wider", "float-0-1", "float-0-255"],
)
def test_32_bit_integer_and_float_tiffs_read_in_the_range_their_values_use(mode: str, values: float) -> None:
    """A grey ramp from 0 to ``values`` in a 32-bit TIFF reads from black to white, not nearly
    black (integers scaled as 16-bit, floats 0-1 taken as 0-255)."""
    ramp = np.tile(np.linspace(0.0, values, 64), (8, 1)).astype(np.int32 if mode == "I" else np.float32)
    img = np.asarray(load_image(encode(Image.fromarray(ramp, mode=mode), "TIFF"), mode="L"))
    assert img[0, 0] == 0 and img[0, 63] == 255 and abs(int(img[0, 32]) - 130) <= 2, img[0, ::8]


def test_a_float_image_of_nan_and_infinities_reads_without_warnings() -> None:
    ramp = np.array([[np.nan, np.inf, -np.inf, 0.5]], dtype=np.float32)
    img = np.asarray(load_image(encode(Image.fromarray(ramp, mode="F"), "TIFF"), mode="L"))
    assert img.tolist()[0][:3] == [0, 255, 0] and img[0, 3] in (127, 128), img


def test_exif_rotation_is_applied() -> None:
    data = exif_rotated_jpeg()
    img = load_image(data)
    assert pixel(img, 5, 32)[0] > 200 and pixel(img, 58, 32)[2] > 200
    info = inspect_image(data, max_pixels=MAX)
    assert (info.width, info.height) == (64, 64)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_the_size_said_is_the_upright_pictures_in_every_format(fmt: str) -> None:
    """Stored 40 wide and 100 high with EXIF orientation 6, the picture is 100 wide upright; Pillow
    already reports a TIFF's size upright (and turns its pixels as it loads them)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (40, 100), "white"), fmt, exif=exif.tobytes() if fmt != "TIFF" else exif)
    info = inspect_image(data, max_pixels=MAX)
    assert (info.width, info.height) == load_image(data).size == (100, 40), fmt


def test_animated_gif_uses_first_frame() -> None:
    img = load_image(animated_gif())
    assert pixel(img, 10, 10) == (255, 0, 0)


def test_large_jpeg_draft_decodes_small() -> None:
    big = encode(Image.new("RGB", (4000, 3000), (10, 200, 10)), "JPEG")
    img = load_image(big, draft_size=(224, 224))
    assert img.size[0] < 1000 and img.size[0] >= 224


def _broken_ihdr(png: bytes) -> bytes:
    """``png`` with its IHDR chunk's CRC (bytes 29-32) flipped."""
    return png[:29] + bytes(b ^ 0xFF for b in png[29:33]) + png[33:]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 415),
        (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415),
        (b"just some text, not an image", 415),
        (encode(split_colour(256), "JPEG")[:-600], 422),
        (encode(split_colour(256), "PNG")[:200], 422),
        # A PNG whose header checksum is broken (Pillow cannot identify it): corrupt, not unsupported.
        (_broken_ihdr(encode(split_colour(64), "PNG")), 422),
        (b"\xff\xd8\xff" + bytes(20), 422),
        (b"GIF89a" + bytes(3), 422),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", 422),
    ],
)
def test_rejections(data: bytes, status: int) -> None:
    with pytest.raises(ImageRejected) as info:
        inspect_image(data, max_pixels=MAX)
    assert info.value.status == status and info.value.message


def test_decompression_bomb_is_refused_from_the_header() -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageRejected) as info:
        inspect_image(png_bomb(), max_pixels=MAX)
    assert info.value.status == 413 and "30000x30000" in info.value.message
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200  # decoding it would need 900 MB


def test_a_preview_of_a_decompression_bomb_is_refused_from_the_header() -> None:
    """The UI draws its previews with ``load_image``: given the limit, a bomb is refused (413)
    before a pixel buffer exists, as the API refuses it."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageRejected) as info:
        load_image(png_bomb(), draft_size=(800, 800), max_pixels=MAX)
    assert info.value.status == 413 and "30000x30000" in info.value.message
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200


def test_preview_only_for_large_images_that_cannot_be_drafted() -> None:
    large = Image.new("RGB", (1600, 1200), (0, 128, 255))
    info = inspect_image(encode(large, "PNG"), max_pixels=MAX, preview_size=800)
    assert info.preview is not None
    preview = Image.open(io.BytesIO(info.preview))
    assert (preview.format, preview.size) == ("JPEG", (800, 600))
    # A JPEG is decoded at a reduced scale when drawn; a small image is cheap to decode whole.
    assert inspect_image(encode(large, "JPEG"), max_pixels=MAX, preview_size=800).preview is None
    assert inspect_image(encode(large.resize((800, 600)), "PNG"), max_pixels=MAX, preview_size=800).preview is None
    assert inspect_image(encode(large, "PNG"), max_pixels=MAX).preview is None


def test_a_large_progressive_jpeg_gets_a_preview_at_full_size_and_upright() -> None:
    """A progressive JPEG is decoded whole (every scan) whenever it is drawn: a history page of
    large ones of many scans took seconds per thumbnail, each time, in the decode slots uploads
    wait for. It gets a preview like a PNG, drawn from pixels enough for its size, upright."""
    arr = np.zeros((1200, 1600, 3), dtype=np.uint8)
    arr[:, :800] = (255, 0, 0)
    arr[:, 800:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees clockwise to be upright
    img = Image.fromarray(arr)
    info = inspect_image(encode(img, "JPEG", progressive=True), max_pixels=MAX, preview_size=800)
    assert info.preview is not None
    assert Image.open(io.BytesIO(info.preview)).size == (800, 600)
    turned = inspect_image(encode(img, "JPEG", progressive=True, exif=exif), max_pixels=MAX, preview_size=800)
    assert turned.preview is not None and (turned.width, turned.height) == (1200, 1600)
    upright = Image.open(io.BytesIO(turned.preview))
    assert upright.size == (600, 800)
    top, bottom = upright.getpixel((300, 100)), upright.getpixel((300, 700))
    assert isinstance(top, tuple) and isinstance(bottom, tuple) and top[0] > 200 > bottom[0], (top, bottom)
    bomb = inspect_image(scan_bomb(1024, MAX_JPEG_SCANS), max_pixels=MAX, preview_size=800)
    assert bomb.preview is not None and max(Image.open(io.BytesIO(bomb.preview)).size) == 800
    # A small one is cheap to decode whole, as is a baseline JPEG at a reduced scale.
    small = img.resize((800, 600))
    assert inspect_image(encode(small, "JPEG", progressive=True), max_pixels=MAX, preview_size=800).preview is None


def test_a_16_bit_image_is_scaled_without_copies_of_itself_in_floating_point() -> None:
    """A 49-megapixel 16-bit PNG compresses to about 100 KB; scaling it whole in float64 took over
    1 GB per upload. Measured in a process of its own: peak memory is per process."""
    script = (
        "import io\n"
        "from PIL import Image\n"
        "from contracts.imaging import inspect_image, load_image\n"
        "img = Image.new('I;16', (7000, 7000), 1000)\n"
        "buf = io.BytesIO(); img.save(buf, 'PNG'); data = buf.getvalue(); del img, buf\n"
        "inspect_image(data, max_pixels=50_000_000, preview_size=800)\n"
        "assert load_image(data, mode='L').getpixel((0, 0)) == 4\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking process (pytest).
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout, done.stderr[-2000:])
    assert int(done.stdout) < 600, f"peak {done.stdout.strip()} MiB"


def test_every_accepted_mode_converts_to_both_model_modes() -> None:
    """What the upload check accepts (converted to RGB) the sketch model can read too (as L)."""
    src = split_colour(32)
    for mode in ("LAB", "YCbCr", "CMYK", "I", "F", "LA", "P", "1"):
        img = src.convert(mode)
        written = []
        for fmt in ("TIFF", "PNG", "JPEG"):
            with contextlib.suppress(OSError, ValueError, KeyError):  # not every format takes every mode
                written.append(encode(img, fmt))
        assert written, mode
        for data in written:
            inspect_image(data, max_pixels=MAX)
            assert load_image(data, mode="L").mode == "L", mode
            assert load_image(data, mode="RGB").mode == "RGB", mode


def test_an_mpo_is_a_jpeg() -> None:
    first, second = split_colour(64), split_colour(64).rotate(90)
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    info = inspect_image(buf.getvalue(), max_pixels=MAX)
    assert (info.format, info.width, info.height) == ("JPEG", 64, 64)
    assert load_image(buf.getvalue()).size == (64, 64)


def test_the_first_bytes_tell_every_supported_format_from_other_files() -> None:
    """Every format an upload can be passes the test of its first bytes (a file failing it is
    skipped unread), and files that are no image fail it."""
    img = split_colour(32)
    images = [encode(img, fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")]
    images += [encode(img, "TIFF", big_tiff=True), animated_gif(), sixteen_bit_png(), exif_rotated_jpeg()]
    buf = io.BytesIO()
    img.save(buf, format="MPO", save_all=True, append_images=[img.rotate(90)])
    images.append(buf.getvalue())
    for data in images:
        inspect_image(data, max_pixels=MAX)
        assert may_be_image(data[:HEAD_BYTES]), data[:HEAD_BYTES]
    for other in (b"\x00" * HEAD_BYTES, b"%PDF-1.4\n1 0 obj <<", b"PK\x03\x04" + b"\x00" * 12, b"hello, world"):
        assert not may_be_image(other), other
        with pytest.raises(ImageRejected):
            inspect_image(other, max_pixels=MAX)


def _corrupted(data: bytes, quarter: int, kind: str) -> bytes:
    """``data`` damaged at ``quarter`` quarters of its length: 16 bytes set to 0xFF ("ff"), 64
    bytes set to zero ("zero") or one bit flipped ("flip")."""
    at = len(data) * quarter // 4
    damaged = bytearray(data)
    if kind == "ff":
        damaged[at : at + 16] = b"\xff" * 16
    elif kind == "zero":
        damaged[at : at + 64] = bytes(64)
    else:
        damaged[at] ^= 0x10
    return bytes(damaged)


def _a_worker_decodes(data: bytes) -> bool:
    """Whether a worker reads ``data`` as each kind of model does: a photo model's RGB (a JPEG
    drafted towards 224 pixels), a sketch model's greyscale in full."""
    try:
        load_image(data, mode="RGB", draft_size=(224, 224))
        load_image(data, mode="L")
    except ImageRejected:
        return False
    return True


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("GIF", {}), ("TIFF", {"compression": "tiff_deflate"})],
)
def test_a_damaged_photo_is_refused_exactly_when_a_worker_could_not_decode_it(
    fmt: str, options: dict[str, object]
) -> None:
    """A real photo damaged at a quarter, half and three quarters of its bytes, three ways each:
    the check either refuses it (422, truncated or corrupt) or a worker decodes it, never neither.
    A PNG's pixels are checksummed, so every damaged one is refused: reading its EXIF (which loads
    the pixels) before decoding them must not hide the decoding error."""
    data = encode(Image.open(PHOTOS / "parrot.jpg").convert("RGB"), fmt, **options)
    taken = []
    for quarter in (1, 2, 3):
        for kind in ("ff", "zero", "flip"):
            damaged = _corrupted(data, quarter, kind)
            try:
                inspect_image(damaged, max_pixels=MAX)
                accepted = True
            except ImageRejected as exc:
                assert exc.status == 422 and "truncated or corrupt" in exc.message, (quarter, kind, exc.message)
                accepted = False
            assert accepted == _a_worker_decodes(damaged), (fmt, quarter, kind, accepted)
            taken.append(accepted)
    if fmt == "PNG":
        assert not any(taken), taken


def _with_exif_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    """``jpeg`` with an EXIF block (APP1) whose IFD1 holds ``thumbnail``, as cameras write it."""
    ifd1 = 8 + 6  # after the TIFF header and an empty IFD0
    entries = [(0x0103, 3, 1, 6), (0x0201, 4, 1, ifd1 + 2 + 3 * 12 + 4), (0x0202, 4, 1, len(thumbnail))]
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<HI", 0, ifd1) + struct.pack("<H", len(entries))
    tiff += b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, _, value in entries)
    payload = b"Exif\x00\x00" + tiff + struct.pack("<I", 0) + thumbnail
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize("check", ["inspect_image", "load_image"])
def test_a_jpeg_of_too_many_scans_is_refused_before_it_is_decoded(check: str) -> None:
    """Each scan of a progressive JPEG is a pass over all its pixels: a few hundred KB of repeated
    scans cost minutes to decode at 50 megapixels, so both the API's check and a worker's load
    refuse one from its markers (422) at once, at 1/8 scale as in full."""
    bomb = scan_bomb(1024, 1000)
    assert len(bomb) < 100_000
    started = time.perf_counter()
    with pytest.raises(ImageRejected) as info:
        if check == "inspect_image":
            inspect_image(bomb, max_pixels=MAX)
        else:
            load_image(bomb, mode="L", draft_size=(128, 128))
    assert time.perf_counter() - started < 0.5
    assert info.value.status == 422 and f"at most {MAX_JPEG_SCANS}" in info.value.message, info.value.message
    assert load_image(scan_bomb(64, MAX_JPEG_SCANS), mode="L").size == (64, 64)  # the limit itself is taken


def test_the_scans_counted_are_the_pictures_own() -> None:
    """A progressive photo (about ten scans) is taken, also when its EXIF thumbnail is progressive
    too, when it is an MPO, and when bytes that look like scans follow the picture (a phone's
    motion-photo video): only the scans the decoder reads count."""
    photo = Image.open(PHOTOS / "parrot.jpg").convert("RGB")
    progressive = encode(photo, "JPEG", progressive=True)
    thumbnail = scan_bomb(64, MAX_JPEG_SCANS - 5)
    exif = Image.open(io.BytesIO(_with_exif_thumbnail(progressive, thumbnail))).getexif()
    assert exif.get_ifd(ExifTags.IFD.IFD1)[0x0202] == len(thumbnail)  # read as a thumbnail
    buf = io.BytesIO()
    photo.save(buf, format="MPO", save_all=True, append_images=[photo] * 12, progressive=True)
    for data in (
        progressive,
        _with_exif_thumbnail(progressive, thumbnail),
        buf.getvalue(),
        progressive + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 200,
    ):
        assert data.count(b"\xff\xda") > MAX_JPEG_SCANS or data == progressive
        info = inspect_image(data, max_pixels=MAX)
        assert (info.format, info.width, info.height) == ("JPEG", *photo.size)
        assert load_image(data).size == photo.size
