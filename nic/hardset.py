"""The hard-content set: generated images that are not soft natural photographs.

Text, line art, fine texture and flat areas are what a codec trained on downscaled
photos never saw (issue 25). These images are made here, deterministically, with no
download: numpy for the patterns, Pillow's own scalable font (``ImageFont.load_default``,
Aileron, shipped with Pillow) for the text. ``nic bench --hard`` measures them;
training draws random crops of the same kinds of content, never these images
(:func:`random_crop`).

Each image is 512 rows x 768 columns (Kodak's size), uint8 RGB:

| name            | what it is                                                      |
|-----------------|-----------------------------------------------------------------|
| flat            | one colour                                                      |
| gradient        | smooth two-dimensional colour ramps (banding shows at once)     |
| text-black      | black text on white at 9 to 28 px, the page of a document       |
| text-colour     | coloured text on coloured panels                                |
| line-art        | one-pixel and thicker pen lines, circles, a grid: a drawing     |
| hatching        | fine parallel hatching at several angles and pitches: an engraving |
| gratings        | sine gratings from coarse to near the pixel frequency           |
| zone-plate      | a radial cosine chirp, every frequency and orientation          |
| screenshot      | a window: title bar, buttons, menu, text, flat panels           |
| photo-with-text | a smooth photo-like texture with a caption and a diagram pasted in |
| page-with-photo | the screenshot's window with a photo-like picture in its page: a web page or a document with a figure |

Math only: arrays out, no files read or written.
"""

from __future__ import annotations

import numpy as np

HEIGHT, WIDTH = 512, 768

WORDS = ("the quick brown fox jumps over the lazy dog while a learned codec keeps every "
         "stroke of small print sharp 0123456789 invoice total page figure table").split()


def _canvas(colour=(255, 255, 255)):
    from PIL import Image

    return Image.new("RGB", (WIDTH, HEIGHT), colour)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _sentence(rng: np.random.Generator, count: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), count))


def flat() -> np.ndarray:
    return np.full((HEIGHT, WIDTH, 3), (120, 160, 200), np.uint8)


def gradient() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    r = 40 + 180 * x / (WIDTH - 1)
    g = 60 + 150 * y / (HEIGHT - 1)
    b = 200 - 120 * np.hypot(x - WIDTH / 2, y - HEIGHT / 2) / np.hypot(WIDTH / 2, HEIGHT / 2)
    return np.round(np.stack([r, g, b], axis=2)).astype(np.uint8)


def text_black() -> np.ndarray:
    from PIL import ImageDraw

    image, rng = _canvas(), np.random.default_rng(1)
    draw = ImageDraw.Draw(image)
    top = 6
    for size in (9, 10, 11, 12, 14, 16, 20, 28):
        for _ in range(2 if size < 20 else 1):
            draw.text((8, top), _sentence(rng, 14), fill=(0, 0, 0), font=_font(size))
            top += int(size * 1.45) + 2
    return np.asarray(image).copy()


def text_colour() -> np.ndarray:
    from PIL import ImageDraw

    image, rng = _canvas((250, 250, 245)), np.random.default_rng(2)
    draw = ImageDraw.Draw(image)
    panels = [((230, 240, 255), (20, 40, 160)), ((40, 40, 48), (255, 220, 60)), ((255, 235, 235), (200, 0, 30)),
              ((20, 110, 60), (255, 255, 255))]
    for i, (background, ink) in enumerate(panels):
        top = i * HEIGHT // 4
        draw.rectangle((0, top, WIDTH, top + HEIGHT // 4), fill=background)
        for line, size in enumerate((11, 14, 18)):
            draw.text((10, top + 6 + line * 40), _sentence(rng, 12), fill=ink, font=_font(size))
    return np.asarray(image).copy()


def line_art() -> np.ndarray:
    from PIL import ImageDraw

    image, rng = _canvas(), np.random.default_rng(3)
    draw = ImageDraw.Draw(image)
    for x in range(0, WIDTH, 32):
        draw.line((x, 0, x, HEIGHT), fill=(200, 200, 255), width=1)
    for y in range(0, HEIGHT, 32):
        draw.line((0, y, WIDTH, y), fill=(200, 200, 255), width=1)
    for _ in range(40):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, [WIDTH, HEIGHT, WIDTH, HEIGHT]))
        draw.line((x0, y0, x1, y1), fill=(0, 0, 0), width=int(rng.integers(1, 4)))
    for _ in range(12):
        x, y, r = (int(v) for v in rng.integers([40, 40, 8], [WIDTH - 40, HEIGHT - 40, 60]))
        draw.ellipse((x - r, y - r, x + r, y + r), outline=(180, 0, 0), width=2)
    return np.asarray(image).copy()


def hatching() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    out = np.full((HEIGHT, WIDTH), 235.0)
    cells = [(0, 3.0), (30, 4.0), (60, 2.5), (90, 5.0), (120, 3.5), (150, 2.2)]
    for i, (angle, pitch) in enumerate(cells):
        c0, c1 = i * WIDTH // len(cells), (i + 1) * WIDTH // len(cells)
        t = np.deg2rad(angle)
        phase = (x[:, c0:c1] * np.cos(t) + y[:, c0:c1] * np.sin(t)) / pitch
        ink = (phase - np.floor(phase)) < 0.4
        # Darker towards the bottom, as an engraving's shading.
        out[:, c0:c1] = np.where(ink & (np.sin(np.pi * y[:, c0:c1] / HEIGHT) > 0.15), 25.0, 235.0)
    return np.repeat(np.round(out).astype(np.uint8)[..., None], 3, axis=2)


def gratings() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    out = np.empty((HEIGHT, WIDTH, 3))
    periods = (32, 16, 8, 5, 4, 3, 2.5, 2.2)
    for i, period in enumerate(periods):
        c0, c1 = i * WIDTH // len(periods), (i + 1) * WIDTH // len(periods)
        vertical = np.sin(2 * np.pi * x[: HEIGHT // 2, c0:c1] / period)
        horizontal = np.sin(2 * np.pi * y[HEIGHT // 2:, c0:c1] / period)
        out[: HEIGHT // 2, c0:c1] = (128 + 100 * vertical)[..., None] * np.array([1.0, 0.9, 0.8])
        out[HEIGHT // 2:, c0:c1] = (128 + 100 * horizontal)[..., None] * np.array([0.8, 0.9, 1.0])
    return np.round(np.clip(out, 0, 255)).astype(np.uint8)


def zone_plate() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    r2 = (x - WIDTH / 2) ** 2 + (y - HEIGHT / 2) ** 2
    # The local frequency grows with the radius and reaches 0.5 cycle/pixel at the corner.
    k = np.pi / (2 * np.sqrt((WIDTH / 2) ** 2 + (HEIGHT / 2) ** 2))
    value = 128 + 110 * np.cos(k * r2)
    return np.repeat(np.round(value).astype(np.uint8)[..., None], 3, axis=2)


def screenshot() -> np.ndarray:
    from PIL import ImageDraw

    image, rng = _canvas((236, 236, 236)), np.random.default_rng(4)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, WIDTH, 28), fill=(45, 90, 170))
    draw.text((10, 6), "Document - Editor", fill=(255, 255, 255), font=_font(14))
    for i, colour in enumerate(((230, 80, 70), (240, 190, 50), (90, 190, 80))):
        draw.ellipse((WIDTH - 80 + 22 * i, 8, WIDTH - 66 + 22 * i, 22), fill=colour)
    draw.rectangle((0, 28, WIDTH, 52), fill=(250, 250, 250))
    for i, item in enumerate(("File", "Edit", "View", "Insert", "Format", "Tools", "Help")):
        draw.text((10 + 64 * i, 33), item, fill=(30, 30, 30), font=_font(13))
    draw.rectangle((0, 52, 170, HEIGHT), fill=(245, 245, 248))
    for i in range(12):
        draw.text((14, 62 + 30 * i), f"{_sentence(rng, 2)}", fill=(60, 60, 60), font=_font(12))
    draw.rectangle((186, 66, WIDTH - 16, HEIGHT - 60), fill=(255, 255, 255), outline=(200, 200, 200))
    for line in range(18):
        draw.text((198, 76 + 20 * line), _sentence(rng, 11), fill=(20, 20, 20), font=_font(12))
    for i, label in enumerate(("Cancel", "OK")):
        x0 = WIDTH - 200 + 96 * i
        draw.rounded_rectangle((x0, HEIGHT - 46, x0 + 84, HEIGHT - 18), 5,
                               fill=(45, 110, 220) if label == "OK" else (250, 250, 250), outline=(150, 150, 150))
        draw.text((x0 + 20, HEIGHT - 40), label, fill=(255, 255, 255) if label == "OK" else (20, 20, 20),
                  font=_font(14))
    return np.asarray(image).copy()


def photo_like(seed: int = 5) -> np.ndarray:
    """A smooth, photo-like texture: noise with a 1/f² power spectrum, in colour."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(HEIGHT)[:, None]
    fx = np.fft.rfftfreq(WIDTH)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / WIDTH) ** 1.0
    planes = []
    for _ in range(3):
        spectrum = amplitude * (rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape))
        plane = np.fft.irfft2(spectrum, s=(HEIGHT, WIDTH))
        planes.append((plane - plane.mean()) / plane.std())
    mixed = np.stack([planes[0], 0.7 * planes[0] + 0.3 * planes[1], 0.5 * planes[0] + 0.5 * planes[2]], axis=2)
    return np.round(np.clip(120 + 40 * mixed, 0, 255)).astype(np.uint8)


def photo_with_text() -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.fromarray(photo_like())
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, HEIGHT - 90, 520, HEIGHT - 20), fill=(255, 255, 255))
    draw.text((30, HEIGHT - 82), "Figure 3: the harbour at dawn, looking east", fill=(0, 0, 0), font=_font(16))
    draw.text((30, HEIGHT - 54), "photo: nic test set, generated", fill=(90, 90, 90), font=_font(12))
    draw.rectangle((WIDTH - 260, 20, WIDTH - 20, 200), fill=(255, 255, 255), outline=(0, 0, 0))
    rng = np.random.default_rng(6)
    points = [(WIDTH - 250 + 20 * i, int(180 - v)) for i, v in enumerate(np.cumsum(rng.integers(-10, 25, 12)))]
    draw.line(points, fill=(200, 0, 0), width=2)
    draw.line((WIDTH - 250, 190, WIDTH - 30, 190), fill=(0, 0, 0), width=1)
    return np.asarray(image).copy()


def page_with_photo() -> np.ndarray:
    """The screenshot's window with a photo-like picture in the middle of its page."""
    image = screenshot()
    image[128:384, 256:640] = photo_like(7)[:256, :384]
    return image


# ---- random hard content for training ---------------------------------------------------

def random_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size uint8 RGB crop of random hard content for training: one of flat
    colour, a gradient, text, line art, hatching, a grating, a chirp or UI panels, with
    random colours, sizes, angles and frequencies. Drawn from ``rng``, never one of the
    benchmark images above (those are fixed; these are not)."""
    kind = int(rng.integers(0, 8))
    return _RANDOM[kind](rng, size)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _random_flat(rng, size):
    return np.full((size, size, 3), _colour(rng), np.uint8)


def _random_gradient(rng, size):
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
    t = np.clip(rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y + rng.uniform(0, 1), 0, 1)[..., None]
    return np.round(a + (b - a) * t).astype(np.uint8)


def _random_text(rng, size):
    from PIL import Image, ImageDraw

    background, ink = _colour(rng), _colour(rng)
    if rng.random() < 0.5:  # most text is dark on light
        background, ink = (255, 255, 255), (0, 0, 0)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    font_size = int(rng.integers(8, 33))
    top = int(rng.integers(-font_size, font_size))
    while top < size:
        draw.text((int(rng.integers(-40, 8)), top), _sentence(rng, 12), fill=ink, font=_font(font_size))
        top += int(font_size * rng.uniform(1.1, 1.8))
    return np.asarray(image).copy()


def _random_lines(rng, size):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), _colour(rng) if rng.random() < 0.3 else (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 40))):
        points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        if rng.random() < 0.7:
            draw.line(points[0] + points[1], fill=_colour(rng), width=int(rng.integers(1, 5)))
        else:
            box = (min(points[0][0], points[1][0]), min(points[0][1], points[1][1]),
                   max(points[0][0], points[1][0]), max(points[0][1], points[1][1]))
            draw.ellipse(box, outline=_colour(rng), width=int(rng.integers(1, 4)))
    return np.asarray(image).copy()


def _random_hatching(rng, size):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    t, pitch = rng.uniform(0, np.pi), rng.uniform(2.0, 8.0)
    phase = (x * np.cos(t) + y * np.sin(t)) / pitch
    ink = (phase - np.floor(phase)) < rng.uniform(0.2, 0.6)
    light, dark = np.array(_colour(rng), float), np.array(_colour(rng), float)
    return np.where(ink[..., None], dark, light).astype(np.uint8)


def _random_grating(rng, size):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    t, period = rng.uniform(0, np.pi), rng.uniform(2.1, 32.0)
    wave = np.sin(2 * np.pi * (x * np.cos(t) + y * np.sin(t)) / period + rng.uniform(0, 2 * np.pi))
    centre, amplitude = np.array(_colour(rng), float), rng.uniform(20, 127)
    return np.round(np.clip(centre + amplitude * wave[..., None], 0, 255)).astype(np.uint8)


def _random_chirp(rng, size):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy = rng.uniform(-size, 2 * size, 2)
    k = rng.uniform(0.2, 1.0) * np.pi / (2 * size * 1.5)
    value = 128 + rng.uniform(40, 120) * np.cos(k * ((x - cx) ** 2 + (y - cy) ** 2))
    return np.repeat(np.round(np.clip(value, 0, 255)).astype(np.uint8)[..., None], 3, axis=2)


def _random_panels(rng, size):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 8))):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        x1, y1 = x0 + int(rng.integers(min(16, size - 1), size)), y0 + int(rng.integers(12, size // 2 + 13))
        draw.rectangle((x0, y0, x1, y1), fill=_colour(rng), outline=_colour(rng) if rng.random() < 0.5 else None)
        if rng.random() < 0.7:
            draw.text((x0 + 4, y0 + 3), _sentence(rng, 3), fill=_colour(rng), font=_font(int(rng.integers(10, 18))))
    return np.asarray(image).copy()


_RANDOM = (_random_flat, _random_gradient, _random_text, _random_lines, _random_hatching, _random_grating,
           _random_chirp, _random_panels)


IMAGES = {
    "flat": flat, "gradient": gradient, "text-black": text_black, "text-colour": text_colour,
    "line-art": line_art, "hatching": hatching, "gratings": gratings, "zone-plate": zone_plate,
    "screenshot": screenshot, "photo-with-text": photo_with_text, "page-with-photo": page_with_photo,
}
"""Name → generator of each image of the set, in the order of the table above."""


def generate(names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The set's images by name (all of them by default); ValueError for an unknown name."""
    unknown = [n for n in names or [] if n not in IMAGES]
    if unknown:
        raise ValueError(f"unknown hard-content image {', '.join(unknown)} (the set has {', '.join(IMAGES)})")
    return {name: IMAGES[name]() for name in (names or IMAGES)}
