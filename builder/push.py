"""Push a cache to the Hugging Face Hub: after the build (`push_cache`), or shard by shard
while it runs (`ShardUploader`). The Hub client itself (retries, downloads) is `builder.hub`.

Layout in a dataset repo. A single cache lives at the root, exactly as on local disk
(config `default`). Several caches live in sub-folders, one config each
(`NAME/README.md`, `NAME/data/...`, `NAME/vocab/...`), and the root card is an index
listing them. A repo is one or the other: mixing a root cache with sub-folder configs is
refused, so a root card never has to describe two caches.

Versions. Shards go up first, in commits of a few shards each (a re-run skips every shard
already on the branch with the right sha256, so an interrupted push resumes). The manifest
checksums shards with a fast hash; the sha256 the Hub keys LFS files by is computed by the
client as it uploads a shard and recorded in the shard's build record (`shard_sha256`). The card,
vocab (and a `hidden` cache's head rows) and pictures follow in one final commit that also
deletes the shards, vocab and picture files left over from an earlier version; nothing else in
the cache folder is published (`card_files`). Only after that commit succeeded is the tag
created, pointing at it.
A tag therefore never names a half-uploaded version, and an earlier tag keeps its content.

Other data. Files are removed or replaced only in a folder an eagle3-cache card already describes
(the root card, or the root index listing the config). Anywhere else, what is found there belongs
to another dataset: it is left as it is, and a push that would write over one of its files (or
whose card would read one as a shard) is refused before anything is sent.

Uploads use `create_commit` (never `Dataset.push_to_hub`: it rewrites the split and cannot
append). The push is handed the manifest the build assembled; `eagle3-cache push DIR` reads
it from the cache's card.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from dataset_card import index_entry, index_from_card_data, render_card, render_index_card
from dataset_card.pictures import PICTURES
from dataset_card.render import UserParts, entry_of_a_damaged_card, merge_user_parts, shard_files, user_parts

from .build_state import read_sidecar, sidecar_path
from .card import damaged_card_parts, existing_pictures, local_user_parts
from .files import expand_home, file_hash, write_json_atomic
from .hub import REPO_TYPE, RERUN, Cancelled, HubError, Retry, download_file, http_status, hub_api, hub_endpoint, remote_files, remote_paths
from .lock import hold_for_push
from .manifest import (
    CARD_KEY,
    INDEX_KEY,
    LM_HEAD_FILE,
    VOCAB_FILE,
    ManifestError,
    card_data_of,
    damaged_card_key,
    front_matter_damage,
    read_manifest,
    recorded_checksum,
)
from .push_target import PushTarget, validate_target
from .shards import is_card_read, is_shard_name

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 30.0  # how long a stopping build waits for the Hub request under way

# Every file a push may publish besides the shards and the card (relative to the config's folder)
PUBLISHED_NAMES = (VOCAB_FILE, LM_HEAD_FILE, *(path for path, _ in PICTURES.values()))
SHARDS_PER_COMMIT = 8  # few commits (the Hub rate-limits them) yet small steps to resume from


# ---- pushing ------------------------------------------------------------------------------


@dataclass
class PushResult:
    repo_id: str
    config: str | None
    branch: str
    tag: str | None
    commit: str
    uploaded: list[str] = field(default_factory=list)  # shard names sent by this run
    skipped: list[str] = field(default_factory=list)  # shard names already on the branch
    deleted: list[str] = field(default_factory=list)  # stale files (shards, vocab, pictures) removed from the branch

    def load_snippet(self) -> str:
        from dataset_card.render import load_arguments

        return f"builder.load_cache({load_arguments(self.repo_id, self.config, self.tag or self.branch)}, streaming=True)"


@dataclass(frozen=True)
class HubCard:
    """A card on the branch, as a push reads it: its text (None: there is none), where it is, and its front
    matter. A card of eagle3-cache's whose front matter can no longer be read (cut short, or its YAML broken
    by a hand edit) is `damaged` (how, in words); its `data` then hold only the key it was found by. Of a
    damaged index, `folders` says why each folder that is not listed with a config's whole entry is so."""

    text: str | None
    path: str
    data: dict = field(default_factory=dict)
    damaged: str | None = None
    folders: dict[str, str] = field(default_factory=dict)

    def user_parts(self, local: UserParts | None = None) -> UserParts:
        """What users added to it, kept by the card that replaces it: of a damaged card, its text above and
        below the generated markers (its keys cannot be read: those the `local` card has are kept from it)."""
        if self.text is None:
            return UserParts()
        if self.damaged is None:
            return user_parts(self.text, self.path)
        return damaged_card_parts(self.text, self.path, self.damaged, kept_keys=local.keys if local is not None else {})


def read_hub_card(text: str | None, path: str) -> HubCard:
    """A card's text read as a push reads it: a damaged card of eagle3-cache's is written again; front matter
    that does not parse in any other card is a ManifestError (it may be another dataset's)."""
    if text is None:
        return HubCard(None, path)
    key = damaged_card_key(text)
    if key is not None:
        return HubCard(text, path, {key: {}}, front_matter_damage(text))
    return HubCard(text, path, card_data_of(text, path))


def card_files(cache_dir: Path, manifest: dict) -> list[str]:
    """What the final commit carries besides the card, relative to the cache folder: the vocab, a
    `hidden` cache's head rows, the card's pictures. Nothing else the folder holds (logs, backups,
    exports, build state) is ever published."""
    head_rows = manifest.get("lm_head_file")
    if head_rows and head_rows["path"] != LM_HEAD_FILE:
        raise HubError(
            f"{cache_dir}: the manifest names {head_rows['path']!r} as the file of the head rows; expected {LM_HEAD_FILE!r}, "
            "where builds write it. The card was edited after the build: build the cache again, then push."
        )
    named = [VOCAB_FILE] + ([LM_HEAD_FILE] if head_rows else [])
    for relative in named:
        if not (cache_dir / relative).is_file():
            raise HubError(
                f"{cache_dir / relative}: the manifest names this file, but the cache folder does not hold it. "
                "Run the same build again with --resume to write it, then push."
            )
    return named + [path for path, _ in existing_pictures(cache_dir)]


class HubPusher:
    """The steps of a push, shared by `push_cache` (after a build) and `ShardUploader` (during one)."""

    def __init__(
        self, target: PushTarget, *, retry: Retry | None = None, api=None, cancel: threading.Event | None = None, rerun: str | None = None
    ):
        validate_target(target)
        self.target = target
        self.retry = retry or Retry()
        self.api = api or hub_api(target.token)
        self.cancel = cancel  # once set, every call stops at its next try or retry wait (`Cancelled`)
        self.rerun = rerun or f"{RERUN} (a push resumes where it stopped)"  # what to do once a Hub that kept failing answers again

    def _call(self, what: str, fn, *, conflicts: bool = False, busy: bool = False):
        return self.retry(what, fn, self.target.repo_id, rerun=self.rerun, conflicts=conflicts, busy=busy, cancel=self.cancel)

    def open(self) -> HubPusher:
        """Create the repo (and branch) if needed; refuse a layout clash before uploading anything."""
        t = self.target
        self._check_token_writes()
        private = t.private or None  # None, as huggingface_hub's default: the namespace's default visibility, not public
        self._call("create repo", lambda: self.api.create_repo(t.repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True))
        if t.private and not self._call("repo info", lambda: self.api.dataset_info(t.repo_id)).private:
            log.warning("%s already exists and is public; --private does not change an existing repo's visibility", t.repo_id)
        if t.branch != "main":
            self._call("create branch", lambda: self.api.create_branch(t.repo_id, branch=t.branch, repo_type=REPO_TYPE, exist_ok=True))
        root = self._root(self.head())
        self._check_layout(root.data, root.text is not None)
        return self

    def _check_token_writes(self) -> None:
        """A read-only token is refused before anything is computed or sent (the Hub would accept
        the repo checks and refuse only the first upload). Fine-grained tokens are left to the Hub."""
        who = self._call("read the token's role", lambda: self.api.whoami())
        if who.get("auth", {}).get("accessToken", {}).get("role") == "read":
            raise HubError(
                f"pushing to {self.target.repo_id}: the token is read-only; expected one with write access. Create a "
                "write token (Settings, Access Tokens), set HF_TOKEN to it or run `hf auth login`, then re-run."
            )

    def head(self) -> str:
        t = self.target
        return self._call("read branch head", lambda: self.api.dataset_info(t.repo_id, revision=t.branch).sha)

    def tag_commit(self) -> str | None:
        t = self.target
        if t.tag is None:
            return None
        refs = self._call("list refs", lambda: self.api.list_repo_refs(t.repo_id, repo_type=REPO_TYPE))
        return next((r.target_commit for r in refs.tags if r.name == t.tag), None)

    def tagged_fingerprint(self) -> str | None:
        """Fingerprint of the cache the tag already names (None: no such tag)."""
        commit = self.tag_commit()
        if commit is None:
            return None
        try:
            card = self._call(
                "read tagged card", lambda: download_file(self.target.repo_id, f"{self.target.prefix}README.md", commit, self.target.token)
            )
        except FileNotFoundError:
            return ""
        return card_data_of(card.read_text(encoding="utf-8")).get(CARD_KEY, {}).get("fingerprint", "")

    def check_tag(self, fingerprint: str | None) -> bool:
        """True when the tag already names this very cache (nothing left to do); raise when it names another."""
        found = self.tagged_fingerprint()
        if found is None:
            return False
        if fingerprint is not None and found == fingerprint:
            return True
        raise HubError(
            f"--hub-tag {self.target.tag}: the tag already exists on {self.target.repo_id} and names "
            f"{'cache ' + found if found else 'something else'}, not this cache ({fingerprint}). Tags name immutable versions: "
            "choose a new tag (the existing one stays as it is)."
        )

    def remote_shards(self, revision: str | None = None) -> dict[str, str]:
        """{shard file name: sha256} committed for this config on the branch (or at `revision`)."""
        data = f"{self.target.prefix}data/"
        revision = revision or self.target.branch
        files = self._call("list files", lambda: remote_files(self.api, self.target.repo_id, revision, data))
        return {path[len(data) :]: sha for path, sha in files.items() if path.startswith(data) and "/" not in path[len(data) :]}

    def upload_shards(self, shards: list[tuple[Path, str | None]]) -> dict[str, str]:
        """One commit adding these shard files; returns {name: sha256} as the client computed it
        while uploading (it hashes each file itself), recorded beside each shard's build record."""
        from huggingface_hub import CommitOperationAdd

        attempt: list = []

        def operations():  # fresh objects per attempt: the client mutates them
            attempt[:] = [
                CommitOperationAdd(path_in_repo=f"{self.target.prefix}data/{Path(path).name}", path_or_fileobj=str(path))
                for path, _ in shards
            ]
            return attempt

        names = [Path(p).name for p, _ in shards]
        message = f"eagle3-cache: add {names[0]}" + (f" .. {names[-1]} ({len(names)} shards)" if len(names) > 1 else "")
        self._call(  # no parent commit: it goes on top of whatever the other ranks committed, retried when they race it
            f"upload {', '.join(names)}",
            lambda: self.api.create_commit(
                self.target.repo_id, operations(), commit_message=message, repo_type=REPO_TYPE, revision=self.target.branch
            ),
            conflicts=True,
        )
        shas = {Path(path).name: op.upload_info.sha256.hex() for (path, _), op in zip(shards, attempt)}
        for path, _ in shards:
            record_sha256(Path(path), shas[Path(path).name])
        return shas

    def finish(self, cache_dir: Path, manifest: dict, known: dict[str, str] | None = None) -> PushResult:
        """Final commit (card, vocab, pictures; stale files of an earlier version deleted), then the tag.
        `known`: {shard name: sha256} already computed (by the uploads of this run)."""
        t = self.target
        known = known or {}
        expected = {s["name"]: known.get(s["name"]) or shard_sha256(cache_dir, s["name"]) for s in manifest["shards"]}
        commit, deleted = self._commit_card(cache_dir, with_shard_sha256(manifest, expected), expected)
        if t.tag is not None:
            self._call("create tag", lambda: self._create_tag(commit))
        return PushResult(t.repo_id, t.config, t.branch, t.tag, commit, deleted=deleted)

    def _commit_card(self, cache_dir: Path, manifest: dict, expected: dict, attempts: int = 3) -> tuple[str, list[str]]:
        """The final commit, on top of the branch head its shards were checked at: if the branch moved
        meanwhile (another config's push, or our own commit whose answer was lost), everything is
        checked again at the new head and committed again (a no-op if nothing changed)."""
        t = self.target
        message = f"eagle3-cache: {t.config or 'cache'} {manifest['fingerprint']}" + (f" (tag {t.tag})" if t.tag else "")
        removed: set[str] = set()  # reported even when the commit that removed them lost its answer
        for _ in range(attempts):
            head = self.head()
            root = self._root(head)
            self._check_layout(root.data, root.text is not None)
            remote = self.remote_shards(head)
            self._check_shards_present(expected, remote)  # at every attempt: a moved branch may hold others' shards
            if self.owns_folder(root.data):
                stale = [f"{t.prefix}data/{name}" for name in sorted(remote) if name not in expected and is_shard_name(name)]
                stale += self._stale_card_files(head, card_files(cache_dir, manifest))
                hub_card = root if t.config is None else self._config_card(head)
            else:  # another dataset's files: none removed, none written over
                self._check_nothing_foreign(head, remote, list(expected), expected.get)
                stale, hub_card = [], None
            removed.update(stale)
            cards = {f"{t.prefix}README.md": self.card_text(cache_dir, manifest, hub_card)}
            if t.config is not None:  # the root card indexes every config
                cards["README.md"] = self.index_card_text(manifest, root)
            commit = self._commit_on(head, cache_dir, manifest, stale, cards, message)
            if commit is not None:
                return commit, sorted(removed)
            log.warning("%s moved while committing the card; checking it again on top of the new head", t.branch)
        raise HubError(
            f"committing the card to {t.repo_id}@{t.branch}: the branch moved {attempts} times while pushing (someone else "
            "is committing to it); re-run the push once they are done, and it goes on top of their commits."
        )

    def owns_folder(self, root_data: dict) -> bool:
        """Whether an eagle3-cache card already describes the target's folder: the root card is a
        cache's, or the root index lists the config. Only there may a push remove or replace files."""
        t = self.target
        return CARD_KEY in root_data if t.config is None else t.config in index_from_card_data(root_data)

    def check_folder_is_free(self, own_shards: list[str], sha256_of: Callable[[str], str | None]) -> None:
        """Before the first upload: in a folder no eagle3-cache card describes yet, refuse to write
        over another dataset's files. `own_shards`: this cache's shard names; `sha256_of(name)`: the
        shard's sha256 where this cache has it (asked only for names already on the branch)."""
        head = self.head()
        if not self.owns_folder(self._root(head).data):
            self._check_nothing_foreign(head, self.remote_shards(head), own_shards, sha256_of)

    def _check_nothing_foreign(
        self, head: str, remote: dict[str, str], own_shards: list[str], sha256_of: Callable[[str], str | None]
    ) -> None:
        """Refuse when the folder at `head` holds a file of a name this push writes (a shard of this
        cache's name but other bytes, the card, a vocab or picture file) or one its card would read as
        a shard. A shard of this cache's name and sha256 is its own, left by an interrupted push."""
        t = self.target
        pattern, own_shards = shard_files(len(own_shards)), set(own_shards)

        def foreign(name: str, sha: str) -> bool:
            return sha256_of(name) != sha if name in own_shards else is_card_read(name, pattern)

        found = [f"{t.prefix}data/{name}" for name, sha in sorted(remote.items()) if foreign(name, sha)]
        named = [f"{t.prefix}{relative}" for relative in ("README.md", *PUBLISHED_NAMES)]
        found += sorted(self._call("look up files", lambda: remote_paths(self.api, t.repo_id, head, named)))
        if found:
            folder = f"folder {t.prefix}" if t.prefix else "its root"
            raise HubError(
                f"{t.repo_id}@{t.branch}: no eagle3-cache card describes {folder}, so its files are taken as another dataset's; "
                f"expected none there of the names this cache would write or read as its shards, found {len(found)} "
                f"({', '.join(found[:3])}{' ...' if len(found) > 3 else ''}). None of them was changed. "
                f"{interrupted_run_hint(found, t.prefix)}Push to a new repo or another --hub-config NAME, or delete those files "
                "from the branch first if the cache may take their place."
            )

    def _stale_card_files(self, head: str, published: list[str]) -> list[str]:
        """Vocab and picture files an earlier version of this cache published that this version does
        not (a `hidden` cache's head rows, a picture no longer drawn): deleted with the stale shards,
        so the branch holds one version's files. Only files of the names a push writes, and only in
        a folder the push owns (`owns_folder`): a repo's other data is never touched."""
        t = self.target
        unused = {f"{t.prefix}{relative}" for relative in PUBLISHED_NAMES} - {f"{t.prefix}{relative}" for relative in published}
        if not unused:
            return []
        found: list[str] = []
        for folder in sorted({PurePosixPath(relative).parts[0] for relative in PUBLISHED_NAMES}):
            where = f"{t.prefix}{folder}/"
            found += self._call("list files", lambda where=where: remote_files(self.api, t.repo_id, head, where))
        return sorted(unused.intersection(found))

    def _check_shards_present(self, expected: dict[str, str], remote: dict[str, str]) -> None:
        t = self.target
        missing = sorted(name for name, sha in expected.items() if remote.get(name) != sha)
        if missing:
            raise HubError(
                f"{t.repo_id}@{t.branch}: {len(missing)} shard(s) of this cache are not on the branch, or were replaced there "
                f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); upload them first (re-run the push with the "
                "shards present locally), and push one cache to a branch and config at a time."
            )

    def _commit_on(self, head: str, cache_dir: Path, manifest: dict, stale: list[str], cards: dict[str, str], message: str) -> str | None:
        """The card's commit on top of `head`, the commit its shards were checked at; None when the
        branch moved away from `head` first, and nothing was committed. `cards`: {path: text} of the
        card (and the root index card)."""
        t = self.target

        def commit():
            operations = self._card_operations(cache_dir, manifest, stale, cards)  # fresh per attempt: the client mutates them
            return self.api.create_commit(
                t.repo_id, operations, commit_message=message, repo_type=REPO_TYPE, revision=t.branch, parent_commit=head
            ).oid

        try:
            oid = self._call("commit card", commit, busy=True)  # a 409: another commit under way; a 412: the branch moved
        except HubError as err:
            if http_status(err.__cause__) == 412:  # refused: the branch is no longer at `head`
                return None
            raise
        return oid if self._made_on(oid, head, message) else None

    def _made_on(self, oid: str, head: str, message: str) -> bool:
        """Whether the commit a card commit answered with is `head` itself or our new commit on top of it.
        When no file changed the client sends nothing and answers with the branch's head as it is now,
        whatever `parent_commit` said: possibly a commit someone else made on `head` after our checks,
        told from ours by its title."""
        if oid == head:
            return True
        t = self.target
        history = self._call("list commits", lambda: self.api.list_repo_commits(t.repo_id, repo_type=REPO_TYPE, revision=oid))
        return len(history) > 1 and history[0].title == message and history[1].commit_id == head

    def _card_operations(self, cache_dir: Path, manifest: dict, stale: list[str], cards: dict[str, str]) -> list:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        t = self.target
        ops = [CommitOperationDelete(path_in_repo=path) for path in stale]
        ops += [CommitOperationAdd(f"{t.prefix}{relative}", str(cache_dir / relative)) for relative in card_files(cache_dir, manifest)]
        ops += [CommitOperationAdd(path, text.encode()) for path, text in cards.items()]
        return ops

    def card_text(self, cache_dir: Path, manifest: dict, hub_card: HubCard | None = None) -> str:
        """The pushed card. What users added to it is kept: the local card's additions, and those of
        `hub_card` (the card this push replaces) that the local card does not have."""
        t = self.target
        base = f"{hub_endpoint()}/datasets/{t.repo_id}/resolve/{quote(t.revision, safe='')}/{t.prefix}"
        local = local_user_parts(cache_dir)
        kept = merge_user_parts(local, hub_card.user_parts(local) if hub_card is not None else UserParts())
        return render_card(
            manifest, t.repo_id, config=t.config, revision=t.revision, pictures=existing_pictures(cache_dir), picture_base=base, kept=kept
        )

    def index_card_text(self, manifest: dict, root: HubCard) -> str:
        """The root index card with this config's entry, keeping the other configs' entries and what users added to it."""
        t = self.target
        index = index_from_card_data(root.data)
        if root.damaged is not None:
            log.warning("%s: the index card is damaged, so %s", root.path, configs_found_in_words(index, root.folders, t.config))
        index[t.config] = index_entry(manifest, t.config, t.revision)
        kept = root.user_parts() if INDEX_KEY in root.data else UserParts()
        return render_index_card(t.repo_id, index, kept=kept)

    def _create_tag(self, commit: str) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        t = self.target
        try:
            self.api.create_tag(t.repo_id, tag=t.tag, revision=commit, repo_type=REPO_TYPE)
        except HfHubHTTPError as err:
            if http_status(err) != 409:
                raise
            found = self.tag_commit()
            if found == commit:
                return  # our own earlier attempt got through; its answer was lost
            if found is None:
                raise
            raise HubError(
                f"--hub-tag {t.tag}: the tag was created on {t.repo_id} by someone else while this push ran; expected it free, "
                f"to name this push's commit {commit[:12]}, found it naming commit {found[:12]}, and it is left as it is. "
                f"{t.repo_id}@{t.branch} holds this cache at {commit[:12]}: push the same cache with a new --hub-tag to name it "
                "(its shards are not uploaded again)."
            ) from err

    def _root(self, commit: str) -> HubCard:
        """The root card at `commit`. Of a damaged index card, the configs it listed are found again in their folders."""
        root = read_hub_card(self._card_at(commit, "README.md", "read root card"), self._where("README.md"))
        if root.damaged is not None and INDEX_KEY in root.data:
            index, folders = self._configs_found(commit)
            return replace(root, data={INDEX_KEY: index}, folders=folders)
        return root

    def _config_card(self, commit: str) -> HubCard:
        """The config's own card at `commit`."""
        path = f"{self.target.prefix}README.md"
        return read_hub_card(self._card_at(commit, path), self._where(path))

    def _where(self, path: str) -> str:
        return f"{self.target.repo_id}@{self.target.branch}: {path}"

    def _configs_found(self, commit: str) -> tuple[dict, dict[str, str]]:
        """The index a damaged root index card held, found again: each top-level folder whose card is a cache's.
        Their entries name no revision (only the damaged card knew them), so their usage snippets read the
        branch until each is pushed again. Also {folder: why} for each folder not listed with a whole entry."""
        t = self.target
        top = self._call("list folders", lambda: list(self.api.list_repo_tree(t.repo_id, revision=commit, repo_type=REPO_TYPE)))
        index, folders = {}, {}
        for folder in sorted(entry.path for entry in top if not hasattr(entry, "blob_id")):
            entry, why = config_entry_found(folder, self._card_at(commit, f"{folder}/README.md"))
            if entry is not None:
                index[folder] = entry
            if why is not None:
                folders[folder] = why
        return index, folders

    def _card_at(self, commit: str, path: str, what: str = "read card") -> str | None:
        """The text of a card at `commit`; None where there is none."""
        try:
            local = self._call(what, lambda: download_file(self.target.repo_id, path, commit, self.target.token))
        except FileNotFoundError:
            return None
        return local.read_text(encoding="utf-8")

    def _check_layout(self, root: dict, root_exists: bool) -> None:
        t = self.target
        if root_exists and CARD_KEY not in root and INDEX_KEY not in root:
            raise HubError(
                f"{t.repo_id}@{t.branch} has a dataset card that is not an eagle3-cache card: a push would replace it. "
                "Push to a new repo, or remove that README.md from the branch first if the cache may take its place."
            )
        if t.config is not None and CARD_KEY in root:
            raise HubError(
                f"{t.repo_id} holds a cache at its root, so it cannot also take config {t.config!r} in a sub-folder. "
                "Push to another repo, or push this cache without --hub-config to replace the root cache."
            )
        if t.config is None and root.get(INDEX_KEY) and CARD_KEY not in root:
            names = sorted(root[INDEX_KEY])
            raise HubError(f"{t.repo_id} holds several caches in sub-folders ({names}); pass --hub-config NAME to add or update one.")


def config_entry_found(folder: str, text: str | None) -> tuple[dict | None, str | None]:
    """The index entry of the config in `folder`, by its card's text (None: it has none), and why it is not a
    whole one. A cache's card that is damaged keeps the folder listed, as the config's: left out, the folder
    would be taken for another dataset's, and a push of that config, the way to restore its card, refused."""
    if text is None:
        return None, "it has no README.md"
    if damaged_card_key(text) == CARD_KEY:
        return entry_of_a_damaged_card(folder), f"its card's YAML front matter {front_matter_damage(text)}"
    try:
        manifest = card_data_of(text)[CARD_KEY]
    except (ManifestError, KeyError):
        return None, "its README.md is not an eagle3-cache card"
    try:
        return index_entry(manifest, folder), None
    except (KeyError, TypeError):
        return entry_of_a_damaged_card(folder), "its card's manifest lacks parts, as a card cut short"


def configs_found_in_words(index: dict, folders: dict[str, str], pushed: str) -> str:
    """What a damaged index card's replacement lists, for the warning that it was written again."""
    others = sorted(set(index) - {pushed})
    words = f"it lists the configs found in the repo's folders ({', '.join(sorted({*index, pushed}))})"
    if others:
        words += f", those of other pushes without the revision they were pushed with ({', '.join(others)}): push one again to name its own"
    damaged = [f"{folder} ({why})" for folder, why in folders.items() if folder in index and folder != pushed]
    if damaged:
        words += f"; listed although its card is damaged, so that pushing that config again restores it: {'; '.join(damaged)}"
    left_out = [f"{folder} ({why})" for folder, why in folders.items() if folder not in index]
    if left_out:
        words += f"; not listed: {'; '.join(left_out)}"
    return words


def refuse_no_local_directory(cache_dir: Path) -> None:
    """A push reads a cache on this machine: a missing path of the form `a/b` is a mistyped one, not
    a repo id to read from the Hub."""
    if not cache_dir.is_dir():
        found = "is not a directory" if cache_dir.exists() else "does not exist"
        raise HubError(
            f"push: {cache_dir} {found}; expected a local cache directory (the --output-dir of a finished "
            "`eagle3-cache build`): check the path"
        )


def push_cache(
    cache_dir: str | Path,
    target: PushTarget,
    *,
    shards_per_commit: int = SHARDS_PER_COMMIT,
    retry: Retry | None = None,
) -> PushResult:
    """Push a finished cache directory (`eagle3-cache push`); re-running resumes an interrupted push.
    It holds the cache's lock meanwhile: refused while a build writes the cache, it keeps builds off it."""
    cache_dir = expand_home(Path(cache_dir))
    validate_target(target)
    refuse_no_local_directory(cache_dir)
    lock = hold_for_push(cache_dir)
    try:
        return push_held_cache(cache_dir, target, shards_per_commit, retry)
    finally:
        if lock is not None:
            lock.release()


def push_held_cache(cache_dir: Path, target: PushTarget, shards_per_commit: int, retry: Retry | None) -> PushResult:
    manifest = read_manifest(cache_dir)
    pusher = HubPusher(target, retry=retry).open()
    if pusher.check_tag(manifest["fingerprint"]):
        log.info("%s@%s already holds cache %s; nothing to push", target.repo_id, target.tag, manifest["fingerprint"])
        return PushResult(
            target.repo_id, target.config, target.branch, target.tag, pusher.tag_commit(), skipped=[s["name"] for s in manifest["shards"]]
        )
    card_files(cache_dir, manifest)  # every file the final commit needs is here, before the first upload
    remote = pusher.remote_shards()
    pending, skipped, known, own = [], [], {}, {}
    for shard in manifest["shards"]:
        path = cache_dir / "data" / shard["name"]
        sha = shard_sha256(cache_dir, shard["name"], required=False)
        own[shard["name"]] = sha
        if sha is not None and remote.get(shard["name"]) == sha:
            skipped.append(shard["name"])
            known[shard["name"]] = sha
            continue
        if not path.exists():
            raise HubError(f"{path}: the shard is neither in {cache_dir} nor on {target.repo_id}@{target.branch}; rebuild it (--resume)")
        check_unchanged(path, manifest, shard)  # every shard, before the first upload
        pending.append((path, sha))
    pusher.check_folder_is_free(list(own), own.get)
    for start in range(0, len(pending), shards_per_commit):
        group = pending[start : start + shards_per_commit]
        known |= pusher.upload_shards(group)
        log.info("uploaded %d/%d shards", start + len(group), len(pending))
    result = pusher.finish(cache_dir, manifest, known)
    result.uploaded, result.skipped = [p.name for p, _ in pending], skipped
    return result


def with_shard_sha256(manifest: dict, sha256: dict[str, str]) -> dict:
    """The manifest the pushed card holds: each shard's sha256 (its LFS oid) beside its checksum,
    so a reader of the branch can tell the card's shards from those of a push still under way."""
    return manifest | {"shards": [shard | {"sha256": sha256[shard["name"]]} for shard in manifest["shards"]]}


def check_unchanged(path: Path, manifest: dict, shard: dict) -> None:
    """A shard is published only while it holds the bytes its manifest record describes: a file
    damaged or replaced after the build would otherwise be served, and tagged, as this cache."""
    algorithm, expected = recorded_checksum(manifest, shard)
    size = path.stat().st_size
    if size != shard["bytes"]:
        want, found = f"{shard['bytes']} bytes", f"{size} bytes"
    else:
        want, found = f"{algorithm} {expected}", f"{algorithm} {file_hash(path, algorithm)}"
    if found != want:
        raise HubError(
            f"{path}: the manifest records {want}, the file has {found}: it changed after the build, and pushing it "
            "would publish wrong values. Nothing was uploaded. Delete the file and run the same build again with "
            "--resume to recompute it, then push."
        )


def shard_sha256(cache_dir: Path, name: str, required: bool = True) -> str | None:
    """A shard's sha256 (the Hub's LFS oid): recorded by an earlier upload in the shard's build
    record, else hashed from the local file (and recorded). None (or, `required`, an error)
    when neither exists."""
    sidecar = read_sidecar(Path(cache_dir), name)
    if sidecar is not None and sidecar.get("sha256"):
        return sidecar["sha256"]
    path = Path(cache_dir) / "data" / name
    if not path.exists():
        if required:
            raise HubError(f"{path}: the shard is gone locally and no upload recorded its sha256; rebuild it (--resume)")
        return None
    sha = file_hash(path, "sha256")  # the Hub's LFS object id
    record_sha256(path, sha)
    return sha


def record_sha256(shard_path: Path, sha: str) -> None:
    """Keep a shard's sha256 in its build record (when it has one), so that a resumed build or push
    can tell the Hub's copy is this shard after the local file is gone, without hashing it again."""
    cache_dir = shard_path.parent.parent
    sidecar = read_sidecar(cache_dir, shard_path.name)
    if sidecar is not None and sidecar.get("sha256") != sha:
        try:
            write_json_atomic(sidecar_path(cache_dir, shard_path.name), sidecar | {"sha256": sha})
        except OSError as err:  # a cache another user built (a group-shared folder): a saving missed, nothing lost
            if not isinstance(err, PermissionError) and err.errno != errno.EROFS:
                raise
            log.info("not keeping the sha256 of %s in its build record (%s); a later push hashes it again", shard_path.name, err)


class ShardUploader:
    """Upload while building: each finished shard is committed from a background thread as
    soon as `upload` hands it over, and removed locally afterwards with `delete_local`.

        uploader = ShardUploader(PushTarget(repo, tag="v1"), delete_local=True, fingerprint=fp)  # every rank
        done = uploader.remote_shards()     # {name: sha256} already on the branch: skip them on resume
        ...                                 # for each shard this rank publishes:
        uploader.upload(path, sha256)       # returns at once (sha256: recorded by an earlier upload, or None)
        uploader.wait()                     # every rank, before the final barrier
        ...                                 # rank 0, after the barrier and the card:
        result = uploader.finish(cache_dir, manifest)  # final commit (card, vocab, pictures), then the tag
        uploader.close(cancel=True)         # instead, when the build is interrupted or fails

    Local disk then holds at most `max_pending` queued shards plus the one uploading plus the
    one being written. A failed upload is raised by the next `upload` or by `finish`.
    """

    def __init__(
        self,
        target: PushTarget,
        *,
        delete_local: bool = False,
        max_pending: int = 1,
        fingerprint: str | None = None,
        retry: Retry | None = None,
        upload_retry: Retry | None = None,
        own_shards: list[str] | None = None,
        own_sha256: Callable[[str], str | None] = lambda name: None,
    ):
        self._cancel = threading.Event()
        self.pusher = HubPusher(target, retry=retry, cancel=self._cancel, rerun=build_rerun(target)).open()
        self.already_pushed = self.pusher.check_tag(fingerprint)
        if own_shards is not None and not self.already_pushed:  # see `check_folder_is_free`
            self.pusher.check_folder_is_free(own_shards, own_sha256)
        self.delete_local = delete_local
        self._remote = self.pusher.remote_shards()
        if upload_retry is not None:  # from here on: the uploads, the card and the tag
            self.pusher.retry = upload_retry
        self._sha256: dict[str, str] = {}  # shards of this run known to be on the branch
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.uploaded: list[str] = []
        self._thread = threading.Thread(target=self._run, name="eagle3-shard-uploader", daemon=True)
        self._thread.start()

    def tagged_result(self) -> PushResult:
        """What the tag already holds, when it names this very build (`already_pushed`)."""
        t = self.pusher.target
        return PushResult(t.repo_id, t.config, t.branch, t.tag, self.pusher.tag_commit())

    def remote_shards(self) -> dict[str, str]:
        with self._lock:
            return dict(self._remote)

    def upload(self, path: str | Path, sha256: str | None = None) -> None:
        """Hand over a published shard; `sha256` (recorded by an earlier upload, if any) lets a
        shard already on the branch be skipped."""
        self._raise_if_failed()
        if self._cancel.is_set():  # the build is stopping: the shard stays here, and a resume sends it
            return
        if not self._thread.is_alive():
            raise RuntimeError("ShardUploader.upload after wait()/finish()/close(): hand over every shard first")
        self._queue.put((Path(path), sha256))

    def wait(self) -> None:
        """Block until every handed-over shard is committed (each rank, before the build's final
        barrier); raise if one failed. No `upload` after this."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def finish(self, cache_dir: str | Path, manifest: dict) -> PushResult:
        """Rank 0, after every rank's `wait` and after the card is written: final commit, then the
        tag. `manifest`: the one the build assembled (and wrote into the card)."""
        self.wait()
        self.pusher.rerun = build_rerun(self.pusher.target, Path(cache_dir))  # the card is written: a push can finish it too
        result = self.pusher.finish(Path(cache_dir), manifest, dict(self._sha256))
        result.uploaded = list(self.uploaded)
        return result

    def cancel(self) -> None:
        """Stop uploading, without waiting (the build was interrupted or failed): the upload under way
        is abandoned at its next try or retry wait, queued and later shards are not sent. Nothing is
        deleted locally for an upload that did not complete: a resume sends those shards."""
        self._cancel.set()

    def close(self, cancel: bool = False) -> None:
        """Stop without finishing or raising. With `cancel` (an interrupted or failed build: see
        `cancel`), within the Hub request under way, if any, or `CANCEL_GRACE_S`, whichever ends
        first: the Hub client sets no read timeout, so a request whose connection stalled would never
        return, and the build's own error would never be raised. Without (nothing failed), after the
        queued uploads, each with its full retries."""
        if not cancel:
            if self._thread.is_alive():
                self._queue.put(None)
                self._thread.join()
            return
        self.cancel()
        with contextlib.suppress(queue.Full):  # a full queue: the cancelled thread drains it, and stops on the flag
            self._queue.put_nowait(None)
        self._thread.join(CANCEL_GRACE_S)
        if self._thread.is_alive():  # a daemon thread: it deletes a shard only once its commit landed, so leaving it loses nothing
            log.warning(
                "an upload to %s did not end within %.0f s of the build stopping; leaving it (a --resume sends that shard)",
                self.pusher.target.repo_id,
                CANCEL_GRACE_S,
            )

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise HubError(f"uploading shards to {self.pusher.target.repo_id} failed: {self._error}") from self._error

    def _next_batch(self) -> tuple[list, bool]:
        """The next shard and whatever else is already queued (up to SHARDS_PER_COMMIT): one commit
        for them all, since the Hub rate-limits commits per repo. Returns (items, stop)."""
        first = self._queue.get()
        if first is None:
            return [], True
        items = [first]
        # At most what the queue can hold: a shard handed over while this batch forms would otherwise
        # join it, and the disk bound (max_pending queued + one uploading + one written) would not hold.
        while len(items) < min(SHARDS_PER_COMMIT, self._queue.maxsize):
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return items, True
            items.append(item)
        return items, False

    def _run(self) -> None:
        stop = False
        while not stop:
            items, stop = self._next_batch()
            if self._error is not None or self._cancel.is_set() or not items:
                continue  # drain: the build learns of a failure at its next upload/finish; a cancel sends nothing more
            try:
                missing = [(path, sha) for path, sha in items if sha is None or self.remote_shards().get(path.name) != sha]
                shas = {path.name: sha for path, sha in items if sha is not None}
                if missing:
                    shas |= self.pusher.upload_shards(missing)
                    self.uploaded.extend(path.name for path, _ in missing)
                with self._lock:
                    self._remote.update(shas)
                    self._sha256.update(shas)
                if self.delete_local:
                    for path, _ in items:
                        path.unlink(missing_ok=True)
            except Cancelled:
                pass  # the shards stay here, as they are: a resume sends them
            except BaseException as err:  # noqa: BLE001 - handed to the build thread
                self._error = err


def build_rerun(target: PushTarget, cache_dir: Path | None = None) -> str:
    """What to do once the Hub answers again, after it kept failing an upload of a build: the same
    command is refused (the directory holds a build), `--resume` continues it; once the card is
    written (`cache_dir`), pushing the finished cache completes it too."""
    if cache_dir is None:
        return (
            "once it answers again, run the same build with --resume: the shards it finished are kept (here, or on the "
            "Hub) and only the others are computed"
        )
    return (
        "once it answers again, run the same build with --resume (every shard is finished: none is computed again), "
        f"or push the finished cache: `{push_command(cache_dir, target)}`"
    )


def push_command(cache_dir: Path, target: PushTarget) -> str:
    """The `eagle3-cache push` command line that sends this cache to this target."""
    words = ["eagle3-cache", "push", str(cache_dir), target.repo_id]
    if target.config is not None:
        words += ["--hub-config", target.config]
    if target.branch != "main":
        words += ["--hub-branch", target.branch]
    if target.tag is not None:
        words += ["--hub-tag", target.tag]
    return shlex.join(words)


def interrupted_run_hint(found: list[str], prefix: str) -> str:
    """Shard files without a card are what an interrupted push or upload-while-building leaves: its own
    run, continued where it was, knows them by their sha256, where a new one cannot."""
    if not all(name.startswith(f"{prefix}data/") and name.endswith(".parquet") for name in found):
        return ""
    return (
        "Shard files and no card are what an interrupted push or upload-while-building leaves: if they are this "
        "cache's, continue that run (`build --resume` with its --output-dir, or `eagle3-cache push` of the same cache "
        "directory), which knows its own shards by their sha256. Otherwise: "
    )
