"""The card's pictures as PNG bytes: a sample-length histogram and a draft-vocabulary
coverage curve, drawn with matplotlib.

The data behind each picture comes from small pure functions (`length_histogram`,
`coverage_curve`, `draft_coverage`); matplotlib is imported only when a picture is drawn,
so importing the builder stays cheap. Drawing uses the Agg canvas directly (no pyplot, no
display) under matplotlib's default style, so a user's matplotlibrc cannot change the
bytes, and the PNG carries no software or time stamp: the same cache gives the same PNGs
(with the same matplotlib version).
"""

from __future__ import annotations

import math

import numpy as np

# 8 x 4.5 inches at 200 dpi: 1600 x 900 pixels, sharp on high-density screens when the
# card shows it about 800 pixels wide.
FIGURE_INCHES = (8.0, 4.5)
DPI = 200
BAR_COLOR, MARK_COLOR = "#3465a4", "#e67814"
CURVE_POINTS = 1000  # the curve is sampled on a log grid: a 150k-token vocabulary stays a small PNG

PICTURES = {
    "length_histogram": ("images/length_histogram.png", "Tokens per sample"),
    "vocab_coverage": ("images/vocab_coverage.png", "Draft-vocabulary coverage of loss-masked tokens"),
}


def length_histogram(lengths, seq_length: int | None = None, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of tokens per sample. Every bin spans the same whole number of token
    counts, [edges[i], edges[i+1]); the range reaches the sequence-length limit even when
    no sample does, so a cache whose samples fill their sequences shows it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    top = int(max(seq_length or 0, lengths.max(initial=1)))
    width = max(1, math.ceil((top + 1) / bins))
    edges = np.arange(math.ceil((top + 1) / width) + 1, dtype=np.int64) * width
    counts, _ = np.histogram(lengths, bins=edges)  # the last edge lies above every length
    return counts, edges


def coverage_curve(token_counts) -> np.ndarray:
    """Share of loss-masked tokens covered by the `n` most frequent ids, for n = 1..V."""
    counts = np.sort(np.asarray(token_counts, dtype=np.float64))[::-1]
    total = counts.sum()
    return np.cumsum(counts) / total if total else np.zeros_like(counts)


def draft_coverage(token_counts, selected_token_ids) -> float:
    """Share of loss-masked tokens whose id is in the cache's draft vocabulary (its special
    ids included, so this can sit just under the curve at the same size)."""
    counts = np.asarray(token_counts, dtype=np.float64)
    total = counts.sum()
    return float(counts[np.asarray(selected_token_ids, dtype=np.int64)].sum() / total) if total else 0.0


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _style():
    """matplotlib's default style, whatever the user's matplotlibrc says."""
    import matplotlib.style

    return matplotlib.style.context("default")


def length_histogram_figure(lengths, seq_length: int | None = None):
    """Tokens per sample: how full the sequences are, and how many reach the length limit."""
    from matplotlib.ticker import MaxNLocator

    lengths = np.asarray(lengths, dtype=np.int64)
    counts, edges = length_histogram(lengths, seq_length)
    with _style():
        figure = _new_figure()
        ax = figure.add_subplot()
        ax.bar(
            edges[:-1],
            counts,
            width=np.diff(edges),
            align="edge",
            color=BAR_COLOR,
            edgecolor="white",
            linewidth=0.5,
            label=f"{len(lengths):,} samples",
        )
        if seq_length:
            ax.axvline(seq_length, color=MARK_COLOR, linestyle="--", linewidth=1.5, label=f"sequence length limit ({seq_length:,} tokens)")
        ax.set_title("Tokens per sample")
        ax.set_xlabel("tokens per sample")
        ax.set_ylabel("samples")
        ax.set_xlim(0, edges[-1])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="best", framealpha=1)
    return figure


def coverage_figure(token_counts, selected_token_ids):
    """Coverage of loss-masked tokens against draft-vocabulary size (log x), the cache's size marked."""
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    curve = coverage_curve(token_counts)
    vocab = max(len(curve), 2)
    sizes = np.unique(np.geomspace(1, len(curve), num=CURVE_POINTS).round().astype(np.int64)) if len(curve) else np.array([1])
    shares = curve[sizes - 1] if len(curve) else np.zeros(1)
    chosen, covered = len(selected_token_ids), draft_coverage(token_counts, selected_token_ids)
    with _style():
        figure = _new_figure()
        ax = figure.add_subplot()
        ax.plot(sizes, shares, color=BAR_COLOR, linewidth=2, label="coverage by the n most frequent ids")
        ax.axvline(
            chosen,
            color=MARK_COLOR,
            linestyle="--",
            linewidth=1.5,
            label=f"this cache's draft vocabulary: {chosen:,} ids, {covered:.1%} covered",
        )
        ax.plot([chosen], [covered], "o", color=MARK_COLOR)
        ax.set_xscale("log")
        ax.set_xlim(1, vocab)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda size, _: f"{size:,.0f}"))  # 1,000 rather than 10^3
        ax.set_ylim(0, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        ax.set_title("Draft-vocabulary coverage of loss-masked tokens")
        ax.set_xlabel("draft vocabulary size (token ids, log scale)")
        ax.set_ylabel("share of loss-masked tokens covered")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", framealpha=1)
    return figure


def png_bytes(figure) -> bytes:
    """The figure as PNG, without the software tag matplotlib would stamp on it."""
    import io

    buffer = io.BytesIO()
    with _style():  # savefig reads rcParams too
        figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def card_pictures(lengths, token_counts, selected_token_ids, seq_length: int | None) -> dict[str, bytes]:
    """{path in the cache: PNG bytes} for every picture the card shows."""
    return {
        PICTURES["length_histogram"][0]: png_bytes(length_histogram_figure(lengths, seq_length)),
        PICTURES["vocab_coverage"][0]: png_bytes(coverage_figure(token_counts, selected_token_ids)),
    }


# ---- drawing in a child process (builder.card.PictureDrawing) ---------------------------------

INPUTS_FILE = "inputs.npz"  # lengths, token_counts, selected_token_ids, seq_length (0: none)


def save_inputs(folder, lengths, token_counts, selected_token_ids, seq_length: int | None) -> None:
    """What `card_pictures` draws from, as the child process reads it."""
    np.savez(
        f"{folder}/{INPUTS_FILE}",
        lengths=np.asarray(lengths, dtype=np.int64),
        token_counts=np.asarray(token_counts, dtype=np.int64),
        selected_token_ids=np.asarray(selected_token_ids, dtype=np.int64),
        seq_length=np.int64(seq_length or 0),
    )


def draw_saved_inputs(folder, parent: int | None = None) -> None:
    """Draw the pictures of `folder`'s inputs into `folder`, each under its file name. `parent`:
    the pid of the build that started this process, which this process does not outlive."""
    from pathlib import Path

    if parent is not None:
        end_with_parent(parent)

    with np.load(Path(folder) / INPUTS_FILE) as saved:
        inputs = {key: saved[key] for key in saved.files}
    pictures = card_pictures(inputs["lengths"], inputs["token_counts"], inputs["selected_token_ids"], int(inputs["seq_length"]) or None)
    for relative, data in pictures.items():
        (Path(folder) / Path(relative).name).write_bytes(data)


def end_with_parent(parent: int) -> None:
    """On Linux, have the kernel kill this process when `parent` dies: a build killed by SIGKILL
    runs no cleanup, and a drawing left running would write into a folder the next build removes.
    Exits at once if `parent` is already gone."""
    import os
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
