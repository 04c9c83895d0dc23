"""The fingerprints of a local target: the weight files transformers loads, in its order, and the
code of its own that its auto_map names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from builder.embedded import resolve_target
from builder.errors import ConfigError
from builder.fingerprints import loaded_weight_files, local_weights_sample_hash

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def tiny_target_copy(directory: Path) -> Path:
    shutil.copytree(resolve_target("tiny-llama"), directory)
    return directory


def write_index(folder: Path, index: str, files: tuple[str, ...]) -> None:
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": {f"w{i}": name for i, name in enumerate(files)}}))


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(name.encode())


@pytest.mark.parametrize(
    ("present", "loaded"),
    [
        (("model.safetensors", "model.safetensors.index.json", *SHARDS), ("model.safetensors",)),
        (("model.safetensors", "pytorch_model.bin"), ("model.safetensors",)),
        (("model.safetensors.index.json", *SHARDS, "pytorch_model.bin"), SHARDS),
        (("pytorch_model.bin", "pytorch_model.bin.index.json", "shard.bin"), ("pytorch_model.bin",)),
        (("pytorch_model.bin.index.json", "shard.bin", "optimizer.pt"), ("shard.bin",)),
        (("weights.pt", "other.safetensors"), ("other.safetensors", "weights.pt")),  # another layout: every weight-like file
    ],
)
def test_the_loaded_files_are_the_first_transformers_looks_for(tmp_path, present, loaded):
    for name in present:
        if name.endswith(".index.json"):
            write_index(tmp_path, name, SHARDS if name.startswith("model.") else ("shard.bin",))
        else:
            touch(tmp_path, name)
    assert [p.name for p in loaded_weight_files(tmp_path)] == list(loaded)


def test_a_config_naming_its_weights_file_is_followed(tmp_path):
    touch(tmp_path, "model.safetensors", "custom.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"transformers_weights": "custom.safetensors"}))
    assert [p.name for p in loaded_weight_files(tmp_path)] == ["custom.safetensors"]


def test_a_folder_re_saved_sharded_is_fingerprinted_by_the_single_file_transformers_loads(tmp_path):
    """save_pretrained sharded over a single-file folder leaves model.safetensors, which transformers
    still loads: new weights there change the fingerprint (a --resume is refused), stale shards do not."""
    from transformers import AutoModelForCausalLM

    target = tiny_target_copy(tmp_path / "target")
    model = AutoModelForCausalLM.from_pretrained(target)
    model.save_pretrained(target, max_shard_size="300KB")
    assert (target / "model.safetensors").is_file() and (target / "model.safetensors.index.json").is_file()
    before = local_weights_sample_hash(str(target))

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    model.save_pretrained(tmp_path / "retrained")
    shutil.copy(tmp_path / "retrained" / "model.safetensors", target / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)  # transformers loads the replaced file
    assert local_weights_sample_hash(str(target)) != before


def test_a_stale_index_beside_the_single_file_is_not_read(tmp_path):
    target = tiny_target_copy(tmp_path / "target")
    write_index(target, "model.safetensors.index.json", SHARDS)  # names shards that are gone
    assert loaded_weight_files(target) == [target / "model.safetensors"]
    assert local_weights_sample_hash(str(target)) is not None


def test_an_index_naming_missing_files_is_refused_by_name(tmp_path):
    write_index(tmp_path, "model.safetensors.index.json", SHARDS)
    touch(tmp_path, SHARDS[0])
    with pytest.raises(
        ConfigError,
        match=r"--target-model: expected every weight file its model.safetensors.index.json names.*"
        rf"Missing: {SHARDS[1]}\. .*restore the files",
    ):
        local_weights_sample_hash(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("not json", "Found JSONDecodeError: Expecting value"),
        ('{"metadata": {}}', "Found no weight_map"),
        ('{"weight_map": []}', "Found a weight_map of list"),
    ],
)
def test_an_unreadable_index_is_refused_saying_what_it_holds(tmp_path, text, found):
    """transformers loads the weights through the index, so a damaged one is the target's fault, told as such."""
    touch(tmp_path, SHARDS[0])
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(
        ConfigError,
        match=r"--target-model: expected a model.safetensors.index.json holding a JSON object whose weight_map maps each "
        rf"tensor name to its file name, got '{tmp_path}'\. {found}.*restore the index",
    ):
        local_weights_sample_hash(str(tmp_path))


def test_a_cache_fingerprinted_index_first_by_an_earlier_version_still_matches_its_unchanged_folder(tmp_path, caplog):
    """Earlier versions hashed an index's files before the single file transformers loads; a build they
    began (its identity records no `weights_files`) in a folder holding both resumes, verifies and
    exports, with a warning of what cannot be seen."""
    from builder.build_state import identity_differences
    from builder.fingerprints import earlier_weights_sample_hashes, same_weights

    folder = tiny_target_copy(tmp_path / "target")
    shutil.copy(folder / "model.safetensors", folder / SHARDS[0])
    write_index(folder, "model.safetensors.index.json", SHARDS[:1])
    recorded = earlier_weights_sample_hashes(folder)["index_first"]
    assert recorded != local_weights_sample_hash(folder)
    with caplog.at_level("WARNING", logger="builder.fingerprints"):
        assert same_weights(recorded, str(folder), by_an_earlier_version=True)
    assert "a change to the loaded file since the build cannot be seen" in caplog.text
    stored = {"target": {"model": str(folder), "weights_sample_sha256": recorded}}
    current = {"target": {"model": str(folder), "weights_sample_sha256": local_weights_sample_hash(folder), "weights_files": "loaded"}}
    assert identity_differences(stored, current) == {}
    (folder / SHARDS[0]).write_bytes(bytes(reversed((folder / SHARDS[0]).read_bytes())))  # the files it hashed changed
    assert not same_weights(recorded, str(folder), by_an_earlier_version=True)
    assert set(identity_differences(stored, current)) == {"target.weights_sample_sha256"}


def test_a_cache_of_this_version_is_not_matched_the_earlier_ways(tmp_path):
    """A sharded checkpoint, then a retrained model.safetensors saved beside it (which transformers now
    loads): the index's files are unchanged, but this version's cache fingerprinted the loaded files, so
    the changed weights are refused, not matched the index-first way."""
    from builder.build_state import identity_differences
    from builder.fingerprints import WEIGHTS_FILES, same_weights

    folder = tiny_target_copy(tmp_path / "target")
    (folder / "model.safetensors").rename(folder / SHARDS[0])
    write_index(folder, "model.safetensors.index.json", SHARDS[:1])
    recorded = local_weights_sample_hash(folder)  # the shards', as loaded
    (folder / "model.safetensors").write_bytes(bytes(reversed((folder / SHARDS[0]).read_bytes())))  # retrained, saved beside
    assert not same_weights(recorded, str(folder))
    stored = {"target": {"model": str(folder), "weights_sample_sha256": recorded, "weights_files": WEIGHTS_FILES}}
    current = {"target": {"model": str(folder), "weights_sample_sha256": local_weights_sample_hash(folder), "weights_files": WEIGHTS_FILES}}
    assert set(identity_differences(stored, current)) == {"target.weights_sample_sha256"}


def test_a_stale_index_whose_files_are_gone_is_no_earlier_way_and_no_crash(tmp_path):
    """Re-saved as one file, a folder keeps the old index but not its shards: comparing a changed
    target against a cache of an earlier version then refuses it cleanly (no FileNotFoundError)."""
    from builder.build_state import identity_differences
    from builder.fingerprints import earlier_weights_sample_hashes, same_weights

    folder = tiny_target_copy(tmp_path / "target")
    write_index(folder, "model.safetensors.index.json", SHARDS)
    (folder / "model.safetensors.index.json").rename(folder / "kept.json")  # not the index yet: a valid build first
    recorded = local_weights_sample_hash(folder)
    (folder / "kept.json").rename(folder / "model.safetensors.index.json")
    (folder / "model.safetensors").write_bytes(bytes(reversed((folder / "model.safetensors").read_bytes())))
    assert "index_first" not in earlier_weights_sample_hashes(folder)
    assert not same_weights(recorded, str(folder), by_an_earlier_version=True)
    stored = {"target": {"model": str(folder), "weights_sample_sha256": recorded}}
    current = {"target": {"model": str(folder), "weights_sample_sha256": local_weights_sample_hash(folder)}}
    assert set(identity_differences(stored, current)) == {"target.weights_sample_sha256"}


def test_the_code_fingerprint_covers_the_files_auto_map_names_and_what_they_import(tmp_path):
    """The modules named in config.json's and tokenizer_config.json's auto_map, and the files they import
    relatively (transformers runs those too); not other Python files beside them, nor another repo's code."""
    from builder.fingerprints import code_files, local_code_hash

    folder = tiny_target_copy(tmp_path / "target")
    assert local_code_hash(folder) is None and local_code_hash("someorg/tiny") is None
    auto_map = {
        "AutoConfig": "configuration_x.XConfig",
        "AutoModelForCausalLM": "modeling_x.XForCausalLM",
        "AutoModel": "org/repo--modeling_y.Y",
    }
    for name, entries in (("config.json", auto_map), ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_x.XTokenizer", None]})):
        (folder / name).write_text(json.dumps(json.loads((folder / name).read_text()) | {"auto_map": entries}))
    code = {
        "modeling_x.py": "from .layers_x import Block\n",
        "layers_x.py": "Block = 1\n",
        "configuration_x.py": "",
        "tokenization_x.py": "",
    }
    for name, text in code.items():
        (folder / name).write_text(text)
    (folder / "convert_checkpoint.py").write_text("# a script shipped beside the model\n")
    assert code_files(folder) == sorted(code)
    recorded = local_code_hash(folder)
    (folder / "convert_checkpoint.py").write_text("# edited\n")
    assert local_code_hash(folder) == recorded
    for name, text in code.items():
        (folder / name).write_text(text + "# edited\n")
        assert local_code_hash(folder) != recorded, name
        (folder / name).write_text(text)
    assert local_code_hash(folder) == recorded
    (folder / "layers_x.py").unlink()  # missing, as transformers would find it: another fingerprint, not a crash
    assert local_code_hash(folder) not in (None, recorded)


def test_a_build_that_predates_the_code_fields_resumes_silently_where_the_target_ran_no_code_of_its_own(caplog):
    from builder.build_state import identity_differences

    stored = {"target": {"model": "tiny-llama", "config_sha256": "c"}}
    plain = {"target": {"model": "tiny-llama", "config_sha256": "c", "remote_code": None, "code_sha256": None}}
    assert identity_differences(stored, plain) == {}
    assert "predates" not in caplog.text
    with_code = {"target": {"model": "tiny-llama", "config_sha256": "c", "remote_code": True, "code_sha256": "d"}}
    assert identity_differences(stored, with_code) == {}
    assert "predates target.remote_code: that field is not checked" in caplog.text
