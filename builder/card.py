"""Write the dataset card (last): its pictures, then the README.md holding the manifest."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import dataset_card
from dataset_card import render_card
from dataset_card.pictures import PICTURES, card_pictures, save_inputs
from dataset_card.render import (
    BOM,
    GENERATED_KEYS,
    UserParts,
    body_below_front_matter,
    marked_user_text,
    markers_missing,
    user_parts,
    users_configs,
    users_keys,
)

from .files import write_bytes_atomic, write_text_atomic
from .manifest import CARD_KEY, assemble_manifest, card_data_of, front_matter_damage, front_matter_keys, keys_not_text
from .manifest import _yaml_problem as yaml_problem
from .prepare import Prepared

log = logging.getLogger(__name__)

# + the folder holding the inputs, the folder dataset_card was imported from here (appended to the
# child's sys.path, so it finds the same package without putting anything ahead of its standard
# library), and this process's pid (the child does not outlive it).
DRAW_PICTURES = [
    sys.executable,
    "-c",
    "import sys; sys.path.append(sys.argv[2]); from dataset_card.pictures import draw_saved_inputs; "
    "draw_saved_inputs(sys.argv[1], parent=int(sys.argv[3]))",
]
DRAWING_PREFIX = "pictures-"  # a drawing's folder in the build's work folder


def picture_inputs(prep: Prepared) -> tuple:
    """What the pictures show; all known once `prepare` is done (shards may be gone after an upload)."""
    return prep.samples["num_tokens"], prep.token_counts, prep.selected_token_ids, prep.cfg.seq_length


class PictureDrawing:
    """The card's pictures, drawn by a child process while the target runs.

    They depend only on what `prepare` holds, and drawing them (matplotlib's import, layout and PNG
    encoding: over a second) would otherwise add to every build's wall time. A process, not a thread:
    drawing holds the GIL, which each torch call of the forward would then wait for. Should the child
    fail, the pictures are drawn in this process, as if there had been no child."""

    def __init__(self, prep: Prepared, command: list[str] | None = None, work_dir: Path | None = None):
        """`work_dir`: where the drawing's folder goes (default: the system's temp folder). A build
        gives its own work folder, so that the folder of a build killed mid-drawing is found and
        removed by the next build there (`remove_dead_drawings`)."""
        self._prep = prep
        self._folder = tempfile.TemporaryDirectory(prefix=DRAWING_PREFIX, dir=work_dir)
        folder = Path(self._folder.name)
        save_inputs(folder, *picture_inputs(prep))
        found_in = str(Path(dataset_card.__file__).resolve().parents[1])
        self._child, self._start_error = None, None
        with open(folder / "stderr.txt", "wb") as stderr:
            try:
                self._child = subprocess.Popen(
                    [*(command or DRAW_PICTURES), str(folder), found_in, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            except OSError as err:  # no process to start here: the pictures are drawn in this one, at the end
                self._start_error = f"{type(err).__name__}: {err}"

    def pictures(self) -> dict[str, bytes]:
        """{path in the cache: PNG bytes}, once the child is done."""
        folder = Path(self._folder.name)
        if self._child is not None:
            status = self._child.wait()
            files = {relative: folder / Path(relative).name for relative, _ in PICTURES.values()}
            if status == 0 and all(path.is_file() for path in files.values()):
                return {relative: path.read_bytes() for relative, path in files.items()}
            why = (folder / "stderr.txt").read_text(errors="replace").strip().splitlines()[-1:] or ["no error output"]
            failure = f"exit status {status}: {why[0]}"
        else:
            failure = f"it did not start: {self._start_error}"
        log.warning("drawing the card's pictures in a child process failed (%s); drawing them here", failure)
        return card_pictures(*picture_inputs(self._prep))

    def close(self) -> None:
        """Stop the child if it still runs (the build failed) and remove its folder."""
        if self._child is not None and self._child.poll() is None:
            self._child.kill()
            self._child.wait()
        self._folder.cleanup()


def remove_dead_drawings(work_dir: Path) -> None:
    """Remove the drawing folders of builds that were killed (SIGKILL runs no cleanup; their child
    died with them). Call with the cache's lock held: then no drawing there belongs to a live build."""
    for folder in Path(work_dir).glob(f"{DRAWING_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)


def existing_pictures(out: Path) -> list[tuple[str, str]]:
    """(path, caption) of the card pictures present in a cache folder."""
    return [(path, caption) for path, caption in PICTURES.values() if (Path(out) / path).exists()]


def write_card(out: Path, prep: Prepared, shards: list[dict], ranks: list[dict] | None = None, drawing=None) -> dict:
    """`drawing`: a PictureDrawing already at work on the pictures; without one they are drawn here."""
    manifest = assemble_manifest(out, prep, shards, ranks)
    pictures = drawing.pictures() if drawing is not None else card_pictures(*picture_inputs(prep))
    for relative, data in pictures.items():
        write_bytes_atomic(out / relative, data)
    # absolute: the card's snippet opens the cache from any working directory
    text = render_card(manifest, location=os.path.abspath(out), pictures=existing_pictures(out), kept=local_user_parts(out))
    write_text_atomic(out / "README.md", text)
    return manifest


def local_user_parts(cache_dir: Path) -> UserParts:
    """What users added to the cache's card (a resumed build writes it again): none where it has
    no card of eagle3-cache's yet. A card whose front matter YAML cannot read keeps its text: the
    manifest is restored from the build state, which is why verify says to resume."""
    card = Path(cache_dir) / "README.md"
    if not card.is_file():
        return UserParts()
    try:
        text = card.read_text(encoding="utf-8").removeprefix(BOM)
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8 text: it is written again from the build state, without what was added to it", card)
        return UserParts()
    problem = front_matter_problem(text)
    if problem is not None:
        return damaged_card_parts(text, str(card), f"cannot be read ({problem})", "written again from the build state")
    if is_cache_card_text(text):
        return user_parts(text, str(card))
    damage = front_matter_damage(text)
    if damage is not None:  # cut short: what reads of it is no front matter at all
        return damaged_card_parts(text, str(card), damage, "written again from the build state")
    if marked_user_text(body_below_front_matter(text)) is not None:  # eagle3-cache's card, its manifest block removed
        return user_parts(text, str(card))
    return readme_parts(text, str(card))


def readme_parts(text: str, where: str) -> UserParts:
    """A README in a cache's folder that is no card of eagle3-cache's (put there once the build wrote shards):
    kept whole, its keys in the card's front matter and its text above the generated text, and a warning says so."""
    from huggingface_hub import DatasetCard

    card = DatasetCard(text)
    log.warning(
        "%s: expected eagle3-cache's card (its front matter holding the manifest, or the generated text's markers), found "
        "neither: it is written again from the build state, keeping its front-matter keys and, above the generated text, "
        "its text",
        where,
    )
    data = card.data.to_dict()
    return UserParts(users_keys(data), card.text.strip("\n") + "\n\n", None, configs=users_configs(data))


def damaged_card_parts(text: str, where: str, damage: str, written: str = "written again", kept_keys=()) -> UserParts:
    """What a card of eagle3-cache's whose front matter cannot be read (`damage`, in words) keeps when it is
    `written` again: the text above and below its generated markers (none where they are gone), and none of
    its own keys, which cannot be read; one warning says what is kept and names the keys lost, with their
    lines, to be added again (those in `kept_keys` aside: the ones the card written takes from elsewhere)."""
    body = body_below_front_matter(text)
    found = marked_user_text(body)
    if found is None:
        kept = f"{markers_missing(body)}, so none of its text is known to be a user's: all of it is written anew"
    else:
        kept = "keeping the text above and below the generated markers"
    lines_of: dict[str, list[str]] = {}
    for line, key in front_matter_keys(text):
        if key not in GENERATED_KEYS and key not in kept_keys:
            lines_of.setdefault(key, []).append(str(line))
    lost = [f"{key} (line{'s' if len(lines) > 1 else ''} {', '.join(lines)})" for key, lines in lines_of.items()]
    if lost:
        lost_words = f"the YAML keys added to it are lost: {', '.join(lost)}; add them again, quoting a value that holds ': '"
    else:
        lost_words = "no YAML key added to it was found in what is left of it"
    log.warning("%s: its YAML front matter %s: it is %s, %s; %s", where, damage, written, kept, lost_words)
    return UserParts({}, *(found or (None, None)))


def front_matter_problem(text: str) -> str | None:
    """What YAML finds wrong with a card's front matter, at its line; None where it reads as a mapping."""
    import yaml
    from huggingface_hub import DatasetCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    try:
        DatasetCard(text)
    except yaml.YAMLError as err:
        return yaml_problem(text, err)
    except ValueError as err:  # YAML, but not a mapping
        return str(err)
    except TypeError:  # a top-level key YAML reads as no text
        return keys_not_text(yaml.safe_load(REGEX_YAML_BLOCK.search(text.removeprefix(BOM)).group(2)))
    return None


def is_cache_card_text(text: str) -> bool:
    """A card of eagle3-cache's (its front matter holds the manifest), not someone else's README."""
    return CARD_KEY in card_data_of(text)
