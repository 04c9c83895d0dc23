"""The card's pictures as PNG bytes: a sample-length histogram and a draft-vocabulary
coverage curve, drawn on a small RGB canvas and encoded with zlib (no plotting library:
matplotlib would be a heavy dependency for two charts)."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

WIDTH, HEIGHT = 640, 360
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 24, 36, 52
WHITE, BLACK, GREY, BLUE, ORANGE = (255, 255, 255), (40, 40, 40), (215, 215, 215), (52, 101, 164), (230, 120, 20)

# A 3x5 pixel font: each glyph is five rows of three bits, drawn at `scale`.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", "a": "010101111101101", "b": "110101110101110",
    "c": "011100100100011", "d": "110101101101110", "e": "111100110100111", "f": "111100110100100",
    "g": "011100101101011", "h": "101101111101101", "i": "111010010010111", "j": "001001001101010",
    "k": "101101110101101", "l": "100100100100111", "m": "101111111101101", "n": "110101101101101",
    "o": "010101101101010", "p": "110101110100100", "q": "010101101110011", "r": "110101110101101",
    "s": "011100010001110", "t": "111010010010010", "u": "101101101101111", "v": "101101101101010",
    "w": "101101111111101", "x": "101101010101101", "y": "101101010010010", "z": "111001010100111",
    " ": "000000000000000", ".": "000000000000010", ",": "000000000010100", "%": "101001010100101",
    "-": "000000111000000", "/": "001001010100100", ":": "000010000010000", "(": "010100100100010",
    ")": "010001001001010", "=": "000111000111000", "+": "000010111010000", "_": "000000000000111",
}


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """8-bit RGB PNG; `rgb` holds rows top to bottom, 3 bytes per pixel."""
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


class Canvas:
    def __init__(self, width: int = WIDTH, height: int = HEIGHT):
        self.width, self.height = width, height
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        x0, x1 = sorted((max(0, int(x0)), min(self.width, int(x1))))
        y0, y1 = sorted((max(0, int(y0)), min(self.height, int(y1))))
        self.pixels[y0:y1, x0:x1] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for i in range(steps + 1):
            x = round(x0 + (x1 - x0) * i / steps)
            y = round(y0 + (y1 - y0) * i / steps)
            self.rect(x - width // 2, y - width // 2, x - width // 2 + width, y - width // 2 + width, color)

    def text(self, x: int, y: int, text: str, color=BLACK, scale: int = 2, anchor: str = "left") -> None:
        advance = 4 * scale
        if anchor == "center":
            x -= len(text) * advance // 2
        elif anchor == "right":
            x -= len(text) * advance
        for i, char in enumerate(text.lower()):
            bits = _FONT.get(char, _FONT[" "])
            for row in range(5):
                for col in range(3):
                    if bits[row * 3 + col] == "1":
                        px, py = x + i * advance + col * scale, y + row * scale
                        self.rect(px, py, px + scale, py + scale, color)

    def png(self) -> bytes:
        return encode_png(self.width, self.height, self.pixels.tobytes())


def _plot_area() -> tuple[int, int, int, int]:
    return MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM


def _axes(canvas: Canvas, title: str, xlabel: str, ylabel: str) -> None:
    left, top, right, bottom = _plot_area()
    canvas.text(WIDTH // 2, 10, title, scale=3, anchor="center")
    canvas.text((left + right) // 2, HEIGHT - 16, xlabel, anchor="center")
    canvas.text(4, 8, ylabel)
    canvas.line(left, bottom, right, bottom, BLACK)
    canvas.line(left, top, left, bottom, BLACK)


def _short(value: float) -> str:
    for unit, size in (("m", 1e6), ("k", 1e3)):
        if value >= size:
            scaled = value / size
            return f"{scaled:.0f}{unit}" if scaled >= 10 or scaled == int(scaled) else f"{scaled:.1f}{unit}"
    return f"{value:.0f}"


def length_histogram_png(lengths, seq_length: int | None = None, bins: int = 40) -> bytes:
    """Tokens per sample: how full the sequences are, and how many hit the truncation length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    canvas = Canvas()
    _axes(canvas, "tokens per sample", "tokens per sample", "samples")
    left, top, right, bottom = _plot_area()
    hi = int(max(seq_length or 0, lengths.max(initial=1)))
    counts, edges = np.histogram(lengths, bins=bins, range=(0, hi))
    peak = max(int(counts.max(initial=0)), 1)
    scale_x, scale_y = (right - left) / hi, (bottom - top) / peak
    for count, lo, up in zip(counts, edges[:-1], edges[1:]):
        if count:
            canvas.rect(left + lo * scale_x + 1, bottom - count * scale_y, left + up * scale_x, bottom, BLUE)
    for tick in np.linspace(0, hi, 5):
        x = left + tick * scale_x
        canvas.line(x, bottom, x, bottom + 4, BLACK)
        canvas.text(int(x), bottom + 8, _short(tick), anchor="center")
    for tick in np.linspace(0, peak, 5):
        y = bottom - tick * scale_y
        canvas.line(left - 4, y, left, y, BLACK)
        canvas.text(left - 8, int(y) - 5, _short(round(tick)), anchor="right")
    if seq_length:
        x = left + seq_length * scale_x
        canvas.line(x - 1, top, x - 1, bottom, ORANGE, width=2)
        canvas.text(int(x) - 6, top + 4, f"max {seq_length}", ORANGE, anchor="right")
    return canvas.png()


def coverage_curve(token_counts) -> np.ndarray:
    """Share of loss-masked tokens covered by the `n` most frequent ids, for n = 1..V."""
    counts = np.sort(np.asarray(token_counts, dtype=np.float64))[::-1]
    total = counts.sum()
    return np.cumsum(counts) / total if total else np.zeros_like(counts)


def coverage_curve_png(token_counts, draft_vocab_size: int) -> bytes:
    """Coverage of loss-masked tokens against draft-vocabulary size (log x), the chosen size marked."""
    curve = coverage_curve(token_counts)
    vocab = max(len(curve), 2)
    canvas = Canvas()
    _axes(canvas, "draft vocabulary coverage", "draft vocabulary size (log)", "% of loss tokens")
    left, top, right, bottom = _plot_area()

    def x_of(n: float) -> float:
        return left + (right - left) * math.log10(max(n, 1)) / math.log10(vocab)

    def y_of(share: float) -> float:
        return bottom - (bottom - top) * share

    for pct in (0, 25, 50, 75, 100):
        y = y_of(pct / 100)
        canvas.line(left + 1, y, right, y, GREY)
        canvas.text(left - 8, int(y) - 5, f"{pct}%", anchor="right")
    power = 0
    while 10**power <= vocab:
        x = x_of(10**power)
        canvas.line(x, bottom, x, bottom + 4, BLACK)
        canvas.text(int(x), bottom + 8, _short(10**power), anchor="center")
        power += 1
    points = np.unique(np.geomspace(1, vocab, num=400).astype(np.int64))
    previous = None
    for n in points:
        point = (x_of(n), y_of(curve[min(n, len(curve)) - 1] if len(curve) else 0.0))
        if previous is not None:
            canvas.line(*previous, *point, BLUE, width=2)
        previous = point
    chosen = min(max(draft_vocab_size, 1), vocab)
    share = curve[chosen - 1] if len(curve) else 0.0
    x = x_of(chosen)
    canvas.line(x, top, x, bottom, ORANGE, width=2)
    canvas.text(int(x) - 6, (top + bottom) // 2, f"{_short(chosen)} ids: {share:.1%}", ORANGE, anchor="right")
    return canvas.png()


PICTURES = {
    "length_histogram": ("images/length_histogram.png", "Tokens per sample"),
    "vocab_coverage": ("images/vocab_coverage.png", "Draft-vocabulary coverage of loss-masked tokens"),
}


def card_pictures(lengths, token_counts, draft_vocab_size: int, seq_length: int | None) -> dict[str, bytes]:
    """{path in the cache: PNG bytes} for every picture the card shows."""
    return {
        PICTURES["length_histogram"][0]: length_histogram_png(lengths, seq_length),
        PICTURES["vocab_coverage"][0]: coverage_curve_png(token_counts, draft_vocab_size),
    }
