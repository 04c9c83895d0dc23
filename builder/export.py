"""Exports for trainers that read their own offline formats.

- `nemo`: NeMo Automodel's `cached_target_path` layout (its format version 2): manifest.json,
  target_embeddings.safetensors and shard-NNNNNN.safetensors padded to seq_length.
- `specforge`: SpecForge's offline per-sample files and vocab mapping (needs a `hidden` cache).
Both are produced from the reader, so they hold exactly what `load_cache` yields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import Eagle3CacheError
from .reader import collate_nemo, load_cache, read_manifest, read_vocab
from .vocab import d2t_t2d

NEMO_FORMAT_VERSION = 2


class ExportError(Eagle3CacheError):
    pass


def export_cache(cache_dir: str | Path, to: str, out_dir: str | Path, *, target_model: str | None = None, progress: bool = True) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"export: {out} is not empty; expected a new or empty directory for the export")
    out.mkdir(parents=True, exist_ok=True)
    if to == "nemo":
        export_nemo(Path(cache_dir), out, target_model, progress)
    elif to == "specforge":
        export_specforge(Path(cache_dir), out, progress)
    else:
        raise ExportError(f"--to: expected nemo or specforge, got {to!r}")
    return out


def _save(tensors: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


# ---- NeMo Automodel -------------------------------------------------------------------------


def nemo_shard(samples: list[dict], seq_length: int, topk: int | None) -> dict[str, torch.Tensor]:
    batch = collate_nemo(samples, pad_to=seq_length)
    shard = {
        "input_ids": batch["input_ids"].long(),
        "attention_mask": batch["attention_mask"].long(),
        "loss_mask": batch["loss_mask"].long(),
        "aux_hidden_states": batch["aux_hidden_states"],
        "position_mask": batch["position_mask"].bool(),
    }
    if topk:
        values, indices = batch["target_probs"].float().topk(topk, dim=-1)
        shard["target_probs_values"] = values.to(batch["target_probs"].dtype)
        shard["target_probs_indices"] = indices.to(torch.int32)
    else:
        shard["target_probs"] = batch["target_probs"]
    return shard


def export_nemo(cache_dir: Path, out: Path, target_model: str | None, progress: bool) -> None:
    manifest = read_manifest(cache_dir)
    identity = manifest["identity"]
    topk = identity.get("topk") if identity["target_format"] == "topk" else None
    dataset = load_cache(cache_dir, layout="nemo", streaming=False)
    shard_size, seq_length = identity["shard_size"], identity["seq_length"]
    for index, start in enumerate(tqdm(range(0, len(dataset), shard_size), desc="Exporting (nemo)", disable=not progress)):
        samples = [dataset[i] for i in range(start, min(start + shard_size, len(dataset)))]
        _save(nemo_shard(samples, seq_length, topk), out / f"shard-{index:06d}.safetensors")
    _save({"weight": target_embeddings(target_model or identity["target"]["model"], identity["target"]["revision"])}, out / "target_embeddings.safetensors")
    (out / "manifest.json").write_text(json.dumps(nemo_manifest(cache_dir, manifest, len(dataset)), indent=2))


def nemo_manifest(cache_dir: Path, manifest: dict, num_samples: int) -> dict:
    identity = manifest["identity"]
    return {
        "format_version": NEMO_FORMAT_VERSION,
        "target_model": identity["target"]["model"],
        "target_vocab_size": manifest["target_vocab_size"],
        "draft_vocab_size": identity["draft_vocab_size"],
        "seq_length": identity["seq_length"],
        "dtype": identity["dtype"],
        "num_samples": num_samples,
        "shard_size": identity["shard_size"],
        "target_probs_topk": identity.get("topk") if identity["target_format"] == "topk" else None,
        "aux_hidden_dim": manifest["columns"]["aux_hidden_states"]["shape"][1],
        "aux_layer_ids": list(identity["aux_layer_ids"]),
        "selected_token_ids": read_vocab(cache_dir)["selected_token_ids"].tolist(),
        "input_data": identity["input"]["data"],
        "split": identity["input"]["split"] or "train",
        "shuffle_seed": identity["input"]["shuffle_seed"],
        "mask_generation_prompt": True,  # the assistant header is never supervised
        "mask_reasoning_content": False,
    }


def target_embeddings(model: str, revision: str | None) -> torch.Tensor:
    """The target's input embedding matrix `[V, H]` fp32 (the draft shares it)."""
    from .embedded import resolve_target
    from .target import load_model

    try:
        loaded = load_model(resolve_target(model), revision, False, torch.device("cpu"), torch.float32)
    except OSError as err:
        raise ExportError(f"export: cannot load the target {model!r} for its embeddings ({err}); pass --target-model PATH") from None
    return loaded.get_input_embeddings().weight.detach().float().clone()


# ---- SpecForge ------------------------------------------------------------------------------


def export_specforge(cache_dir: Path, out: Path, progress: bool) -> None:
    manifest = read_manifest(cache_dir)
    if manifest["identity"]["target_format"] != "hidden":
        raise ExportError(
            f"export --to specforge: SpecForge trains from final hidden states; {cache_dir} was built with "
            f"--target-format {manifest['identity']['target_format']}. Rebuild with --target-format hidden."
        )
    dataset = load_cache(cache_dir, layout="specforge", streaming=False)
    for i in tqdm(range(len(dataset)), desc="Exporting (specforge)", disable=not progress):
        torch.save(dataset[i], out / f"data_{i}.ckpt")  # tensors only: loads with weights_only=True
    d2t, t2d = d2t_t2d(read_vocab(cache_dir)["selected_token_ids"].numpy(), manifest["target_vocab_size"])
    torch.save({"d2t": torch.as_tensor(d2t, dtype=torch.int64), "t2d": torch.as_tensor(t2d)}, out / "vocab_mapping.pt")
