"""Shared test helpers: small build configs and reading a cache back in build order."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from builder.config import BuildConfig
from builder.faults import FAULT_ENV
from builder.reader import load_cache, read_manifest

ROOT = Path(__file__).resolve().parents[1]


def small_config(output_dir: Path, target: str | Path = "tiny-llama", **overrides) -> BuildConfig:
    """14 samples in shards of 4 (three full, one trailing partial), short sequences."""
    settings = dict(
        target_model=str(target),
        input_data="sample-chats",
        output_dir=str(output_dir),
        max_samples=14,
        seq_length=96,
        shard_size=4,
        batch_size=3,
        draft_vocab_size=300,
        dtype="fp32",
    )
    settings.update(overrides)
    return BuildConfig(**settings)


def record_in_card(cache_dir: Path, **identity_fields) -> None:
    """Rewrite identity fields in the cache's card, with the fingerprint over them, as a build that
    recorded those values would have written it."""
    from huggingface_hub import DatasetCard

    from builder.manifest import CARD_KEY, fingerprint

    card = DatasetCard.load(Path(cache_dir) / "README.md")
    manifest = card.data[CARD_KEY]
    manifest["identity"] = manifest["identity"] | identity_fields
    manifest["fingerprint"] = fingerprint(manifest["identity"])
    card.data[CARD_KEY] = manifest
    card.save(Path(cache_dir) / "README.md")


def decoded_rows(cache_dir: Path, layout: str = "raw") -> list[dict]:
    return list(load_cache(cache_dir, layout=layout, streaming=True))


def assert_same_content(rows_a: list[dict], rows_b: list[dict]) -> None:
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def hub_cache_holding(hub_cache: Path, repo_id: str, commit: str, folder: Path) -> None:
    """`folder`'s files laid out as a download of `repo_id`'s main branch at `commit` leaves them in the local Hub cache."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def says(*facts: str) -> str:
    """A `pytest.raises(match=...)` pattern for a message that states every fact, in any order.

    Facts are literal text (a flag, a value, the fix to apply), so rewording the sentence around
    them does not break a test, while dropping one of them does.
    """
    import re

    return "(?s)" + "".join(f"(?=.*{re.escape(fact)})" for fact in facts)


def batch_rows(batches) -> dict[int, dict]:
    """{window position: row} of every finite sample of forward batches (writer.BatchOutput), sliced
    here with torch, apart from the writer's own slicing: the sample's scalars, its token ids and
    loss mask from its lists, its first num_tokens positions of each per-token column and its run
    of rows of each per-loss column."""
    rows = {}
    for batch in batches:
        offset = 0
        for b, (position, sample) in enumerate(zip(batch.window_positions, batch.samples)):
            n_loss, length = sample["num_loss_tokens"], sample["num_tokens"]
            if batch.finite[b]:
                rows[position] = {
                    "sample_id": sample["sample_id"],
                    "input_ids": torch.tensor(sample["input_ids"], dtype=torch.int32),
                    "loss_mask": torch.tensor(sample["loss_mask"], dtype=torch.uint8),
                    **{n: t[offset : offset + n_loss] if n in batch.per_loss else t[b, :length] for n, t in batch.columns.items()},
                }
            offset += n_loss
    return rows


def one_sample_of_batch(live: dict, b: int) -> dict:
    """A forward batch's live outputs (Target.supervise's) for its sample `b` alone: its slice of each
    per-token tensor, and its run of the loss rows, which are row-major over the batch."""
    length = live["attention"].shape[1]
    mine = live["loss_positions"] // length == b
    single = {name: live[name][mine] for name in ("probs", "argmax", "log_draft_mass") if name in live}
    single["loss_positions"] = live["loss_positions"][mine] - b * length
    return single | {name: live[name][b : b + 1] for name in ("aux", "final_hidden", "attention") if name in live}


def quality_of_samples(layout, live: dict, samples, draft_rows=None, transform=None) -> dict:
    """The merged quality figures of a batch's `samples`, each encoded and measured alone."""
    from builder.formats import encode_aux, encode_targets, merge_quality, quality_of_batch

    merged = {}
    for b in samples:
        single = one_sample_of_batch(live, b)
        encoded = encode_aux(single["aux"], layout.aux_dtype) | encode_targets(layout, single)
        figures = quality_of_batch(layout, single, encoded, draft_rows, transform)
        merged = merge_quality(merged, {name: value.tolist() for name, value in figures.items()})
    return merged


def assert_same_figures(actual: dict, expected: dict) -> None:
    """Equal quality figures: extremes, counts and histograms exactly; sums and means up to the order of
    their additions."""
    import pytest

    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if name.endswith(("_sum", "_mean")):
            assert actual[name] == pytest.approx(value, rel=1e-6, abs=0), name
        else:
            assert actual[name] == value, name


class AllocatedBytes(TorchDispatchMode):
    """Bytes of the storages the ops run inside it allocate (those of `existing` tensors excluded):
    live now, and at their peak. Each storage counts until its last reference goes."""

    def __init__(self, existing):
        super().__init__()
        self.live = self.peak = 0
        self.storages = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self.storages or nbytes == 0:
            return
        self.storages.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, nbytes)

    def _freed(self, key: int, nbytes: int) -> None:
        self.storages.discard(key)
        self.live -= nbytes


def export_signalled_at(cache: Path, to: str, out: Path, fault: str) -> subprocess.CompletedProcess:
    """`eagle3-cache export CACHE --to TO OUT` in a process of its own, which signals itself at the
    named point (`EAGLE3_CACHE_FAULT`, see builder.faults.FaultPoints), e.g. `export_file:3:SIGTERM`."""
    env = {**os.environ, FAULT_ENV: fault, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "builder.cli", "export", str(cache), "--to", to, str(out)]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)


# A user's mappings whose keys cannot be sorted: numbers beside words, YAML 1.1's `on` (True) and `null` beside strings
MIXED_KEYS = "label_names:\n  0: rejected\n  1: accepted\n  other: unknown\nswitches:\n  on: 1\n  debug: 2\n  null: 3\n"
MIXED_VALUES = {"label_names": {0: "rejected", 1: "accepted", "other": "unknown"}, "switches": {True: 1, "debug": 2, None: 3}}


def card_edited_by_user(text: str, keys: str = "license: mit\npretty_name: 'Team X: cache'\nlanguage:\n- en\n", tag: str = "team-x") -> str:
    """A cache's card as a user edits it: keys in its front matter, a tag of theirs, and their own
    text above and below the generated text's markers ("Our intro.", "Cite team X.")."""
    text = text.replace("---\n", f"---\n{keys}", 1).replace("- eagle3-cache\n", f"- eagle3-cache\n- {tag}\n", 1)
    front_matter, body = text.split("\n---\n\n", 1)  # the body starts with the generated text's start marker
    return f"{front_matter}\n---\n\nOur intro.\n\n{body}\n## Citation\n\nCite team X.\n"


def folder_of_caches(folder: Path, caches: dict[str, Path]) -> Path:
    """A local copy of a repo holding several caches: each in its sub-folder, the root card the index listing them."""
    import shutil

    from dataset_card import index_entry, render_index_card

    for name, cache in caches.items():
        shutil.copytree(cache, folder / name)
    index = {name: index_entry(read_manifest(cache), name) for name, cache in caches.items()}
    (folder / "README.md").write_text(render_index_card("user/caches", index))
    return folder


def front_matter_edited(text: str, edit) -> str:
    """A card's text with `edit(data)` applied to its YAML front matter, the text below kept."""
    import yaml

    _, front, body = text.split("---\n", 2)
    data = yaml.safe_load(front)
    edit(data)
    return "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n" + body


def index_cut_short(text: str) -> str:
    """A root index card cut short within its front matter, after the key that shows it is an index."""
    return text[: text.index("eagle3_cache_index:") + 40]


def configs_removed(text: str) -> str:
    """A root index card whose `configs`, by which `datasets` opens a config, were removed by hand."""
    return front_matter_edited(text, lambda data: data.pop("configs"))


def first_config_renamed(text: str) -> str:
    """A root index card whose first config (by name) was renamed by hand in its `configs`, not in its index."""

    def rename(data: dict) -> None:
        data["configs"][0]["config_name"] += "-old"

    return front_matter_edited(text, rename)
