"""Example pictures to try the portal with one click, drawn here with Pillow (nothing is downloaded
or shipped): photo-like patterns that ImageNet has classes for, and sketches drawn as the canvas
draws them (black strokes, 12 px wide, on a white 280 px square, PNG)."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterable
from functools import cache

from PIL import Image, ImageDraw, ImageFilter

SIZE = 448
CANVAS = 280
STROKE = 12


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def maze() -> Image.Image:
    """A hedge maze seen from above (a perfect maze by depth-first search on a grid, green walls
    on sand): ImageNet's "maze"."""
    cells, cell = 8, SIZE // 8
    hedge = (40, 110, 40)
    rng = random.Random(7)
    image = Image.new("RGB", (SIZE, SIZE), (210, 190, 140))
    draw = ImageDraw.Draw(image)
    walls = {(x, y, d) for x in range(cells) for y in range(cells) for d in "ES"}
    seen, stack = {(0, 0)}, [(0, 0)]
    while stack:
        x, y = stack[-1]
        options = [
            (nx, ny)
            for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1))
            if 0 <= nx < cells and 0 <= ny < cells and (nx, ny) not in seen
        ]
        if not options:
            stack.pop()
            continue
        nx, ny = rng.choice(options)
        if nx != x:
            walls.discard((min(x, nx), y, "E"))
        else:
            walls.discard((x, min(y, ny), "S"))
        seen.add((nx, ny))
        stack.append((nx, ny))
    width = 16
    draw.rectangle([0, 0, SIZE - 1, SIZE - 1], outline=hedge, width=width)
    for x, y, d in walls:
        if d == "E" and x < cells - 1:
            draw.line([((x + 1) * cell, y * cell), ((x + 1) * cell, (y + 1) * cell)], fill=hedge, width=width)
        if d == "S" and y < cells - 1:
            draw.line([(x * cell, (y + 1) * cell), ((x + 1) * cell, (y + 1) * cell)], fill=hedge, width=width)
    return image


def crossword() -> Image.Image:
    """A crossword grid, some squares black, numbers in the corners: ImageNet's "crossword puzzle"."""
    cells, cell = 13, SIZE // 13
    rng = random.Random(3)
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    black = {(x, y) for x in range(cells) for y in range(cells) if rng.random() < 0.16}
    black |= {(cells - 1 - x, cells - 1 - y) for x, y in black}  # symmetric, as crosswords are
    number = 1
    for y in range(cells):
        for x in range(cells):
            box = [x * cell, y * cell, (x + 1) * cell, (y + 1) * cell]
            draw.rectangle(box, fill="black" if (x, y) in black else "white", outline="black", width=2)
            starts = (x, y) not in black and (x == 0 or (x - 1, y) in black or y == 0 or (x, y - 1) in black)
            if starts:
                draw.text((x * cell + 3, y * cell + 2), str(number), fill="black")
                number += 1
    return image


def honeycomb() -> Image.Image:
    """Wax cells with darker, honey-filled centres between brown walls, slightly soft as a photo
    is: ImageNet's "honeycomb"."""
    wall, wax = (110, 60, 10), (230, 160, 30)
    image = Image.new("RGB", (SIZE, SIZE), wall)
    draw = ImageDraw.Draw(image)
    rng = random.Random(5)
    r = 20
    h = math.sqrt(3) * r
    for row in range(-1, int(SIZE / h) + 2):
        for col in range(-1, int(SIZE / (1.5 * r)) + 2):
            cx = col * 1.5 * r
            cy = row * h + (h / 2 if col % 2 else 0)
            shade = rng.randint(-30, 30)
            honey = (wax[0] - 60 + shade // 2, wax[1] - 70 + shade, wax[2] - 30)
            for radius, colour in ((r - 3, wax), (0.65 * r, honey)):
                corners = [
                    (cx + radius * math.cos(math.pi / 3 * k), cy + radius * math.sin(math.pi / 3 * k)) for k in range(6)
                ]
                draw.polygon(corners, fill=colour)
    return image.filter(ImageFilter.GaussianBlur(1))


def _strokes(strokes: list[list[tuple[float, float]]]) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), "white")
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line(stroke, fill="black", width=STROKE, joint="curve")
    return image


def _circle(
    cx: float, cy: float, r: float, start: float = 0, end: float = 360, n: int = 48
) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(math.radians(start + (end - start) * k / n)),
            cy + r * math.sin(math.radians(start + (end - start) * k / n)),
        )
        for k in range(n + 1)
    ]


def house() -> Image.Image:
    """A house: a square with a roof and a door."""
    return _strokes(
        [
            [(60, 130), (60, 240), (220, 240), (220, 130), (60, 130)],
            [(45, 140), (140, 45), (235, 140)],
            [(120, 240), (120, 185), (160, 185), (160, 240)],
        ]
    )


def star() -> Image.Image:
    """A five-pointed star in one stroke."""
    points = [
        (140 + 110 * math.cos(math.radians(-90 + 144 * k)), 150 + 110 * math.sin(math.radians(-90 + 144 * k)))
        for k in range(6)
    ]
    return _strokes([points])


def smiley_face() -> Image.Image:
    """A round face with two eyes and a smile."""
    return _strokes(
        [
            _circle(140, 140, 110),
            _circle(100, 110, 8),
            _circle(180, 110, 8),
            _circle(140, 150, 60, start=20, end=160, n=24),
        ]
    )


def fish() -> Image.Image:
    """A fish swimming left: an oval body, a forked tail and an eye."""
    return _strokes(
        [
            [(130 + 85 * math.cos(math.radians(a)), 140 + 50 * math.sin(math.radians(a))) for a in range(0, 361, 10)],
            [(215, 140), (260, 95), (255, 185), (215, 140)],
            _circle(85, 128, 7),
        ]
    )


PHOTOS: dict[str, Callable[[], Image.Image]] = {"Maze": maze, "Crossword": crossword, "Honeycomb": honeycomb}
"""Photo examples by the name on their button."""
SKETCHES: dict[str, Callable[[], Image.Image]] = {
    "House": house,
    "Star": star,
    "Smiley face": smiley_face,
    "Fish": fish,
}
"""Drawing examples by the name on their button; each name is its QuickDraw category in words."""


def sketches_for(labels: Iterable[str]) -> list[str]:
    """The drawing examples whose category is one of ``labels`` (a sketch model's labels, as
    ``smiley_face``): a 6-category version standing in for the 20-category one is offered only
    drawings it knows."""
    known = set(labels)
    return [name for name in SKETCHES if name.lower().replace(" ", "_") in known]


@cache
def example_png(kind: str, name: str) -> bytes:
    """The example ``name`` of ``kind`` ("photo" or "sketch") as PNG bytes; KeyError for another."""
    return _png((PHOTOS if kind == "photo" else SKETCHES)[name]())
