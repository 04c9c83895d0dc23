"""The card's pictures: the numbers behind them, their labels, and the PNGs a build writes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import decoded_rows, small_config
from PIL import Image

from builder.card import DRAWING_PREFIX, PictureDrawing, remove_dead_drawings
from builder.pipeline import build
from builder.reader import read_manifest, read_vocab
from dataset_card.pictures import (
    PICTURES,
    card_pictures,
    coverage_curve,
    coverage_figure,
    draft_coverage,
    length_histogram,
    length_histogram_figure,
)

PNG_SIZE = (1600, 900)  # 8 x 4.5 inches at 200 dpi: crisp when the card shows it ~800 px wide


# --- the numbers behind the pictures -------------------------------------------------------


def test_histogram_bins_span_equal_whole_token_counts():
    counts, edges = length_histogram([3, 5, 5, 9, 10], seq_length=10, bins=4)
    # 11 possible lengths (0..10) in 4 bins -> 3 lengths per bin: [0,3) [3,6) [6,9) [9,12)
    assert edges.tolist() == [0, 3, 6, 9, 12]
    assert counts.tolist() == [0, 3, 0, 2]


def test_histogram_reaches_the_length_limit_no_sample_reaches():
    counts, edges = length_histogram([2], seq_length=7, bins=4)
    assert edges.tolist() == [0, 2, 4, 6, 8]
    assert counts.tolist() == [0, 1, 0, 0]
    counts, edges = length_histogram([1, 2, 2], seq_length=None, bins=2)
    assert edges.tolist() == [0, 2, 4] and counts.tolist() == [1, 2]


def test_coverage_curve_ranks_ids_by_count():
    assert coverage_curve([5, 0, 3, 2]).tolist() == [0.5, 0.8, 1.0, 1.0]
    assert coverage_curve([0, 0]).tolist() == [0.0, 0.0]  # nothing loss-masked: no division by zero


def test_draft_coverage_counts_the_ids_the_cache_selected():
    # a special id that never occurs (1) takes a slot: 2 of 10 tokens, under the curve's 80% at size 2
    assert draft_coverage([5, 0, 3, 2], [1, 3]) == 0.2
    assert draft_coverage([5, 0, 3, 2], [0, 2, 3]) == 1.0
    assert draft_coverage([0, 0], [0]) == 0.0


# --- what the figures draw --------------------------------------------------------------------


def test_histogram_figure_draws_the_bins_and_the_limit():
    ax = length_histogram_figure([3, 5, 5, 9, 10], seq_length=10).axes[0]
    assert ax.get_title() == "Tokens per sample"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("tokens per sample", "samples")
    # 40 bins over 0..10 -> one bin per length
    assert [p.get_height() for p in ax.patches] == [0, 0, 0, 1, 0, 2, 0, 0, 0, 1, 1]
    assert [p.get_x() for p in ax.patches] == list(range(11))
    (limit,) = [line for line in ax.get_lines() if "limit" in line.get_label()]
    assert list(limit.get_xdata()) == [10, 10]
    assert limit.get_label() == "sequence length limit (10 tokens)"


def test_coverage_figure_draws_the_curve_and_marks_the_chosen_size():
    ax = coverage_figure([5, 0, 3, 2], selected_token_ids=[1, 3]).axes[0]
    assert ax.get_title() == "Draft-vocabulary coverage of loss-masked tokens"
    assert ax.get_xlabel() == "draft vocabulary size (token ids, log scale)"
    assert ax.get_ylabel() == "share of loss-masked tokens covered"
    assert ax.get_xscale() == "log"
    curve, marker, point = ax.get_lines()
    assert list(curve.get_xdata()) == [1, 2, 3, 4] and list(curve.get_ydata()) == [0.5, 0.8, 1.0, 1.0]
    assert list(marker.get_xdata()) == [2, 2]
    assert marker.get_label() == "this cache's draft vocabulary: 2 ids, 20.0% covered"
    assert (list(point.get_xdata()), list(point.get_ydata())) == ([2], [0.2])


# --- the PNGs of a real build -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("pictures") / "cache"
    build(small_config(out), progress=False)
    return out


def picture_inputs(cache_dir):
    """What the pictures show, recomputed from the cache as a reader sees it."""
    manifest = read_manifest(cache_dir)
    rows = decoded_rows(cache_dir)
    counts = np.zeros(manifest["target_vocab_size"], dtype=np.int64)
    for row in rows:
        counts += np.bincount(row["input_ids"][row["loss_mask"].bool()].numpy(), minlength=len(counts))
    return {
        "lengths": [row["num_tokens"] for row in rows],
        "token_counts": counts.tolist(),
        "selected_token_ids": read_vocab(cache_dir)["selected_token_ids"].tolist(),
        "seq_length": manifest["identity"]["seq_length"],
    }


def test_build_writes_labelled_pngs_the_card_shows(cache):
    card = (cache / "README.md").read_text()
    for path, caption in PICTURES.values():
        data = (cache / path).read_bytes()
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.size) == ("PNG", PNG_SIZE)
        assert "Software" not in image.info  # no matplotlib version stamped into the bytes
        image.verify()
        assert f"![{caption}]({path})" in card


def test_pictures_show_the_cache_content(cache):
    """The build's PNGs are exactly what its rows, vocab and manifest draw; the coverage it
    marks is the one the card's table reports."""
    inputs = picture_inputs(cache)
    expected = card_pictures(inputs["lengths"], inputs["token_counts"], inputs["selected_token_ids"], inputs["seq_length"])
    for path, data in expected.items():
        assert (cache / path).read_bytes() == data, path
    manifest = read_manifest(cache)
    covered = draft_coverage(inputs["token_counts"], inputs["selected_token_ids"])
    assert covered == pytest.approx(manifest["totals"]["token_coverage"], abs=1e-12)
    assert len(inputs["lengths"]) == manifest["totals"]["samples"] and sum(inputs["lengths"]) == manifest["totals"]["tokens"]


RENDER_IN_FRESH_PROCESS = """
import hashlib, json, sys
import builder.pipeline, builder.card
assert "matplotlib" not in sys.modules, "importing the builder loaded matplotlib"
from dataset_card.pictures import card_pictures
inputs = json.loads(sys.stdin.read())
pictures = card_pictures(inputs["lengths"], inputs["token_counts"], inputs["selected_token_ids"], inputs["seq_length"])
print(json.dumps({path: hashlib.sha256(data).hexdigest() for path, data in pictures.items()}))
"""


def test_same_cache_gives_same_png_bytes_whatever_the_users_matplotlibrc(cache, tmp_path):
    """A fresh process (own font cache state, hash seed) with a matplotlibrc that changes
    sizes, fonts and savefig settings renders byte-identical pictures; the builder's import
    path never loads matplotlib."""
    rc = tmp_path / "matplotlibrc"
    rc.write_text("figure.dpi: 50\nsavefig.dpi: 72\nsavefig.bbox: tight\nfont.size: 22\nlines.linewidth: 6\naxes.facecolor: black\n")
    env = {**os.environ, "MATPLOTLIBRC": str(rc), "PYTHONHASHSEED": "123"}
    done = subprocess.run(
        [sys.executable, "-c", RENDER_IN_FRESH_PROCESS],
        input=json.dumps(picture_inputs(cache)),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout)
    assert fresh == {path: hashlib.sha256((cache / path).read_bytes()).hexdigest() for path, _ in PICTURES.values()}


# --- drawn by a child process while the target runs ----------------------------------------


def drawing_inputs():
    """A stand-in for `prepare`'s result, holding only what the pictures show."""
    counts = np.zeros(300, dtype=np.int64)
    counts[[5, 7, 11, 250]] = [40, 30, 20, 10]
    return SimpleNamespace(
        samples={"num_tokens": [12, 40, 40, 97]},
        token_counts=counts,
        selected_token_ids=np.array([0, 5, 7]),
        cfg=SimpleNamespace(seq_length=128),
    )


def expected_pictures(prep):
    return card_pictures(prep.samples["num_tokens"], prep.token_counts, prep.selected_token_ids, prep.cfg.seq_length)


def test_a_child_process_draws_the_same_pictures(caplog):
    prep = drawing_inputs()
    drawing = PictureDrawing(prep)
    try:
        assert drawing.pictures() == expected_pictures(prep)
    finally:
        drawing.close()
    assert "failed" not in caplog.text  # drawn by the child, not by the fallback


def test_a_failed_child_is_reported_and_the_pictures_drawn_here(caplog):
    prep = drawing_inputs()
    failing = [sys.executable, "-c", "import sys; sys.exit('no display for you')"]
    drawing = PictureDrawing(prep, command=failing)
    try:
        assert drawing.pictures() == expected_pictures(prep)
    finally:
        drawing.close()
    assert "child process failed (exit status 1: no display for you); drawing them here" in caplog.text


def test_a_child_that_cannot_start_is_reported_and_the_pictures_drawn_here(caplog, tmp_path):
    prep = drawing_inputs()
    drawing = PictureDrawing(prep, command=[str(tmp_path / "no-such-python")])
    try:
        assert drawing.pictures() == expected_pictures(prep)
    finally:
        drawing.close()
    assert "child process failed (it did not start: FileNotFoundError" in caplog.text


def test_closing_stops_a_child_still_drawing_and_removes_its_folder():
    """A build that fails leaves no child process and no temporary folder behind."""
    never_done = [sys.executable, "-c", "import time; time.sleep(3600)"]
    drawing = PictureDrawing(drawing_inputs(), command=never_done)
    folder, child = Path(drawing._folder.name), drawing._child
    assert folder.is_dir() and child.poll() is None
    drawing.close()
    assert child.returncode is not None and child.returncode < 0  # killed, not finished
    assert not folder.exists()


def test_a_drawing_folder_goes_to_the_given_work_folder_and_leaves_with_the_drawing(tmp_path):
    prep = drawing_inputs()
    drawing = PictureDrawing(prep, work_dir=tmp_path)
    folder = Path(drawing._folder.name)
    try:
        assert folder.parent == tmp_path and folder.name.startswith(DRAWING_PREFIX)
        assert drawing.pictures() == expected_pictures(prep)
    finally:
        drawing.close()
    assert not folder.exists()


def test_only_drawing_folders_are_removed_as_dead(tmp_path):
    for name in (f"{DRAWING_PREFIX}dead1", f"{DRAWING_PREFIX}dead2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "inputs.npz").write_bytes(b"x")
    (tmp_path / "shards").mkdir()
    (tmp_path / "identity.json").write_text("{}")
    remove_dead_drawings(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json", "shards"]


# A build stand-in: starts a drawing whose child arms itself, says so through a FIFO and never
# finishes; the stand-in says the child's pid, then waits to be killed.
BUILD_THAT_DRAWS = textwrap.dedent(
    """
    import sys
    from types import SimpleNamespace
    import numpy as np
    from builder.card import PictureDrawing
    prep = SimpleNamespace(samples={"num_tokens": [3]}, token_counts=np.ones(8, dtype=np.int64),
                           selected_token_ids=np.arange(2), cfg=SimpleNamespace(seq_length=8))
    never_done = [sys.executable, "-c", "import sys; sys.path.append(sys.argv[2]); "
                  "from dataset_card.pictures import end_with_parent; end_with_parent(int(sys.argv[3])); "
                  f"open({sys.argv[2]!r}, 'w').write('armed'); import time; time.sleep(3600)"]
    drawing = PictureDrawing(prep, command=never_done, work_dir=sys.argv[1])
    print(drawing._child.pid, flush=True)
    sys.stdin.read()
    """
)


def read_within(path: Path, seconds: float) -> str:
    """What a writer puts into the FIFO `path`, or "" if none comes within `seconds`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd], [], [], seconds)
        return os.read(fd, 64).decode() if ready else ""
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"), reason="a Linux kernel signal")
def test_a_drawing_child_dies_with_its_build_when_the_build_is_killed(tmp_path):
    """SIGKILL runs no cleanup: the child would go on writing into a folder the next build removes."""
    work, armed = tmp_path / "work", tmp_path / "armed"
    work.mkdir()
    os.mkfifo(armed)
    build_process = subprocess.Popen(
        [sys.executable, "-c", BUILD_THAT_DRAWS, str(work), str(armed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    child = int(build_process.stdout.readline())
    watch = os.pidfd_open(child)  # readable once the child has ended
    try:
        assert read_within(armed, 60) == "armed"  # the child is past end_with_parent, its build alive
        build_process.send_signal(signal.SIGKILL)
        build_process.wait()
        ended, _, _ = select.select([watch], [], [], 60)
        assert ended, "the drawing child outlived its killed build"
    finally:
        os.close(watch)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # never left running, whatever the outcome
        build_process.kill()
    assert [p.name.startswith(DRAWING_PREFIX) for p in work.iterdir()] == [True]  # left for the next build to remove
