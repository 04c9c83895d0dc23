"""What to do about damage found in a cache, in words: verify's advice, and load_cache's for a damaged card."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from dataset_card import data_prefix


@dataclass(frozen=True)
class Repair:
    """How to repair what verify finds. A local cache: by the build run again with --resume, which writes
    again what is missing (the card from its build records, a shard deleted first). A Hub repo (`repo`,
    at `revision`, config `name`): by a push again from an intact local copy, which uploads again each
    shard whose bytes differ on the branch, and the card; the build's --resume cannot reach the repo."""

    repo: str | None = None
    revision: str | None = None
    name: str | None = None

    @classmethod
    def of(cls, location: str | Path, revision: str | None, name: str | None) -> Repair:
        from .hub import is_hub_location

        return cls(str(location), revision, name) if not Path(location).exists() and is_hub_location(location) else cls()

    def shards(self, *names: str) -> str:
        if self.repo is not None:
            return f"to repair: {self.push_again()}"
        # Resume keeps a shard whose size and row count match its record: a damaged one of the same
        # size would be kept, so it must be deleted first.
        files = " and ".join(f"data/{name}" for name in names)
        return f"to repair: delete {files} and run the build again with --resume (it rebuilds only the missing shards)"

    def duplicates(self) -> str:
        if self.repo is not None:
            return f"to repair: {self.push_again()}"
        return (
            "to repair: delete the shard that should not hold them (if unsure, each of these) and run the build again with "
            "--resume (it rebuilds only the missing shards), or rebuild"
        )

    def head_file(self, path: str) -> str:
        if self.repo is not None:
            return f"to repair: {self.push_again()}"
        return (
            f"to repair: delete {path} and run the build again with --resume (it writes the head rows again from the target, "
            "computing no shard)"
        )

    def card(self) -> str:
        """What to do about a card whose manifest is damaged (a sentence)."""
        if self.repo is not None:
            return f"Restore the card: {self.push_again()}"
        return "Restore the card (run the build command again with --resume: it writes the card again, computing nothing), or rebuild"

    def damaged_card(self, recognised: bool = True, root: bool = True, index: bool = False) -> str:
        """The end of a refusal of a card cut short, edited or lacking a part. `recognised`: whether a push can still
        tell the card is eagle3-cache's (`manifest.push_recognises`): one it cannot tell from another dataset's it
        never replaces, so an intact card must be put in its place before the push. `root`: the card is the repo's
        root card (a cache's, or with `name` the index of configs), not a config's. `index`: the card still shows the
        key of the index of configs."""
        if self.repo is not None and not recognised:
            unrecognised = (
                ", as in a card cut short or edited by hand, and what is left of it does not show the key that marks it as "
                "eagle3-cache's with only YAML lines above it: a push cannot tell it from another dataset's card, and refuses "
                "to replace it"
            )
            if root and not data_prefix(self.name):  # no config named (or `default`, the root's): which kind is unknown
                return unrecognised + self.restore_root_card()
            return f"{unrecognised}. Restore it in two steps: {self.put_back_card(root)}; then {self.push_again()}"
        if self.repo is not None and index and not self.name:
            return f", as in a card cut short or edited by hand. Restore it: {self.push_a_config_again()}"
        if self.repo is not None:
            return f", as in a card cut short or edited by hand. Restore it: {self.push_again()}"
        if index:  # a build writes no index card: a local one is a copy of a repo's
            return (
                ", as in a card cut short or edited by hand. Restore it: download the index card (README.md at the root) again "
                "from the repo the caches were pushed to; meanwhile a cache of the folder reads from its own sub-folder "
                "(DIR/CONFIG), with no --name"
            )
        return (
            ", as in a card cut short or edited by hand. Restore it: run the build command again with --resume (it writes the "
            "card again from its build records in .eagle3_build, computing nothing), or download the card again from the repo "
            "the cache was pushed to"
        )

    def missing_config_card(self) -> str:
        """What to do about a config the root index lists whose folder has no card (a sentence)."""
        if self.repo is not None:
            return (
                "a push commits a config's card together with its entry in the index, so the card was removed since. "
                f"Restore it: {self.push_again()}"
            )
        return (
            "the card is written last, so an interrupted build of that config has none: resume it (the same build command, "
            "with --resume); or the folder was copied or downloaded in part: copy or download it again from where it came from"
        )

    def push_again(self) -> str:
        where = self.repo + (f" at revision {self.revision}" if self.revision else "")
        config = f" --hub-config {self.name}" if self.name else ""
        tagged = self.revision_kind == "tag"
        return (
            f"push the cache to {where} again from an intact local copy (check it first with eagle3-cache verify DIR): "
            f"eagle3-cache push DIR {self.repo}{config}{self.branch_flag()}{' --hub-tag NEW_TAG' if tagged else ''} uploads again "
            f"each shard whose bytes differ on the branch, and the card; {self.new_tag()}"
        )

    def push_a_config_again(self) -> str:
        """How to restore the damaged index of a repo holding several caches, with no config named: a push of any
        one of them writes the index again from the configs' folders (a push without a config is refused there)."""
        return (
            f"push one of the repo's caches to {self.repo} again from an intact local copy, naming its config: eagle3-cache "
            f"push DIR {self.repo} --hub-config CONFIG{self.branch_flag()} writes the index card again from the configs' "
            f"folders; {self.new_tag()}"
        )

    def restore_root_card(self) -> str:
        """How to restore a root card verified without a config name that a push cannot recognise: nothing left of it
        says whether it was a cache's card or the index of a repo holding several caches in sub-folders, and a push
        of the wrong kind would put a cache at the root beside the configs. The card the branch held before the
        damage is right for either."""
        return (
            "; nor does it tell whether it was a cache's card or the index card of a repo holding several caches in "
            "sub-folders. Restore it as it was, which is right for either: upload the root card of the branch's last commit "
            f"before the damage in its place: {self.earlier_root_card()}; then verify the repo again: eagle3-cache verify "
            f"{self.repo}{self.branch_flag('--revision')} (with --name CONFIG for a cache of a repo holding several) says what "
            "else to repair, if anything"
        )

    def put_back_card(self, root: bool) -> str:
        """How to put an intact card of eagle3-cache's in place of a damaged one, where a push then recognises it: a
        config's, from its intact local copy; the index of configs (the root card, with `name`), which only the Hub
        holds, from the commit before the damage."""
        if root:
            return f"upload the index card of the branch's last commit before the damage in its place: {self.earlier_root_card()}"
        config_card = f"{data_prefix(self.name)}README.md"
        return f"upload the card of the intact local copy in its place: {self.upload_card('DIR/README.md', config_card)}"

    def earlier_root_card(self) -> str:
        """The `hf` commands that put back the root card of the branch's commit COMMIT, and how to find COMMIT."""
        return (
            f"hf download {self.repo} README.md --repo-type dataset --revision COMMIT --local-dir restored, then "
            f"{self.upload_card('restored/README.md', 'README.md')} (HfApi().list_repo_commits({self.repo!r}, "
            f"repo_type='dataset'{self.branch_argument()}) lists the commits, newest first)"
        )

    def upload_card(self, local: str, path: str) -> str:
        return f"hf upload {self.repo} {local} {path} --repo-type dataset{self.branch_flag('--revision')}"

    def new_tag(self) -> str:
        if self.revision_kind == "tag":
            return f"{self.revision} is a tag, which names a fixed version: give the repaired one a new tag (on {self.revision}'s branch)"
        return "a tag names a fixed version, so give the repaired one a new --hub-tag"

    def branch_flag(self, flag: str = "--hub-branch") -> str:
        """The push's --hub-branch (or another command's `flag` for it): none for the default branch (main, which
        verify read without --revision), the branch verified, or a placeholder where the revision is a tag or commit
        (or the Hub could not say which)."""
        if self.revision is None:
            return ""
        return f" {flag} {self.revision}" if self.revision_kind == "branch" else f" [{flag} BRANCH]"

    def branch_argument(self) -> str:
        """The branch as a keyword argument of a huggingface_hub call: as `branch_flag`."""
        if self.revision is None:
            return ""
        return f", revision={self.revision!r}" if self.revision_kind == "branch" else ", revision=BRANCH"

    @functools.cached_property
    def revision_kind(self) -> str | None:
        """Whether the revision verified is a "branch" or a "tag" (None: a commit, or unknown): asked of the Hub
        only once advice needs it."""
        from .hub import revision_kind

        return revision_kind(self.repo, self.revision) if self.repo is not None and self.revision is not None else None


LOCAL = Repair()  # a local cache's
