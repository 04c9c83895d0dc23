"""Write the dataset card (last): its pictures, then the README.md holding the manifest."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import dataset_card
from dataset_card import render_card
from dataset_card.pictures import PICTURES, card_pictures, save_inputs
from dataset_card.render import BOM, GENERATED_KEYS, UserParts, body_below_front_matter, marked_user_text, markers_missing, user_parts

from .files import write_bytes_atomic, write_text_atomic
from .manifest import CARD_KEY, INDEX_KEY, assemble_manifest, card_data_of
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
    return user_parts(text, str(card)) if is_cache_card_text(text) else UserParts()


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

    try:
        DatasetCard(text)
    except yaml.YAMLError as err:
        return yaml_problem(text, err)
    except ValueError as err:  # YAML, but not a mapping
        return str(err)
    return None


def is_cache_card_text(text: str) -> bool:
    """A card of eagle3-cache's (its front matter holds the manifest), not someone else's README."""
    return CARD_KEY in card_data_of(text)


def front_matter_damage(text: str) -> str | None:
    """How a card's YAML front matter (where the manifest lives) is damaged, in words: it begins but is
    never closed (a card cut short), or it does not parse (a hand edit); None where it reads, or the
    card has none."""
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    text = text.removeprefix(BOM)  # as card_data_of reads it
    if not re.match(r"\s*---\s*$", text.split("\n", 1)[0]):
        return None
    block = REGEX_YAML_BLOCK.search(text)
    if block is None:
        return "begins but is never closed (a line holding only ---)"
    try:
        yaml.safe_load(block.group(2))
    except yaml.YAMLError as err:
        return f"does not parse ({yaml_error_in_words(err, first_line=block.group(1).count(chr(10)) + 1)})"
    return None


def yaml_error_in_words(err: Exception, first_line: int) -> str:
    """What YAML found wrong with a card's front matter, at its line in the card (YAML counts from the front
    matter's first line, `first_line` of the card)."""
    what = ": ".join(part for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
    mark = getattr(err, "problem_mark", None)
    if not what or mark is None:
        return " ".join(str(err).split())
    return f"{what}, at line {first_line + mark.line} of the card"


def damaged_card_key(text: str) -> str | None:
    """CARD_KEY (a cache's card) or INDEX_KEY (a repo's index card) for a card of eagle3-cache's whose
    front matter is damaged (`front_matter_damage`), by the key that front matter still holds: such a
    card cannot be another dataset's, so a push may write it again. None for a card whose front matter
    reads, and for a damaged one holding neither key (cut short before it, or someone else's)."""
    if front_matter_damage(text) is None:
        return None
    keys = {key for _, key in yaml_shaped_keys(text)}
    return next((key for key in (INDEX_KEY, CARD_KEY) if key in keys), None)


# A top-level key line of YAML front matter: a plain or quoted key at the line's start, then `:`
TOP_LEVEL_KEY = re.compile(r"""^(?:(?P<plain>[A-Za-z_][\w.-]*)|"(?P<double>[^"\n]*)"|'(?P<single>[^'\n]*)')[ \t]*:(?:[ \t]|$)""")
# Any other line of YAML as eagle3-cache writes it: blank, indented (a nested value), or a list item
OTHER_YAML_LINE = re.compile(r"^(?:[ \t]|-(?:[ \t]|$)|$)")


def front_matter_lines(text: str) -> list[tuple[int, str]]:
    """(line number in the card, line) of a card's front matter, read as lines (it need not parse): those
    after the opening `---` down to the closing one, or to the end of a card cut short before it; none
    where the card has no front matter."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    text = text.removeprefix(BOM)
    if not re.match(r"\s*---\s*$", text.split("\n", 1)[0]):
        return []
    block = REGEX_YAML_BLOCK.search(text)
    first, lines = (block.group(1).count("\n") + 1, block.group(2).split("\n")) if block else (2, text.split("\n")[1:])
    return [(first + i, line.rstrip("\r")) for i, line in enumerate(lines)]


def top_level_key(line: str) -> str | None:
    match = TOP_LEVEL_KEY.match(line)
    return None if match is None else next(key for key in match.group("plain", "double", "single") if key is not None)


def front_matter_keys(text: str) -> list[tuple[int, str]]:
    """(line in the card, key) of every top-level key line of a card's front matter, read as lines."""
    return [(number, key) for number, line in front_matter_lines(text) if (key := top_level_key(line)) is not None]


def yaml_shaped_keys(text: str) -> list[tuple[int, str]]:
    """(line in the card, key) of the top-level keys of a card's front matter, down to its first line not
    shaped as YAML is written in a card (a top-level `key:`, an indented line, a `- ` list item, a blank
    line). A heading, prose, a code fence, a comment or a marker there is a README's own text below a
    `---` rule that merely opens it, so no key shown after it (in a code block, say) is the card's."""
    keys = []
    for number, line in front_matter_lines(text):
        key = top_level_key(line)
        if key is None and not OTHER_YAML_LINE.match(line):
            break
        if key is not None:
            keys.append((number, key))
    return keys
