"""Supervision formats (docs/formats.md): which tensor columns a cache stores for each
`--target-format` / `--aux-dtype`, how a batch's live outputs become those columns, and how
a reader turns them back into dense `target_probs` and aux states.

- `probs`: dense draft-vocab probs at loss-masked positions (exact).
- `topk`: the K largest draft-vocab log-probs and their draft column ids, plus the log of the
  draft-vocab mass; rebuilt renormalised over the K (NeMo Automodel) or with the tail spread.
- `hidden`: the final hidden state at every position; logits are recomputed with the
  target's `lm_head` rows stored under vocab/, so another draft vocabulary needs no rebuild.
- `--aux-dtype fp8`: e4m3 with one fp32 scale per token.

Builder and reader share `probs_from_hidden` and `decode_aux`, and the build measures its quality
figures against the live target after the casts a default read applies (fp8 aux states decoded
to bf16, rebuilt probs cast to the cache's dtype), so they are exactly what a default read gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .supervision import HEAD_CHUNK_ROWS, chunked_logits, compute_target_distribution, logit_chunks

TARGET_FORMATS = ("probs", "topk", "hidden")
AUX_DTYPES = ("bf16", "fp16", "fp32", "fp8")
TORCH_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "int16": torch.int16,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@dataclass(frozen=True)
class Layout:
    target_format: str
    dtype: str  # floats of the target fields
    aux_dtype: str
    topk: int
    draft_vocab_size: int
    aux_width: int
    hidden_size: int

    @property
    def topk_value_dtype(self) -> str:
        return "fp32" if self.dtype == "fp32" else "fp16"

    @property
    def topk_id_dtype(self) -> str:
        return "int16" if self.draft_vocab_size <= 32767 else "int32"

    def columns(self) -> dict[str, dict]:
        """Tensor columns in file order: {name: {"dtype", "shape", "per"}}; `per` is token or loss."""
        cols = {
            "input_ids": ("int32", ["L"], "token"),
            "loss_mask": ("uint8", ["L"], "token"),
            "aux_hidden_states": (self.aux_dtype, ["L", self.aux_width], "token"),
        }
        if self.aux_dtype == "fp8":
            cols["aux_scales"] = ("fp32", ["L"], "token")
        cols["target_argmax"] = ("int32", ["n_loss"], "loss")
        if self.target_format == "probs":
            cols["target_probs"] = (self.dtype, ["n_loss", self.draft_vocab_size], "loss")
        elif self.target_format == "topk":
            cols["topk_logprobs"] = (self.topk_value_dtype, ["n_loss", self.topk], "loss")
            cols["topk_ids"] = (self.topk_id_dtype, ["n_loss", self.topk], "loss")
            cols["log_draft_mass"] = ("fp32", ["n_loss"], "loss")
        else:
            cols["final_hidden"] = (self.dtype, ["L", self.hidden_size], "token")
        return {name: {"dtype": d, "shape": s, "per": p} for name, (d, s, p) in cols.items()}

    def column_position_bytes(self) -> dict[str, int]:
        """Each tensor column's bytes per position it holds (a token, or a loss-masked token)."""
        return {
            name: (spec["shape"][1] if len(spec["shape"]) == 2 else 1) * TORCH_DTYPES[spec["dtype"]].itemsize
            for name, spec in self.columns().items()
        }

    def bytes_per_position(self) -> tuple[int, int]:
        """Encoded bytes per token and per loss-masked position."""
        per = {"token": 0, "loss": 0}
        for name, nbytes in self.column_position_bytes().items():
            per[self.columns()[name]["per"]] += nbytes
        return per["token"], per["loss"]

    def column_bytes(self, tokens: int, loss_tokens: int) -> dict[str, int]:
        """Each tensor column's bytes over rows of `tokens` positions, `loss_tokens` of them
        loss-masked: the tensors' own bytes, which `--compression none` stores as they are."""
        count = {"token": tokens, "loss": loss_tokens}
        columns = self.columns()
        return {name: count[columns[name]["per"]] * nbytes for name, nbytes in self.column_position_bytes().items()}


# ---- build side (on the device, per batch) ----------------------------------------------


# fp8 aux states are encoded, and their quality figure measured, over this many slices of a batch's tokens:
# each slice's fp32 temporaries, at most FP8_SLICE_BYTES per element, then hold about 1/4 of the live
# bf16 aux states' bytes. The planner counts them in its `aux_capture` term (`encoded_aux_bytes`).
AUX_SLICES = 16
FP8_SLICE_BYTES = 8  # at most: the read's fp32 widening and its product with the scales
FP8_TOKEN_BYTES = 4 + 4 + 1 + 4  # the scale; the quality figure's per-token maxima, mask and masked maxima


def encoded_aux_bytes(tokens: int, width: int, aux_dtype: str, compute_dtype: torch.dtype) -> int:
    """Device bytes a batch's encoded aux columns hold beside its live aux states `[tokens, width]`,
    computed in `compute_dtype`: none where they are stored in that dtype (the live tensor is stored
    as it is), else the cast copy and, for fp8, its scales and the largest slice's temporaries."""
    if TORCH_DTYPES[aux_dtype] == compute_dtype:
        return 0
    stored = tokens * width * TORCH_DTYPES[aux_dtype].itemsize
    if aux_dtype != "fp8":
        return stored
    return stored + tokens * FP8_TOKEN_BYTES + aux_slice_rows(tokens) * width * FP8_SLICE_BYTES


def encode_aux(aux: torch.Tensor, aux_dtype: str) -> dict[str, torch.Tensor]:
    if aux_dtype != "fp8":
        return {"aux_hidden_states": aux.to(TORCH_DTYPES[aux_dtype])}
    rows = aux.reshape(-1, aux.shape[-1])
    stored = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=aux.device)
    scales = torch.empty(len(rows), dtype=torch.float32, device=aux.device)
    for part in aux_token_slices(len(rows)):
        encode_fp8_rows(rows[part], stored[part], scales[part])
    return {"aux_hidden_states": stored.view(aux.shape), "aux_scales": scales.view(aux.shape[:-1])}


def encode_fp8_rows(rows: torch.Tensor, stored: torch.Tensor, scales: torch.Tensor) -> None:
    """Fill `stored` (e4m3) and `scales` (fp32) from `rows`: each row over its largest magnitude / 448.
    Per row alone, so any split of the rows stores the same bytes. The magnitudes are taken in the
    rows' own dtype (exact, as is its widening to fp32); the division promotes to fp32 as it computes,
    without an fp32 copy of the rows."""
    largest = rows.abs().amax(dim=-1).float()
    torch.div(largest, FP8_MAX, out=scales).clamp_(min=torch.finfo(torch.float32).tiny)
    stored.copy_(torch.div(rows, scales.unsqueeze(-1)))


def aux_token_slices(tokens: int) -> list[slice]:
    """At most AUX_SLICES slices covering `tokens` rows of aux states; none for no rows."""
    return row_slices(tokens, AUX_SLICES)


def aux_slice_rows(tokens: int) -> int:
    """Rows in the largest of `aux_token_slices(tokens)`."""
    return -(-tokens // AUX_SLICES)


def row_slices(rows: int, count: int, multiple: int = 1) -> list[slice]:
    """At most `count` slices covering `rows` rows, each a whole number of `multiple` rows (but the
    last); none for no rows. `rows` is known on the host: no device synchronisation."""
    units = -(-rows // multiple)
    step = multiple * max(1, -(-units // count))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def default_read_aux_dtype(aux_dtype: str) -> torch.dtype:
    """What `load_cache` decodes stored aux states to unless given `aux_dtype=`: bf16 for fp8, else the stored dtype."""
    return torch.bfloat16 if aux_dtype == "fp8" else TORCH_DTYPES[aux_dtype]


def decode_aux(stored: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scales is None:
        return stored.to(dtype) if stored.dtype != dtype else stored
    return (stored.float() * scales.unsqueeze(-1)).to(dtype)


def encode_targets(layout: Layout, live: dict) -> dict[str, torch.Tensor]:
    """Per-loss-row (or per-token for `hidden`) target columns from the batch's live outputs."""
    float_dtype = TORCH_DTYPES[layout.dtype]
    out = {"target_argmax": live["argmax"].to(torch.int32)}
    if layout.target_format == "probs":
        out["target_probs"] = live["probs"].to(float_dtype)
    elif layout.target_format == "topk":
        values, ids = live["probs"].topk(min(layout.topk, layout.draft_vocab_size), dim=-1)
        # An underflowed probability inside the top K would store -inf: floor it at the smallest normal.
        out["topk_logprobs"] = values.clamp(min=torch.finfo(torch.float32).tiny).log().to(TORCH_DTYPES[layout.topk_value_dtype])
        out["topk_ids"] = ids.to(TORCH_DTYPES[layout.topk_id_dtype])
        out["log_draft_mass"] = live["log_draft_mass"].float()
    else:
        out["final_hidden"] = live["final_hidden"].to(float_dtype)
    return out


# ---- read side (also used by the build's quality report) --------------------------------


def probs_from_topk(logprobs: torch.Tensor, ids: torch.Tensor, draft_vocab_size: int, spread_tail: bool = False) -> torch.Tensor:
    """Dense `[n, Vd]` fp32: the kept K renormalised (NeMo Automodel), or the tail spread evenly."""
    kept = logprobs.float().exp()
    dense = kept.new_zeros(kept.shape[0], draft_vocab_size)
    if spread_tail and draft_vocab_size > kept.shape[1]:
        tail = (1.0 - kept.sum(-1, keepdim=True)).clamp(min=0) / (draft_vocab_size - kept.shape[1])
        dense += tail
        return dense.scatter(1, ids.long(), kept)
    return dense.scatter(1, ids.long(), kept / kept.sum(-1, keepdim=True))


def probs_from_topk_restricted(
    logprobs: torch.Tensor, ids: torch.Tensor, new_column: torch.Tensor, draft_vocab_size: int, spread_tail: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K rows over a smaller draft vocabulary: (dense `[n, Vd']` fp32, kept mass `[n]` fp32).

    `new_column[c]` is the new column of stored column `c`, -1 where the smaller vocabulary drops
    it. Kept columns outside it are dropped; the rest are renormalised over what remains (or,
    `spread_tail=True`, kept as they are and the missing mass spread over the other columns).

    The kept mass is the share of the new vocabulary's distribution the surviving columns hold,
    as a lower bound: its own mass within the stored vocabulary is unknown beyond "at most
    1 - the dropped columns' mass". With no column dropped it is the top-K mass the build
    reports; it is 0 where no column survives (that row is all zeros).
    """
    kept = logprobs.float().exp()
    column = new_column[ids.long()]
    inside = column >= 0
    kept_inside = torch.where(inside, kept, torch.zeros_like(kept))
    dropped = (kept - kept_inside).sum(-1, keepdim=True)
    lower = kept_inside / (1.0 - dropped).clamp(min=torch.finfo(torch.float32).tiny)  # each kept p_new, at least
    kept_mass = lower.sum(-1)
    dense = kept.new_zeros(kept.shape[0], draft_vocab_size + 1)  # the extra column absorbs the dropped ones
    if spread_tail:
        free = (draft_vocab_size - inside.sum(-1, keepdim=True)).clamp(min=1)
        dense += (1.0 - kept_mass.unsqueeze(-1)).clamp(min=0) / free
        values = lower
    else:
        total = kept_inside.sum(-1, keepdim=True)
        values = kept_inside / torch.where(total > 0, total, torch.ones_like(total))
    dense.scatter_(1, torch.where(inside, column, draft_vocab_size), values)
    return dense[:, :draft_vocab_size], kept_mass


def draft_head(draft_rows: torch.Tensor):
    """The head of a `hidden` cache: fp32 hidden rows times the stored fp32 draft rows of `lm_head`."""
    weight = draft_rows.float().T
    return lambda chunk: chunk.float() @ weight


def logits_from_hidden(hidden_rows: torch.Tensor, draft_rows: torch.Tensor, transform=None) -> torch.Tensor:
    """Draft-vocab logits `[n, Vd]` fp32 from final hidden rows and the head's draft rows, in the build's fixed-shape chunks."""
    return chunked_logits(hidden_rows.float(), draft_head(draft_rows), transform, width=draft_rows.shape[0])


def probs_from_hidden(hidden_rows: torch.Tensor, draft_rows: torch.Tensor, transform=None) -> torch.Tensor:
    """Dense `[n, Vd]` fp32 draft-vocab probs from final hidden rows and the head's draft rows."""
    out = [torch.softmax(logits, dim=-1) for logits in logit_chunks(hidden_rows.float(), draft_head(draft_rows), transform)]
    return torch.cat(out)[: hidden_rows.shape[0]] if out else hidden_rows.new_zeros(0, draft_rows.shape[0], dtype=torch.float32)


def head_transform_from(spec: dict | None, bias: torch.Tensor | None = None):
    """The head transform recorded in the manifest, as a function (None for a plain linear head).
    `bias`: the lm_head bias of the logits' columns, added first, as the head itself does."""
    if spec and spec.get("lm_head_bias") and bias is None:
        raise ValueError("the cache's head transform has an lm_head bias, but its lm_head file holds none: the file is not this cache's")
    if not spec and bias is None:
        return None
    spec = spec or {}

    def transform(logits):
        if bias is not None:
            logits = logits + bias.to(logits.device, logits.dtype)
        if spec.get("logit_scale") is not None:
            logits = logits * spec["logit_scale"]
        if spec.get("lm_head_multiplier") not in (None, 1):
            logits = logits * spec["lm_head_multiplier"]
        if spec.get("logits_scaling") not in (None, 1):
            logits = logits / spec["logits_scaling"]
        if spec.get("final_logit_softcapping") is not None:
            cap = spec["final_logit_softcapping"]
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def head_bias(head_file: dict, selected: torch.Tensor) -> torch.Tensor | None:
    """The lm_head bias of the `selected` columns, from a `hidden` cache's head file (None without one)."""
    return head_file["bias"].index_select(0, selected.long()) if "bias" in head_file else None


def supervised_probs(layout: Layout, decoded: dict, loss: torch.Tensor, draft_rows=None, transform=None, spread_tail=False) -> torch.Tensor:
    """Dense `[n_loss, Vd]` fp32 target probs at the loss-masked positions of one decoded row."""
    if layout.target_format == "probs":
        return decoded["target_probs"].float()
    if layout.target_format == "topk":
        return probs_from_topk(decoded["topk_logprobs"], decoded["topk_ids"], layout.draft_vocab_size, spread_tail)
    return probs_from_hidden(decoded["final_hidden"][loss], draft_rows, transform)


# ---- quality, measured against the live target during the build --------------------------

# The dense figures (topk's KL, hidden's rebuilt probs) are measured over this many slices of a batch's
# loss rows: each slice's `[rows, Vd]` fp32 temporaries hold about 1/8 of the live probs' bytes, which
# keeps the batch's peak within the planner's `outputs` term (placement.plan_memory) for every format.
QUALITY_SLICES = 8


def quality_of_batch(layout: Layout, live: dict, encoded: dict, draft_rows=None, transform=None, finite=None) -> dict:
    """Sums and extremes (device scalars) over the samples of one batch that `finite` (`[B]` bool, on the
    device; None: every sample) keeps, which are those the build stores; merged per shard, reported in the
    card. Computed without a device synchronisation (no data-dependent shapes or branches): dropped rows
    count nowhere, and a batch without a kept row gives figures that merge as none (sums and maxima 0,
    minima +inf). The largest differences are those of a default read: aux states and rebuilt probs in
    the dtypes it yields."""
    stats = {}
    if layout.aux_dtype == "fp8":
        stats["aux_max_abs_diff"] = fp8_aux_max_abs_diff(live, encoded, finite)
    if layout.target_format == "topk":
        kept = kept_loss_rows(live, finite, len(encoded["topk_logprobs"]))
        mass = encoded["topk_logprobs"].float().exp().sum(-1)
        stats |= {
            "kept_mass_sum": torch.where(kept, mass, 0.0).sum(),
            "kept_mass_min": torch.where(kept, mass, torch.inf).amin() if len(mass) else mass.new_full((), torch.inf),
            "kept_mass_hist": torch.histc(torch.where(kept, mass, -1.0), bins=1000, min=0, max=1),  # -1: outside the bins
            "kl_spread_sum": torch.where(kept, kl_to_spread_rebuild(layout, live["probs"], encoded), 0.0).sum(),
            "kl_renorm_reverse_sum": torch.where(kept, -mass.clamp(min=1e-38).log(), 0.0).sum(),
            "rows": kept.sum(),
        }
    if layout.target_format == "hidden":
        stats["probs_max_abs_diff"] = hidden_rebuild_max_abs_diff(layout, live, encoded, draft_rows, transform, finite)
    return stats


def kept_loss_rows(live: dict, finite, rows: int) -> torch.Tensor:
    """`[n_loss]` bool: the loss rows of the samples `finite` keeps (rows are row-major over the batch)."""
    if finite is None:
        return torch.ones(rows, dtype=torch.bool, device=live["probs"].device)
    return finite[live["loss_positions"] // live["attention"].shape[1]]


def fp8_aux_max_abs_diff(live: dict, encoded: dict, finite=None) -> torch.Tensor:
    """Largest |aux state a default read decodes - live aux state| over the real tokens of the kept samples
    (0 if none), one slice of tokens at a time: the read and its fp32 difference exist for one slice only."""
    aux = live["aux"]
    rows = aux.reshape(-1, aux.shape[-1])
    stored, scales = encoded["aux_hidden_states"].reshape(rows.shape), encoded["aux_scales"].reshape(-1)
    per_token = torch.empty(len(rows), dtype=torch.float32, device=aux.device)
    read_dtype = default_read_aux_dtype("fp8")
    for part in aux_token_slices(len(rows)):  # one expression: a slice's temporaries are gone before the next slice's
        torch.amax(decode_aux(stored[part], scales[part], read_dtype).float().sub_(rows[part]).abs_(), dim=-1, out=per_token[part])
    counted = live["attention"].bool() if finite is None else live["attention"].bool() & finite[:, None]
    return torch.where(counted.reshape(-1), per_token, 0.0).amax()


def loss_row_slices(rows: int, multiple: int = 1) -> list[slice]:
    """At most QUALITY_SLICES slices covering `rows` loss rows, each a whole number of `multiple` rows (but the last)."""
    return row_slices(rows, QUALITY_SLICES, multiple)


def kl_to_spread_rebuild(layout: Layout, probs: torch.Tensor, encoded: dict) -> torch.Tensor:
    """`[n]` fp32: KL(live || the top-K rebuilt with the tail spread), row by row, one slice of rows at a time."""
    logprobs, ids = encoded["topk_logprobs"], encoded["topk_ids"]
    per_slice = []
    for rows in loss_row_slices(len(probs)):
        p = probs[rows]
        spread = probs_from_topk(logprobs[rows], ids[rows], layout.draft_vocab_size, spread_tail=True)
        per_slice.append(torch.where(p > 0, p * (p.clamp(min=1e-38).log() - spread.clamp(min=1e-38).log()), torch.zeros_like(p)).sum(-1))
    return torch.cat(per_slice) if per_slice else probs.new_zeros(0)


def hidden_rebuild_max_abs_diff(layout: Layout, live: dict, encoded: dict, draft_rows, transform, finite=None) -> torch.Tensor:
    """Largest |probs a default read rebuilds from the stored hidden rows - live probs| over the loss rows of
    the kept samples (0 if none), one slice of rows at a time. Slices are whole head chunks: the rebuild
    pads to them anyway (`logit_chunks`)."""
    hidden_rows = encoded["final_hidden"].flatten(0, 1).index_select(0, live["loss_positions"])
    probs, read_dtype = live["probs"], TORCH_DTYPES[layout.dtype]
    kept = kept_loss_rows(live, finite, len(probs))
    maxima = []
    for rows in loss_row_slices(len(probs), multiple=HEAD_CHUNK_ROWS):
        rebuilt = probs_from_hidden(hidden_rows[rows], draft_rows, transform)
        maxima.append(torch.where(kept[rows], (rebuilt.to(read_dtype).float() - probs[rows]).abs().amax(-1), 0.0).amax())
    return torch.stack(maxima).amax() if maxima and probs.shape[1] else torch.zeros(())


def extreme(pick, a: float, b: float) -> float:
    """`pick(a, b)`, NaN if either is (as a sum would be): Python's max and min answer NaN or not by argument order."""
    return math.nan if math.isnan(a) or math.isnan(b) else pick(a, b)


def merge_quality(a: dict, b: dict) -> dict:
    merged = dict(a)
    for key, value in b.items():
        if key not in merged:
            merged[key] = value
        elif key.endswith("_max_abs_diff"):
            merged[key] = extreme(max, merged[key], value)
        elif key.endswith("_min"):
            merged[key] = extreme(min, merged[key], value)
        elif key.endswith("_hist"):
            merged[key] = [x + y for x, y in zip(merged[key], value)]
        else:
            merged[key] = merged[key] + value
    return merged


def quality_report(stats: dict) -> dict:
    """The card's figures from merged per-shard sums."""
    report = {k: v for k, v in stats.items() if k.endswith("_max_abs_diff")}
    rows = stats.get("rows", 0)
    if rows:
        hist, seen, p1 = stats["kept_mass_hist"], 0, 0.0
        for i, count in enumerate(hist):  # 1st percentile from the 1000-bin histogram (bin's upper edge)
            seen += count
            if seen >= 0.01 * rows:
                p1 = (i + 1) / len(hist)
                break
        report |= {
            "kept_mass_mean": stats["kept_mass_sum"] / rows,
            "kept_mass_p1": p1,
            "kept_mass_min": stats["kept_mass_min"],
            "kl_live_to_rebuilt_spread_mean": stats["kl_spread_sum"] / rows,
            "kl_rebuilt_renorm_to_live_mean": stats["kl_renorm_reverse_sum"] / rows,
        }
    return report


__all__ = ["Layout", "TARGET_FORMATS", "AUX_DTYPES", "compute_target_distribution"]
