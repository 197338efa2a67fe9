"""Synthetic text images rendered with the DejaVu fonts, labelled by construction.

* :func:`document_page` - a page of a document (title, paragraphs, sometimes a table of numbers) in one of
  the DejaVu faces; the benchmark rotates it by 0/90/180/270 degrees for the page-orientation classifier.
* :func:`text_line` - a crop of one line of text, 48 x 192 pixels, for the text-line 0/180 classifier.
* :func:`word_line` - a short line (1-4 English words or numbers) on white, 48 x 320 pixels, left-aligned and
  wholly inside the crop, with its text: for the text recogniser.

Every image comes from its own seeded generator, so a data set is reproducible image by image.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path(os.environ.get("ONNXSPARSE_BENCH_FONTS", "/usr/share/fonts/truetype/dejavu"))
FACES = (
    "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf",
    "DejaVuSerifCondensed.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf",
)
BOLD_FACES = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed-Bold.ttf")

# Common English words: the text only has to look like text (letter shapes, word and line spacing).
WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which but have an they
you were her all she there would their we him been has when who will more no if out so said what up its about
into than them can only other new some could time these two may then do first any my now such like our over
man me even most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off come since
against go came right used take three report market water system company number part place case week group
problem fact point government hand result order service research during level office value process figure table
section analysis policy method sample quality price account total annual period general control energy data
""".split()
CAPITALISED = [w.capitalize() for w in WORDS]


@lru_cache(maxsize=64)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"font {path} not found (Debian package fonts-dejavu-core / fonts-dejavu-extra)")
    return ImageFont.truetype(str(path), size)


def available_faces() -> tuple[str, ...]:
    return tuple(f for f in FACES if (FONT_DIR / f).is_file())


def available_bold() -> tuple[str, ...]:
    return tuple(f for f in BOLD_FACES if (FONT_DIR / f).is_file()) or available_faces()[:1]


def _sentence(rng: np.random.Generator, n_words: int) -> str:
    words = [str(rng.choice(WORDS)) for _ in range(n_words)]
    words[0] = words[0].capitalize()
    for i in range(1, n_words):
        r = rng.random()
        if r < 0.06:
            words[i] = str(rng.integers(1, 2000))
        elif r < 0.10:
            words[i] = str(rng.choice(CAPITALISED))
        elif r < 0.16:
            words[i - 1] += ","
    return " ".join(words) + "."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


def document_page(seed: int, size: tuple[int, int] = (420, 594)) -> Image.Image:
    """An upright grayscale page (``size`` = width, height; swapped for a landscape page now and then)."""
    rng = np.random.default_rng(seed)
    width, height = size if rng.random() < 0.85 else size[::-1]
    paper = int(rng.integers(228, 256))
    ink = int(rng.integers(0, 70))
    img = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(img)
    faces = available_faces()
    face = str(rng.choice(faces))
    body = int(rng.integers(10, 19))
    font = _font(face, body)
    margin_x = int(rng.integers(18, 56))
    y = int(rng.integers(16, 50))
    text_width = width - 2 * margin_x
    # title
    title_font = _font(str(rng.choice(available_bold())), int(body * rng.uniform(1.4, 2.0)))
    title = " ".join(str(rng.choice(CAPITALISED)) for _ in range(int(rng.integers(2, 6))))
    for line in _wrap(draw, title, title_font, text_width):
        draw.text((margin_x, y), line, fill=ink, font=title_font)
        y += int(title_font.size * 1.35)
    y += int(body * rng.uniform(0.6, 1.6))
    leading = rng.uniform(1.25, 1.7)
    while y < height - margin_x - body:
        kind = rng.random()
        if kind < 0.12:  # a small table of numbers
            cols = int(rng.integers(3, 6))
            col_w = text_width // cols
            for _ in range(int(rng.integers(2, 6))):
                if y >= height - margin_x - body:
                    break
                for c in range(cols):
                    cell = str(rng.choice(CAPITALISED)) if c == 0 else f"{rng.uniform(0, 999):.{int(rng.integers(0, 3))}f}"
                    draw.text((margin_x + c * col_w, y), cell, fill=ink, font=font)
                y += int(body * leading)
        else:  # a paragraph
            indent = int(body * rng.uniform(0, 2.5))
            text = " ".join(_sentence(rng, int(rng.integers(6, 18))) for _ in range(int(rng.integers(1, 5))))
            lines = _wrap(draw, text, font, text_width - indent)
            for i, line in enumerate(lines):
                if y >= height - margin_x - body:
                    break
                x = margin_x + (indent if i == 0 else 0)
                draw.text((x, y), line, fill=ink, font=font)
                y += int(body * leading)
        y += int(body * rng.uniform(0.4, 1.4))
    return img


def text_line(seed: int, size: tuple[int, int] = (192, 48)) -> Image.Image:
    """An upright RGB crop of one text line (``size`` = width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    background = tuple(int(v) for v in rng.integers(185, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    face = str(rng.choice(available_faces() + available_bold()))
    font = _font(face, int(rng.integers(22, 34)))
    text = _sentence(rng, 12)
    if rng.random() < 0.3:
        text = text.upper() if rng.random() < 0.3 else text.lower()
    left, top, _right, bottom = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(1, 12)) - left  # the line starts inside the crop and runs past its right edge
    y = (height - (bottom - top)) // 2 - top + int(rng.integers(-4, 5))
    draw.text((x, y), text, fill=ink, font=font)
    return img


def _word_text(rng: np.random.Generator) -> str:
    words = []
    for _ in range(int(rng.integers(1, 5))):
        r = rng.random()
        if r < 0.15:
            words.append(str(rng.integers(0, 10_000)))
        elif r < 0.20:
            words.append(f"{rng.uniform(0, 1000):.{int(rng.integers(1, 3))}f}")
        elif r < 0.40:
            words.append(str(rng.choice(CAPITALISED)))
        else:
            words.append(str(rng.choice(WORDS)))
    return " ".join(words)


def word_line(seed: int, size: tuple[int, int] = (320, 48)) -> tuple[Image.Image, str]:
    """An RGB line of 1-4 words or numbers in dark ink on white (``size`` = width, height), and its text.

    The font shrinks until the whole text fits inside the crop, so the text is the label exactly.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    text = _word_text(rng)
    shade = int(rng.integers(0, 60))
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    face = str(rng.choice(available_faces() + available_bold()))
    x0 = int(rng.integers(2, 10))
    fsize = int(rng.integers(22, 33))
    font = _font(face, fsize)
    while fsize > 12:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= width - x0 - 4 and bottom - top <= height - 4:
            break
        fsize -= 1
        font = _font(face, fsize)
    left, top, _right, bottom = draw.textbbox((0, 0), text, font=font)
    slack = max(0, height - (bottom - top) - 4)
    y = 2 + int(rng.integers(0, slack + 1)) - top
    draw.text((x0 - left, y), text, fill=(shade, shade, shade), font=font)
    return img, text
