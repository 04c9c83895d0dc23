"""Where a cache goes on the Hub (repo, config, branch, tag) and the checks of it that need no
network: config validation runs them before anything loads, the push again before it starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dataset_card import data_prefix

from .hub import NAME_PATTERN, HubError

RESERVED_CONFIG_NAMES = frozenset({"default", "data", "vocab", "images"})


@dataclass(frozen=True)
class PushTarget:
    """Where a cache goes: repo, config (None: the repo root), branch, tag, visibility."""

    repo_id: str
    config: str | None = None
    branch: str = "main"
    tag: str | None = None
    private: bool = False
    token: str | None = field(default=None, repr=False)  # None: HF_TOKEN or the saved login; never in logs or tracebacks

    @property
    def prefix(self) -> str:
        return data_prefix(self.config)

    @property
    def revision(self) -> str:
        """What the card's usage snippet names: the tag when there is one (immutable), else the branch."""
        return self.tag or self.branch


def is_ref_name(ref: str) -> bool:
    """A branch or tag name git accepts (`git check-ref-format`), within the plain characters the
    Hub takes: each '/'-separated part non-empty, not starting with '.' nor ending in '.lock'."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", ref) is None or ".." in ref or ref.endswith("."):
        return False
    return all(part and not part.startswith(".") and not part.endswith(".lock") for part in ref.split("/"))


def hub_accepts(repo_id: str) -> bool:
    """huggingface_hub's own check, which refuses names the pattern above lets through ('a--b', 'a-'):
    without it they would pass here and stop the push at its first request, after the build."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def validate_target(target: PushTarget) -> None:
    """Checks that need no network, run before any data or weights load."""
    if re.fullmatch(rf"{NAME_PATTERN}/{NAME_PATTERN}", target.repo_id) is None or not hub_accepts(target.repo_id):
        raise HubError(
            f"repo id: expected 'user/name' (letters, digits, '.', '_', '-'; no part ending in '-' or '.', no '--' or '..', "
            f"no '.git' at the end), got {target.repo_id!r}"
        )
    if target.config is not None and (re.fullmatch(NAME_PATTERN, target.config) is None or target.config in RESERVED_CONFIG_NAMES):
        raise HubError(
            f"--hub-config: expected a folder name (letters, digits, '.', '_', '-') other than {sorted(RESERVED_CONFIG_NAMES)}, "
            f"got {target.config!r}. Leave it out to put the cache at the repo root."
        )
    for flag, ref in (("--hub-branch", target.branch), ("--hub-tag", target.tag)):
        if ref is not None and not is_ref_name(ref):
            raise HubError(
                f"{flag}: expected a git ref name like 'v1' or 'release/2026-01' (letters, digits, '.', '_', '-', '/'; no '..' "
                f"or '//', no part starting with '.' or ending in '.lock', no '.' or '/' at the end), got {ref!r}"
            )
    if target.token is None:
        from huggingface_hub import get_token

        if get_token() is None:
            raise HubError(f"pushing to {target.repo_id}: no Hugging Face token found. Set HF_TOKEN, or run `hf auth login`, then re-run.")
